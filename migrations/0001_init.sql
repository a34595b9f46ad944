-- Foundation: accounts, terms acceptances, bindings, server state (pepper) and signing keys.

-- Identity-server access tokens; only a SHA-256 of each token is stored.
CREATE TABLE accounts (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    created_ts BIGINT NOT NULL
);
CREATE INDEX accounts_user_id ON accounts (user_id);

-- Policy URLs each user accepted (appended, never replaced).
CREATE TABLE terms_acceptances (
    user_id TEXT NOT NULL,
    url TEXT NOT NULL,
    accepted_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, url)
);

-- One row per 3PID: the newest binding of an address wins.
-- lookup_hash is sha256("<address> <medium> <pepper>") with the current pepper.
CREATE TABLE bindings (
    medium TEXT NOT NULL,
    address TEXT NOT NULL,
    mxid TEXT NOT NULL,
    lookup_hash TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    PRIMARY KEY (medium, address)
);
-- Covering index: hashed lookups read only the index.
CREATE INDEX bindings_lookup_hash ON bindings (lookup_hash, mxid);
CREATE INDEX bindings_mxid ON bindings (mxid);

-- Small named values shared by all instances (e.g. the lookup pepper).
CREATE TABLE server_state (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Public halves of our long-term signing keys; revoked keys answer isvalid=false.
CREATE TABLE signing_keys (
    key_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    created_ts BIGINT NOT NULL,
    revoked_ts BIGINT
);
