-- Claims name their worker (one id per process and queue): a worker renews the short leases of
-- all its rows in one statement while it works, and gives back what it did not start when it
-- stops; every update is guarded by the owner.
ALTER TABLE onbind_outbox ADD COLUMN claimed_by TEXT;
ALTER TABLE appservice_actions ADD COLUMN claimed_by TEXT;
CREATE INDEX onbind_outbox_claimed_by ON onbind_outbox (claimed_by);
CREATE INDEX appservice_actions_claimed_by ON appservice_actions (claimed_by);
CREATE INDEX onbind_outbox_destination ON onbind_outbox (destination, state, next_attempt_ts);

-- Backoff per homeserver: a homeserver that does not answer is backed off as a whole and probed
-- one request at a time; a row exists only for a homeserver that failed at least once.
CREATE TABLE onbind_destinations (
    destination TEXT PRIMARY KEY,
    failures INTEGER NOT NULL DEFAULT 0,
    retry_at BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    last_failure_ts BIGINT,
    last_success_ts BIGINT
);
CREATE INDEX onbind_destinations_failing ON onbind_destinations (failures, retry_at);
