-- Imports from another identity server (sydent, ma1sd: `python -m appservice import`).
-- imported_from: the source a row was imported from ("sydent", "ma1sd"); NULL for rows made
-- here. A bind here resets it on its binding. An import refuses to run (unless --merge) while
-- the database holds rows that are not from the same source.
ALTER TABLE bindings ADD COLUMN imported_from TEXT;
ALTER TABLE invites ADD COLUMN imported_from TEXT;
CREATE INDEX invites_imported_from ON invites (imported_from, state);

-- Ephemeral public keys of the other server that no single invite links to (sydent keeps them
-- in a table of their own). pubkey/ephemeral/isvalid answers true for one while a pending invite
-- imported from the same source remains; the purge job deletes them once none does.
CREATE TABLE imported_ephemeral_keys (
    public_key TEXT PRIMARY KEY,
    imported_from TEXT NOT NULL,
    created_ts BIGINT NOT NULL
);

-- One row per import that wrote something: what it found and did, as JSON (the report the
-- command printed), for the operator who wonders later where rows came from.
CREATE TABLE import_runs (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    started_ts BIGINT NOT NULL,
    finished_ts BIGINT NOT NULL,
    report TEXT NOT NULL
);
