"""The Slurm client tests use the session fixture ``slurm`` from tests/conftest.py."""
