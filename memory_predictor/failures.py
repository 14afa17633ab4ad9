"""Interruptions in a time-to-train plan: how often, what each costs, and the checkpoint interval.

A synchronous job of G GPUs stops whenever any of them fails. With a failure rate r per
GPU-hour (default: Llama 3's unexpected interruptions, ``constants.FAILURES_PER_GPU_HOUR``) the
job fails every MTBF = 1 / (r G) hours, and each failure costs

    c = detection + restart (start-up and checkpoint reload) + work redone since the last save,

the last on average half a checkpoint interval. Failures come at random moments of the wall
clock T, so T = P + (T / MTBF) c, i.e. the expected duration

    T = P / (1 - c / MTBF)             P = the plan without failures (steps, saves, job starts)

which needs c < MTBF (otherwise the run never finishes: refused as a bad input). The checkpoint
interval trades the stall of each save (d seconds) against the work a failure throws away;
the expected loss per unit of work d / tau + tau / (2 MTBF) is smallest at Young's interval
tau = sqrt(2 d MTBF) (Young 1974; Daly 2006 gives it as the first-order optimum).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from memory_predictor import constants as C
from memory_predictor.errors import Problem


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureModel:
    """How often a job is interrupted and what one interruption and one checkpoint save cost."""

    #: Failures per GPU-hour; 0 = a plan without failures.
    failures_per_gpu_hour: float = C.FAILURES_PER_GPU_HOUR
    #: Seconds until a failure is noticed; None = the hang watchdog's max(10 x step, 300 s).
    detection_s: float | None = None
    #: Seconds to start again: scheduling, container, NCCL init, data, checkpoint reload.
    restart_s: float = C.RESTART_OVERHEAD_S
    #: Seconds training stalls per checkpoint save (asynchronous saves: the copy to host memory).
    checkpoint_stall_s: float = C.CHECKPOINT_STALL_S
    #: The hang watchdog's rule when ``detection_s`` is None: max(factor x step, floor)
    #: (``resilience.step_factor`` and ``resilience.floor_s``).
    detection_step_factor: float = C.DETECTION_STEP_FACTOR
    detection_floor_s: float = C.DETECTION_FLOOR_S

    @classmethod
    def for_device(cls, gpu: str, **overrides: float | None) -> "FailureModel":
        """The defaults of this device (CPU runs restart and save in seconds, not minutes); ``None``
        overrides keep the default."""
        base = cls(restart_s=C.CPU_RESTART_S, checkpoint_stall_s=C.CPU_CHECKPOINT_STALL_S) if gpu == "cpu" else cls()
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **given) if given else base  # type: ignore[arg-type]

    def detection_for(self, step_time_s: float) -> float:
        if self.detection_s is not None:
            return self.detection_s
        return max(self.detection_step_factor * step_time_s, self.detection_floor_s)

    def problems(self) -> list[Problem]:
        out = []
        for name, value in (("failures_per_gpu_hour", self.failures_per_gpu_hour), ("detection_s", self.detection_s),
                            ("restart_s", self.restart_s), ("checkpoint_stall_s", self.checkpoint_stall_s),
                            ("detection_step_factor", self.detection_step_factor),
                            ("detection_floor_s", self.detection_floor_s)):
            if value is not None and not (value >= 0 and math.isfinite(value)):
                out.append(Problem(name, value, "must be a finite number >= 0"))
        return out


@dataclass(frozen=True, slots=True)
class Interruptions:
    """The expected cost of failures and checkpoints over one plan (seconds unless named)."""

    failures_per_gpu_hour: float
    gpus: int
    mtbf_hours: float | None  # None without failures
    expected_failures: float
    detection_s: float
    restart_s: float
    redo_s: float  # work redone per failure: half a checkpoint interval on average
    cost_per_failure_s: float
    lost_to_failures_s: float
    checkpoint_saves: int
    checkpoint_stall_s: float  # per save
    checkpoint_stalls_s: float  # all saves
    job_starts: int
    job_starts_s: float
    checkpoint_interval_s: float  # of training between two saves
    suggested_interval_s: float | None  # Young: sqrt(2 x stall x MTBF); None without failures
    suggested_interval_steps: int | None
    expected_s_at_suggested: float | None  # the expected duration with the suggested interval

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def mtbf_s(failures_per_gpu_hour: float, gpus: int) -> float:
    """Mean time between failures of a job on ``gpus`` GPUs (inf without failures)."""
    rate = failures_per_gpu_hour * gpus
    return 3600.0 / rate if rate > 0 else math.inf


def young_interval_s(save_cost_s: float, mtbf: float) -> float:
    """Young's checkpoint interval sqrt(2 x save cost x MTBF): the minimum of d / tau + tau / (2 MTBF)."""
    return math.sqrt(2.0 * save_cost_s * mtbf)


def expected_factor(cost_per_failure_s: float, mtbf: float) -> float:
    """T / P = 1 / (1 - c / MTBF); inf when failures come faster than one recovers."""
    loss = cost_per_failure_s / mtbf
    return 1.0 / (1.0 - loss) if loss < 1.0 else math.inf


def never_finishes(model: FailureModel, gpus: int, cost_per_failure_s: float) -> Problem:
    mtbf = mtbf_s(model.failures_per_gpu_hour, gpus)
    return Problem("failures_per_gpu_hour", model.failures_per_gpu_hour,
                   f"on {gpus} GPUs a failure comes every {mtbf / 3600:.2g} h, sooner than one costs "
                   f"({cost_per_failure_s / 3600:.2g} h: detection, restart, half a checkpoint interval): the run "
                   "never finishes; use a lower rate, a shorter checkpoint interval or fewer GPUs")


__all__ = ["FailureModel", "Interruptions", "mtbf_s", "young_interval_s", "expected_factor", "never_finishes"]
