"""Typed resilience configuration (the ``resilience`` group): the hang watchdog and in-job restarts.

A per-node watchdog (cluster.watchdog) reads the ranks' heartbeats (cluster.heartbeat). When no
rank has progressed for ``max(step_factor x the median step time, floor_s)`` -- ``startup_s``
while starting, loading or saving a checkpoint, validating or exporting -- it names the ranks
that stopped, dumps their stacks into the run directory and ends the worker group; torchrun
restarts it in the same allocation (up to ``max_restarts`` times) and training resumes from the
last committed checkpoint. A host named in ``max_hangs_per_host`` hangs is drained and the job
requeued without it, so the scheduler (or HyperPod) can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.errors import AddProblem


@dataclass
class ResilienceConfig:
    watchdog: bool = True  # a hang watchdog per node (off for local runs unless set)
    max_restarts: int = 3  # torchrun --max-restarts: in-job restarts of the worker group
    step_factor: float = 10.0  # a hang: no progress for step_factor x the median step time...
    floor_s: float = 300.0  # ...and at least this long
    startup_s: float = 1800.0  # allowance while starting, loading or saving a checkpoint, validating, exporting
    poll_s: float = 5.0  # how often the watchdog looks
    max_hangs_per_host: int = 2  # a host named in this many hangs is drained and the job requeued without it
    stack_dumps: bool = True  # py-spy (or faulthandler) stacks of the stopped ranks into <run dir>/hangs/
    collective_timeout_s: float = 600.0  # NCCL/gloo: a collective whose peer never arrives fails after this


def check(cfg: ResilienceConfig, add: AddProblem) -> None:
    if cfg.max_restarts < 0:
        add("resilience.max_restarts", cfg.max_restarts, "must be >= 0 (0: a hang or a failed rank ends the job)")
    if cfg.step_factor < 1:
        add("resilience.step_factor", cfg.step_factor, "must be >= 1 (e.g. 10: ten median steps without progress)")
    if cfg.floor_s <= 0:
        add("resilience.floor_s", cfg.floor_s, "must be > 0 seconds")
    if cfg.startup_s < cfg.floor_s:
        add("resilience.startup_s", cfg.startup_s, f"must be at least resilience.floor_s ({cfg.floor_s})")
    if not 0 < cfg.poll_s <= cfg.floor_s:
        add("resilience.poll_s", cfg.poll_s, f"must be > 0 and at most resilience.floor_s ({cfg.floor_s})")
    if not 30 <= cfg.collective_timeout_s <= 24 * 3600:
        add("resilience.collective_timeout_s", cfg.collective_timeout_s, "must be between 30 s and a day (600: "
            "the PyTorch default for NCCL); the hang watchdog, not this timeout, should end a hang")
    if cfg.max_hangs_per_host < 1:
        add("resilience.max_hangs_per_host", cfg.max_hangs_per_host, "must be >= 1")
