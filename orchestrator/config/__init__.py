"""Profiles and the YAML reader (line-numbered errors)."""
