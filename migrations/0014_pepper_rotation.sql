-- Lookup pepper rotation (issue 20). Hashes live in two slots per row: generation g of the
-- pepper has its hashes in lookup_hash when g is even, in lookup_hash_1 when g is odd. A rotation
-- fills the other slot with the next pepper's hashes while lookups keep using the current slot;
-- the previous pepper's slot answers during lookup.pepper_grace. hash_gen is the newest
-- generation a row's hashes were written for: a rotation to g + 1 rehashes the rows below it.

ALTER TABLE bindings ADD COLUMN lookup_hash_1 TEXT;
ALTER TABLE bindings ADD COLUMN hash_gen BIGINT NOT NULL DEFAULT 0;
CREATE INDEX bindings_lookup_hash_1 ON bindings (lookup_hash_1, mxid);
CREATE INDEX bindings_hash_gen ON bindings (hash_gen);

ALTER TABLE store_threepids ADD COLUMN lookup_hash_1 TEXT;
ALTER TABLE store_threepids ADD COLUMN hash_gen BIGINT NOT NULL DEFAULT 0;
CREATE INDEX store_threepids_hash_1 ON store_threepids (lookup_hash_1);
CREATE INDEX store_threepids_hash_gen ON store_threepids (hash_gen);

-- The pepper state shared by every instance: one row. Instances read it every second.
-- generation/pepper: advertised by /hash_details since since_ts. previous_pepper (generation - 1)
-- is answered until grace_until_ts. next_pepper (generation + 1): a rotation in progress, done by
-- the instance (or command) holding the lease (claimed_by, claimed_until).
CREATE TABLE lookup_pepper (
    id INTEGER PRIMARY KEY,
    generation BIGINT NOT NULL,
    pepper TEXT NOT NULL,
    since_ts BIGINT NOT NULL,
    previous_pepper TEXT,
    grace_until_ts BIGINT NOT NULL DEFAULT 0,
    next_pepper TEXT,
    rotation_started_ts BIGINT NOT NULL DEFAULT 0,
    claimed_by TEXT,
    claimed_until BIGINT NOT NULL DEFAULT 0
);
