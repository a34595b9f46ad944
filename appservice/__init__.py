"""Matrix identity server and application service."""

__version__ = "0.1.0"
