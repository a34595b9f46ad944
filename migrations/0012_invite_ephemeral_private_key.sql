-- The ephemeral private key store-invite generated (unpadded base64 of the ed25519 seed). The
-- invite email carries it to the invitee, whose client signs with it through sign-ed25519 (the
-- third-party invite flow). A secret: never logged, never listed; set to NULL when the invite is
-- resolved (bound or expired), as its public key is then revoked. NULL for invites stored before.
ALTER TABLE invites ADD COLUMN ephemeral_private_key TEXT;
