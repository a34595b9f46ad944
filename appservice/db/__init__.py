"""Storage: SQL only, one module per table family, results as frozen dataclasses."""
