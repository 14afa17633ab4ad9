"""Multi-node tests use the 3-node Slurm of tests/multinode_cluster.py (started on first use)."""

from tests.multinode_cluster import multinode, multinode_session  # noqa: F401  (fixtures)
