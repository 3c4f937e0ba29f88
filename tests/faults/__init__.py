"""Fault tests: inputs an attacker or a broken machine could hand the package."""
