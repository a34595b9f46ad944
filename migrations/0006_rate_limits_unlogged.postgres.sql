-- Rate-limit counters are written by every requestToken and store-invite. Unlogged, they skip
-- the write-ahead log, so these commits do not wait for a disk flush (0.25 ms of each such
-- request here). After a PostgreSQL crash the table comes back empty: the counters start again,
-- which is all a crash can cost them.
ALTER TABLE rate_limits SET UNLOGGED;
