"""Importers that move a live deployment of another identity server over (issue 18)."""
