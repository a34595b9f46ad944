-- The long-term key an invite was stored under (the one store-invite answered): its onbind is
-- signed with that key, so a `keys rotate` in between does not break the invite. NULL for invites
-- stored before this column existed; they are signed with the current key.
ALTER TABLE invites ADD COLUMN signing_key_id TEXT;
