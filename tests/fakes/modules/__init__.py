"""Fake A1111 ``modules`` package for tests (see tests/fakes/README.md)."""
