"""Typed preflight configuration (``cluster.preflight``): node health checks before a long run starts.

GPU diagnostics (DCGM, else NVML), an all-reduce bandwidth test across all nodes and between node
pairs compared with the instance type's expected bandwidth, and the EFA device count; nodes that
fail are drained and the job requeues without them (cluster.healthcheck, docs/preflight.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from configs.errors import AddProblem


@dataclass
class PreflightConfig:
    enabled: Optional[bool] = None  # null: on for Slurm/HyperPod clusters, off for cluster=local
    time_budget_s: int = 180  # every check together must finish within this
    gpu_diag_level: int = 1  # dcgmi diag -r 1 (quick) or 2 (medium); 0: NVML checks only
    bandwidth_check: bool = True  # all-reduce bandwidth across nodes and between node pairs
    min_bandwidth_fraction: float = 0.5  # a node or link below this fraction of the expected bandwidth fails
    quarantine: bool = True  # drain failing nodes and requeue the job without them
    # Gbit/s per node for clusters the catalogue (cluster.bandwidth) lacks; null: the catalogue by
    # instance type, or without one the median of the measured peers
    expected_gbps: Optional[float] = None
    # more failing nodes than this share looks like a software or configuration problem, not broken
    # nodes: nothing is drained and the job stops instead
    max_quarantine_fraction: float = 0.5
    max_requeues: int = 3  # preflight requeues per run; then the job stops instead of draining more nodes
    # HyperPod only: mark failing nodes for replacement (state=fail reason="Action:Replace", needs Slurm
    # admin rights) instead of draining them
    hyperpod_replace: bool = False


def check(cfg: PreflightConfig, add: AddProblem) -> None:
    if cfg.time_budget_s <= 0:
        add("cluster.preflight.time_budget_s", cfg.time_budget_s, "must be a positive number of seconds")
    elif cfg.time_budget_s < 30:
        add("cluster.preflight.time_budget_s", cfg.time_budget_s,
            "needs at least 30 s (start-up, GPU checks and one bandwidth round); 180 is the default")
    if cfg.gpu_diag_level not in (0, 1, 2):
        add("cluster.preflight.gpu_diag_level", cfg.gpu_diag_level, "must be 0 (NVML only), 1 or 2 (dcgmi diag -r)")
    if not 0 < cfg.min_bandwidth_fraction <= 1:
        add("cluster.preflight.min_bandwidth_fraction", cfg.min_bandwidth_fraction, "must be in (0, 1], e.g. 0.5")
    if cfg.expected_gbps is not None and cfg.expected_gbps <= 0:
        add("cluster.preflight.expected_gbps", cfg.expected_gbps,
            "must be a positive line rate in Gbit/s per node (e.g. 400), or null for the catalogue / median")
    if not 0 < cfg.max_quarantine_fraction <= 1:
        add("cluster.preflight.max_quarantine_fraction", cfg.max_quarantine_fraction, "must be in (0, 1], e.g. 0.5")
    if cfg.max_requeues < 0:
        add("cluster.preflight.max_requeues", cfg.max_requeues, "must be 0 or more")
