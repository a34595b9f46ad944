-- Who withdrew an invite through the bot (`!3pid withdraw`): the Matrix ID of the room member,
-- written in the transaction that resolves the invite to the inviteExpired user, and read when
-- that user's invite arrives, for the rejection reason. NULL: expired, or withdrawn by the
-- operator.
ALTER TABLE invites ADD COLUMN withdrawn_by TEXT;
