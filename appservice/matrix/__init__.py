"""The Matrix application service (mautrix): the homeserver's side door into this process."""
