"""Tests of mhsa_core.convert (a package: test file names repeat across tests/
folders)."""
