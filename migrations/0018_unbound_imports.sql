-- Imported bindings unbound here: a later import of the same data (the old server still has the
-- association) must not bring them back. Only a digest of the 3PID is kept (sha256 of
-- "<medium> <address>", hex), not the address: the person asked to be forgotten.
-- imported_ts: the time of the association that was unbound; an import skips an association of
-- that 3PID as old or older, and takes a newer one (made on the old server afterwards).
CREATE TABLE unbound_imports (
    digest TEXT PRIMARY KEY,
    imported_ts BIGINT NOT NULL
);
