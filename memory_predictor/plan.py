"""Time to train: duration, GPU-hours, cost and a schedule of Slurm job segments.

A long run is a chain of jobs, each at most the cluster's time limit (HyperPod presets:
2 days), chained with ``depends_on`` and resumed from the last checkpoint. Each segment pays
``RESTART_OVERHEAD_S`` (start-up and checkpoint load) and every checkpoint save stalls
training for ``CHECKPOINT_STALL_S`` (asynchronous saves: only the copy to host memory).
Cost needs a price per node-hour: prices change and HyperPod ``ml.*`` prices differ from
EC2's, so none is assumed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from memory_predictor import constants as C
from memory_predictor.errors import Problem, raise_if


@dataclass(frozen=True, slots=True)
class Phase:
    """One Slurm job of the run."""

    index: int
    nodes: int
    first_step: int  # 1-based, inclusive
    last_step: int
    tokens: int
    start_hours: float  # since the first job started
    duration_hours: float
    checkpoint_steps: tuple[int, ...]  # saves in this job (the last step is always saved)


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    tokens: int
    steps: int
    nodes: int
    gpus: int
    step_time_s: float
    tokens_per_s: float
    duration_s: float  # wall clock including restarts and checkpoint stalls
    gpu_hours: float
    node_hours: float
    price_per_node_hour: float | None
    cost: float | None
    checkpoint_interval_steps: int
    job_hours: float
    phases: tuple[Phase, ...]

    @property
    def duration_days(self) -> float:
        return self.duration_s / 86400.0

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["duration_days"] = self.duration_days
        return out


def make_plan(*, step_time_s: float, global_batch: int, seq_length: int, nodes: int, gpus_per_node: int,
              tokens: int | None = None, steps: int | None = None, price_per_node_hour: float | None = None,
              checkpoint_interval_steps: int | None = None, job_hours: float = 48.0) -> TrainingPlan:
    """The run split into jobs of at most ``job_hours``; checkpoints every N steps (default ~1 h)."""
    problems: list[Problem] = []
    if (tokens is None) == (steps is None):
        problems.append(Problem("tokens", tokens, "give exactly one of --tokens and --steps"))
    for name, value in (("tokens", tokens), ("steps", steps), ("checkpoint_every_steps", checkpoint_interval_steps)):
        if value is not None and value <= 0:
            problems.append(Problem(name, value, "must be a positive integer"))
    if not job_hours > 0:
        problems.append(Problem("job_hours", job_hours, "must be > 0 (the Slurm time limit of one job, in hours)"))
    if price_per_node_hour is not None and price_per_node_hour < 0:
        problems.append(Problem("price_per_node_hour", price_per_node_hour, "must be >= 0"))
    raise_if(problems)
    tokens_per_step = global_batch * seq_length
    total_steps = steps if steps is not None else max(1, math.ceil((tokens or 0) / tokens_per_step))
    interval = checkpoint_interval_steps or max(1, int(3600 // step_time_s))
    budget = job_hours * 3600.0 - C.RESTART_OVERHEAD_S - C.CHECKPOINT_STALL_S  # the final save of each job
    # steps per job: the job must also absorb its checkpoint stalls
    per_job = max(1, int(budget // (step_time_s + C.CHECKPOINT_STALL_S / interval)))
    phases: list[Phase] = []
    step, clock = 0, 0.0
    while step < total_steps:
        first, last = step + 1, min(total_steps, step + per_job)
        saves = tuple(s for s in range(first, last + 1) if s % interval == 0 or s == last)
        duration = C.RESTART_OVERHEAD_S + (last - first + 1) * step_time_s + len(saves) * C.CHECKPOINT_STALL_S
        phases.append(Phase(index=len(phases) + 1, nodes=nodes, first_step=first, last_step=last,
                            tokens=(last - first + 1) * tokens_per_step, start_hours=clock / 3600.0,
                            duration_hours=duration / 3600.0, checkpoint_steps=saves))
        step, clock = last, clock + duration
    node_hours = clock / 3600.0 * nodes
    cost = node_hours * price_per_node_hour if price_per_node_hour is not None else None
    return TrainingPlan(tokens=total_steps * tokens_per_step, steps=total_steps, nodes=nodes,
                        gpus=nodes * gpus_per_node, step_time_s=step_time_s,
                        tokens_per_s=tokens_per_step / step_time_s, duration_s=clock,
                        gpu_hours=node_hours * gpus_per_node, node_hours=node_hours,
                        price_per_node_hour=price_per_node_hour, cost=cost,
                        checkpoint_interval_steps=interval, job_hours=job_hours, phases=tuple(phases))
