"""Replacement modules and module surgery."""
