-- 3PID invites and the durable outbox of onbind notifications.

-- One row per store-invite call. state: pending (waiting for the address to be bound),
-- bound (resolved to the user who bound it), expired (resolved to the inviteExpired user).
-- An invite leaves "pending" exactly once (UPDATE ... WHERE state = 'pending').
CREATE TABLE invites (
    id TEXT PRIMARY KEY,
    token TEXT NOT NULL UNIQUE,
    medium TEXT NOT NULL,
    address TEXT NOT NULL,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    display_name TEXT NOT NULL,
    ephemeral_public_key TEXT NOT NULL,
    -- The optional room/sender fields of store-invite, as a JSON object (for the email).
    details TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    state TEXT NOT NULL,
    resolved_mxid TEXT,
    resolved_ts BIGINT
);
CREATE INDEX invites_threepid ON invites (medium, address, state);
CREATE INDEX invites_state_created ON invites (state, created_ts);
CREATE INDEX invites_ephemeral_key ON invites (ephemeral_public_key);

-- onbind requests to deliver. state: pending, delivered, failed. A worker claims due rows by
-- setting claimed_until (a lease); a crashed worker's rows become due again when it passes.
CREATE TABLE onbind_outbox (
    id TEXT PRIMARY KEY,
    invite_id TEXT NOT NULL REFERENCES invites (id),
    destination TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    next_attempt_ts BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed_until BIGINT,
    last_error TEXT,
    delivered_ts BIGINT
);
CREATE INDEX onbind_outbox_due ON onbind_outbox (state, next_attempt_ts);
CREATE INDEX onbind_outbox_invite ON onbind_outbox (invite_id);
