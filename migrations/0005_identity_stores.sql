-- Identity stores: a copy of what each listable store (synapse, ldap, static, a listable rest
-- backend) knows, with the lookup hash under the current pepper, so hashed lookups find store
-- entries through an index instead of asking the store.

CREATE TABLE store_threepids (
    store TEXT NOT NULL,
    medium TEXT NOT NULL,
    address TEXT NOT NULL,
    mxid TEXT NOT NULL,
    lookup_hash TEXT NOT NULL,
    PRIMARY KEY (store, medium, address)
);
CREATE INDEX store_threepids_hash ON store_threepids (lookup_hash);
CREATE INDEX store_threepids_address ON store_threepids (medium, address);

-- One row per store: when it was last copied, under which pepper its hashes were computed, and
-- which instance is copying it now (a lease, so one instance of several does the work).
CREATE TABLE store_sync (
    store TEXT PRIMARY KEY,
    synced_ts BIGINT NOT NULL DEFAULT 0,
    pepper TEXT NOT NULL DEFAULT '',
    entries BIGINT NOT NULL DEFAULT 0,
    claimed_until BIGINT NOT NULL DEFAULT 0,
    last_error TEXT
);
