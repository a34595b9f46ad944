-- 3PID validation sessions and rate-limit counters.

-- One session per (medium, address, client_secret); only a SHA-256 of the token is stored.
-- modified_ts is the last change (creation or validation); the session lives for
-- session.lifetime after it.
CREATE TABLE validation_sessions (
    sid TEXT PRIMARY KEY,
    medium TEXT NOT NULL,
    address TEXT NOT NULL,
    client_secret TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    send_attempt BIGINT NOT NULL,
    next_link TEXT,
    created_ts BIGINT NOT NULL,
    modified_ts BIGINT NOT NULL,
    validated_ts BIGINT,
    failed_attempts INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX validation_sessions_key ON validation_sessions (medium, address, client_secret);
CREATE INDEX validation_sessions_modified ON validation_sessions (modified_ts);

-- Fixed-window counters; bucket is a hash of what is limited (no plain addresses stored).
CREATE TABLE rate_limits (
    bucket TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    hits INTEGER NOT NULL,
    expires_ts BIGINT NOT NULL,
    PRIMARY KEY (bucket, window_start)
);
CREATE INDEX rate_limits_expires ON rate_limits (expires_ts);
