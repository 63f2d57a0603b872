"""Helpers shared by the test suite (no fixtures, no mocks)."""
