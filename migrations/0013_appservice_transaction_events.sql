-- Appservice transactions are told apart by their id *and* their events: Synapse on SQLite numbers
-- its transactions from 1 again after a restart, so a reused id with other events is a new
-- transaction, and only the same id with the same events is a retry. events_digest is SHA-256
-- (hex) over the sorted SHA-256 digests of the events' ids (canonical JSON for an event without
-- one); one row per (id, events), so a late retry of an older transaction with a reused id is
-- still recognised.
-- Ids recorded before this change carry no digest and are dropped: a retry of such a transaction
-- is handled again, which records nothing new (actions are unique per event and kind).
DROP TABLE appservice_transactions;
CREATE TABLE appservice_transactions (
    txn_id TEXT NOT NULL,
    events_digest TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (txn_id, events_digest)
);
CREATE INDEX appservice_transactions_received ON appservice_transactions (received_ts);
