-- The application service: transactions already handled, and actions on invites to perform.

-- Transactions from the homeserver, by txnId: a retried transaction is not processed twice,
-- also across restarts.
CREATE TABLE appservice_transactions (
    txn_id TEXT PRIMARY KEY,
    received_ts BIGINT NOT NULL
);
CREATE INDEX appservice_transactions_received ON appservice_transactions (received_ts);

-- What the inviteExpired user must do in a room (reject an invite, leave a room), recorded when
-- the homeserver tells us and performed by a job with retries. state: pending, done, failed.
CREATE TABLE appservice_actions (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    event_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    next_attempt_ts BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed_until BIGINT,
    last_error TEXT,
    done_ts BIGINT
);
CREATE UNIQUE INDEX appservice_actions_event ON appservice_actions (event_id, kind);
CREATE INDEX appservice_actions_due ON appservice_actions (state, next_attempt_ts);
