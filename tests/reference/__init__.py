"""Tests of mhsa_core.reference (a package: test file names repeat across tests/
folders)."""
