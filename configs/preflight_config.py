"""Typed preflight configuration (``cluster.preflight``): node health checks before a long run starts.

GPU diagnostics (DCGM, else NVML), an all-reduce bandwidth test across all nodes and between node
pairs compared with the instance type's expected bandwidth, and the EFA device count; nodes that
fail are drained and the job requeues without them (cluster.healthcheck).
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


def check(cfg: PreflightConfig, add: AddProblem) -> None:
    if cfg.time_budget_s <= 0:
        add("cluster.preflight.time_budget_s", cfg.time_budget_s, "must be a positive number of seconds")
    if cfg.gpu_diag_level not in (0, 1, 2):
        add("cluster.preflight.gpu_diag_level", cfg.gpu_diag_level, "must be 0 (NVML only), 1 or 2 (dcgmi diag -r)")
    if not 0 < cfg.min_bandwidth_fraction <= 1:
        add("cluster.preflight.min_bandwidth_fraction", cfg.min_bandwidth_fraction, "must be in (0, 1], e.g. 0.5")
