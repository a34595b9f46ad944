"""The rules of the identity server, one module per concept; no HTTP here."""
