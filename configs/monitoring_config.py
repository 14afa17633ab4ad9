"""Typed monitoring configuration (the ``monitoring`` group) and its load-time checks.

Secrets (``WANDB_API_KEY``) never live here: W&B reads them from the environment, which the
sbatch script forwards by name (``cluster.secret_env``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from configs.errors import AddProblem

WANDB_MODES = ("online", "offline")
NODE_EXPORTER_MODES = ("auto", "on", "off")
_URL = re.compile(r"^https?://[^\s/'\"]+(:\d+)?(/\S*)?$")


@dataclass
class StragglerConfig:
    """Per-rank compute-time comparison (see monitoring.straggler)."""

    enabled: bool = True
    interval_steps: int = 10  # ranks exchange window medians every N steps (one tiny all-gather)
    warmup_steps: int = 10  # steps ignored at the start (allocator warm-up, first compiles)
    raise_score: float = 0.93  # flag a rank when its score stays below this (about 7.5% slower)...
    clear_score: float = 0.96  # ...and clear it when it stays at or above this (hysteresis)
    consecutive: int = 2  # ...for this many intervals in a row
    peer_tolerance: float = 0.03  # healthy GPUs differ by up to this much: relative score / (1 - this)
    throughput_drop: float = 0.2  # flag the job when tokens/s falls this fraction below its baseline
    baseline_intervals: int = 30  # the baseline is the median of the better half of the last N windows


@dataclass
class AlertConfig:
    """W&B alerts: rate limits and what a failure alert carries."""

    min_interval_s: float = 600.0  # same alert title at most once per this many seconds
    max_per_hour: int = 20  # all titles together (job failed/finished are never dropped)
    log_tail_lines: int = 20
    failure_ack_timeout_s: float = 15.0  # a failing rank waits this long for rank 0 to report it


@dataclass
class PlanCheckConfig:
    """Plan vs actual: the run's step time and peak memory against its own prediction.json."""

    enabled: bool = True
    warmup_steps: int = 5  # steps of each attempt not compared (first compiles, allocator warm-up)
    window_steps: int = 20  # compare the median of every window of this many steps
    step_time_band: float = 0.25  # drift when measured / predicted step time leaves [1/(1+band), 1+band]
    memory_low: float = 0.5  # drift when measured / predicted peak memory is below this ("far below")...
    memory_high: float = 1.10  # ...or above this (out-of-memory risk)
    data_wait_share: float = 0.15  # a likely cause when ranks wait this share of a step for batches
    straggler_ratio: float = 1.15  # a likely cause when one rank computes this much longer than the median


@dataclass
class MonitoringConfig:
    prometheus: bool = False  # per-rank exporters + one node exporter (GPU/EFA) per node
    port_base: int = 9450  # node exporter on port_base, rank r on port_base + 1 + local_rank
    bind_address: str = "0.0.0.0"
    targets_dir: Optional[str] = None  # file_sd target files; default <runs_root>/prometheus-targets
    scrape_interval_s: float = 15.0  # written into the generated prometheus.yml
    pushgateway_url: Optional[str] = None  # e.g. http://head-node:9091: job state survives the job
    push_interval_s: float = 30.0
    final_scrape_grace_s: float = 0.0  # a failing rank keeps serving this long so its state is scraped
    node_exporter: str = "auto"  # auto: reuse a DCGM/EFA exporter already on the node, else our own
    efa_sysfs_dir: str = "/sys/class/infiniband"
    dcgm_exporter_port: int = 9400  # HyperPod's exporters (probed by the node exporter in auto mode)
    efa_exporter_port: int = 9109
    wandb: bool = False
    wandb_project: Optional[str] = None  # default: the run name
    wandb_entity: Optional[str] = None
    wandb_mode: str = "online"  # online | offline (offline: sync later with `wandb sync <dir>`)
    wandb_dir: Optional[str] = None  # default: the run directory
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    plan: PlanCheckConfig = field(default_factory=PlanCheckConfig)

    @property
    def any_sink(self) -> bool:
        return self.prometheus or self.wandb or self.straggler.enabled


def check(cfg: MonitoringConfig, add: AddProblem) -> None:
    """Report every problem of this part through ``add(field, value, fix)``."""
    if cfg.wandb_project is not None and not cfg.wandb_project.strip():
        add("monitoring.wandb_project", cfg.wandb_project, "must not be empty; use null for the default")
    if cfg.wandb_mode not in WANDB_MODES:
        add("monitoring.wandb_mode", cfg.wandb_mode, f"must be one of {', '.join(WANDB_MODES)} "
            "(to turn W&B off set monitoring.wandb=false)")
    if cfg.node_exporter not in NODE_EXPORTER_MODES:
        add("monitoring.node_exporter", cfg.node_exporter, f"must be one of {', '.join(NODE_EXPORTER_MODES)}")
    for name in ("port_base", "dcgm_exporter_port", "efa_exporter_port"):
        port = getattr(cfg, name)
        if not 1 <= port <= 65535 - (9 if name == "port_base" else 0):
            add(f"monitoring.{name}", port, "must be a TCP port (1-65535); port_base needs room for "
                "the node exporter and one port per local rank above it")
    if cfg.pushgateway_url is not None and not _URL.match(cfg.pushgateway_url):
        add("monitoring.pushgateway_url", cfg.pushgateway_url,
            "must be an http(s) URL such as http://head-node:9091, or null")
    for name in ("scrape_interval_s", "push_interval_s"):
        if getattr(cfg, name) <= 0:
            add(f"monitoring.{name}", getattr(cfg, name), "must be > 0 seconds")
    if cfg.final_scrape_grace_s < 0 or cfg.final_scrape_grace_s > 300:
        add("monitoring.final_scrape_grace_s", cfg.final_scrape_grace_s, "must be between 0 and 300 seconds")
    _check_straggler(cfg.straggler, add)
    _check_alerts(cfg.alerts, add)
    _check_plan(cfg.plan, add)


def _check_plan(p: PlanCheckConfig, add: AddProblem) -> None:
    if p.warmup_steps < 0:
        add("monitoring.plan.warmup_steps", p.warmup_steps, "must be >= 0")
    if p.window_steps < 3:
        add("monitoring.plan.window_steps", p.window_steps, "must be >= 3 (a median needs a few steps)")
    if p.step_time_band <= 0:
        add("monitoring.plan.step_time_band", p.step_time_band, "must be > 0 (0.25: drift beyond +-25%)")
    if not 0 < p.memory_low < 1:
        add("monitoring.plan.memory_low", p.memory_low, "must be between 0 and 1 (0.5: half the predicted peak)")
    if p.memory_high <= 1:
        add("monitoring.plan.memory_high", p.memory_high, "must be > 1 (1.10: 10% above the predicted peak)")
    if not 0 < p.data_wait_share < 1:
        add("monitoring.plan.data_wait_share", p.data_wait_share, "must be between 0 and 1 (0.15: 15% of a step)")
    if p.straggler_ratio <= 1:
        add("monitoring.plan.straggler_ratio", p.straggler_ratio, "must be > 1 (1.15: 15% slower than the median)")


def _check_straggler(s: StragglerConfig, add: AddProblem) -> None:
    if s.interval_steps < 2:
        add("monitoring.straggler.interval_steps", s.interval_steps, "must be >= 2 (a window median needs steps)")
    if s.warmup_steps < 0:
        add("monitoring.straggler.warmup_steps", s.warmup_steps, "must be >= 0")
    if not 0 < s.raise_score < 1:
        add("monitoring.straggler.raise_score", s.raise_score, "must be between 0 and 1 (0.93: about 7.5% slower)")
    if not s.raise_score < s.clear_score <= 1:
        add("monitoring.straggler.clear_score", s.clear_score,
            f"must be above raise_score ({s.raise_score}) and at most 1, so a flag does not flap")
    if not 0 <= s.peer_tolerance < 0.5:
        add("monitoring.straggler.peer_tolerance", s.peer_tolerance, "must be between 0 and 0.5 (0.03: 3%)")
    if s.consecutive < 1:
        add("monitoring.straggler.consecutive", s.consecutive, "must be >= 1")
    if not 0 < s.throughput_drop < 1:
        add("monitoring.straggler.throughput_drop", s.throughput_drop, "must be between 0 and 1 (0.2: 20% slower)")
    if s.baseline_intervals < 2:
        add("monitoring.straggler.baseline_intervals", s.baseline_intervals, "must be >= 2")


def _check_alerts(a: AlertConfig, add: AddProblem) -> None:
    if a.min_interval_s < 0:
        add("monitoring.alerts.min_interval_s", a.min_interval_s, "must be >= 0 seconds")
    if a.max_per_hour < 1:
        add("monitoring.alerts.max_per_hour", a.max_per_hour, "must be >= 1")
    if not 0 <= a.log_tail_lines <= 200:
        add("monitoring.alerts.log_tail_lines", a.log_tail_lines, "must be between 0 and 200")
    if a.failure_ack_timeout_s < 0:
        add("monitoring.alerts.failure_ack_timeout_s", a.failure_ack_timeout_s, "must be >= 0 seconds")
