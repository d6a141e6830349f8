"""Tests of mhsa_core.layers (a package: test file names repeat across tests/
folders)."""
