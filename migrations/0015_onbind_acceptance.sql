-- Onbind accepted at most once. The onbind's `signed` block is signed with the invite's ephemeral
-- key only, so the homeserver accepts it only if pubkey/ephemeral/isvalid says the key is valid.
-- After the invite is resolved that is so only while its onbind is in flight (claimed or tried,
-- not yet delivered), and only for delivery.acceptance_window after the first such check: the time
-- of that first check. A repeat of the onbind later (a crashed sender's row sent again) is
-- refused by the homeserver. NULL: not checked since the invite was resolved.
ALTER TABLE invites ADD COLUMN ephemeral_checked_ts BIGINT;
