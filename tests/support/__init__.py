"""Fixtures and helpers that start real components for the tests."""
