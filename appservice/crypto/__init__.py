"""Keys, signatures and hashes."""
