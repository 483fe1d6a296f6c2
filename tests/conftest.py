"""Test setup: the environment (Triton interpreter on CPU, hub offline) and the `gpu` skip are in the
repository's root conftest.py, shared with benchmarks/; tests import their fixtures from helpers.py."""
