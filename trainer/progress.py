"""Progress of a run: tokens consumed of the total, the ETA, and the schedule's milestones.

The ETA divides the remaining steps by a smoothed rate of *wall time per step* measured between
consecutive step ends, so it includes what a step costs beyond its compute (checkpoint stalls,
validation, logging) and converges to the real end as the run goes. A restarted run starts a new
estimate from its own steps; the elapsed time includes the earlier attempts (the goodput ledger's
total) and the downtime between them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

MILESTONES = (10, 25, 50, 75, 90, 100)
_ALPHA = 0.1  # exponential smoothing of the wall time per step


@dataclass(frozen=True)
class Notice:
    """Something operators should hear about (a milestone, a restart, the plan drifting)."""

    kind: str  # milestone | restart | plan_drift | plan
    title: str  # stable per kind of event (alerts are rate-limited by title)
    text: str
    level: str = "INFO"  # INFO | WARN | ERROR


@dataclass(frozen=True)
class RunProgress:
    """Rank 0's view of the whole run at one step: progress, the goodput ledger and the plan."""

    step: int
    tokens_done: int
    tokens_total: int
    fraction: float
    eta_s: Optional[float]
    elapsed_s: float  # wall time since the first attempt started (restarts and downtime included)
    goodput: float  # productive / total booked wall time
    seconds: dict[str, float]  # the ledger: wall seconds per category (trainer.goodput.CATEGORIES)
    tokens_per_gpu_hour: float
    attempts: int
    redone_steps: int
    milestone: Optional[int] = None  # the highest milestone (percent) reached so far
    cost_usd: Optional[float] = None
    projected_cost_usd: Optional[float] = None
    last_restart_lost_s: Optional[float] = None  # detection + restart + reload + redone work of the last restart
    plan_step_time_ratio: Optional[float] = None  # measured / predicted (prediction.json)
    plan_memory_ratio: Optional[float] = None


@dataclass(frozen=True)
class ProgressReport:
    tokens_done: int
    tokens_total: int
    fraction: float
    eta_s: Optional[float]  # None until a rate is known
    elapsed_s: float
    milestone: Optional[int] = None  # a milestone (percent) crossed at this step


class Progress:
    def __init__(self, total_steps: int, tokens_per_step: int, start_step: int, elapsed_before_s: float,
                 milestones_done: tuple[int, ...] = (), now: Optional[float] = None) -> None:
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.started = now or time.time()
        self.elapsed_before = elapsed_before_s
        self.last_end: Optional[float] = None
        self.rate: Optional[float] = None  # smoothed wall seconds per step
        self.done = set(milestones_done)
        self.last_step = start_step

    def update(self, step: int, now: Optional[float] = None) -> ProgressReport:
        now = now or time.time()
        if self.last_end is not None and step > self.last_step:
            per_step = (now - self.last_end) / (step - self.last_step)
            self.rate = per_step if self.rate is None else (1 - _ALPHA) * self.rate + _ALPHA * per_step
        self.last_end, self.last_step = now, step
        fraction = step / self.total_steps if self.total_steps else 1.0
        crossed = [m for m in MILESTONES if m not in self.done and 100.0 * fraction >= m]
        self.done.update(crossed)
        eta = (self.total_steps - step) * self.rate if self.rate is not None else None
        return ProgressReport(tokens_done=step * self.tokens_per_step,
                              tokens_total=self.total_steps * self.tokens_per_step, fraction=fraction,
                              eta_s=eta, elapsed_s=self.elapsed_before + (now - self.started),
                              milestone=max(crossed) if crossed else None)
