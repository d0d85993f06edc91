"""Helpers for the tests that are not tests themselves (importable as `support` from tests/)."""
