"""Background jobs: onbind delivery, invite expiry."""
