"""Time to train: ideal, planned and expected duration, GPU-hours, cost and a schedule of Slurm jobs.

A long run is a chain of jobs, each at most the cluster's time limit (HyperPod presets:
2 days), chained with ``depends_on`` and resumed from the last checkpoint. Three durations:

* **ideal**: steps x step time, the arithmetic of the predicted step;
* **planned**: + each job's start (``FailureModel.restart_s``: start-up and checkpoint load) and
  the stall of every checkpoint save (``FailureModel.checkpoint_stall_s``);
* **expected**: + failures at ``FailureModel.failures_per_gpu_hour`` (memory_predictor.failures:
  detection, restart and the work redone since the last save), with Young's checkpoint
  interval for that rate as a suggestion.

Cost needs a price per node-hour: prices change and HyperPod ``ml.*`` prices differ from
EC2's, so none is assumed.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass

from memory_predictor.errors import PredictorError, Problem, raise_if
from memory_predictor.failures import FailureModel, Interruptions, expected_factor, mtbf_s, never_finishes, \
    young_interval_s

MILESTONES = (0.10, 0.25, 0.50, 0.75, 0.90, 1.00)


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
class Milestone:
    """When a fraction of the run's tokens is done (hours since the first job started)."""

    fraction: float
    step: int
    tokens: int
    ideal_hours: float
    planned_hours: float
    expected_hours: float


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    tokens: int
    steps: int
    nodes: int
    gpus: int
    step_time_s: float
    tokens_per_s: float
    duration_s: float  # planned: steps + job starts + checkpoint stalls, no failures
    gpu_hours: float  # of the planned duration
    node_hours: float
    price_per_node_hour: float | None
    cost: float | None
    checkpoint_interval_steps: int
    job_hours: float
    phases: tuple[Phase, ...]
    ideal_s: float  # steps x step time
    expected_s: float  # planned + expected time lost to failures
    expected_gpu_hours: float
    expected_cost: float | None
    interruptions: Interruptions
    milestones: tuple[Milestone, ...]

    @property
    def duration_days(self) -> float:
        return self.duration_s / 86400.0

    @property
    def ideal_days(self) -> float:
        return self.ideal_s / 86400.0

    @property
    def expected_days(self) -> float:
        return self.expected_s / 86400.0

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.update(duration_days=self.duration_days, ideal_days=self.ideal_days, expected_days=self.expected_days)
        return out


def _schedule(total_steps: int, step_time_s: float, interval: int, job_hours: float, failures: FailureModel,
              nodes: int, tokens_per_step: int) -> tuple[list[Phase], float]:
    restart, stall = failures.restart_s, failures.checkpoint_stall_s
    budget = job_hours * 3600.0 - restart - stall  # the final save of each job
    # steps per job: the job must also absorb its checkpoint stalls
    per_job = max(1, int(budget // (step_time_s + stall / interval)))
    phases: list[Phase] = []
    step, clock = 0, 0.0
    while step < total_steps:
        first, last = step + 1, min(total_steps, step + per_job)
        saves = tuple(range(-(-first // interval) * interval, last + 1, interval))
        saves = saves if saves and saves[-1] == last else (*saves, last)
        duration = restart + (last - first + 1) * step_time_s + len(saves) * stall
        phases.append(Phase(index=len(phases) + 1, nodes=nodes, first_step=first, last_step=last,
                            tokens=(last - first + 1) * tokens_per_step, start_hours=clock / 3600.0,
                            duration_hours=duration / 3600.0, checkpoint_steps=saves))
        step, clock = last, clock + duration
    return phases, clock


def planned_seconds_at(phases: list[Phase] | tuple[Phase, ...], step: int, step_time_s: float,
                       failures: FailureModel) -> float:
    """Wall-clock seconds (without failures) at which ``step`` is done, its save included."""
    index = bisect.bisect_left([p.last_step for p in phases], step)
    phase = phases[min(index, len(phases) - 1)]
    saves = bisect.bisect_right(phase.checkpoint_steps, step)
    return (phase.start_hours * 3600.0 + failures.restart_s + (step - phase.first_step + 1) * step_time_s
            + saves * failures.checkpoint_stall_s)


def make_plan(*, step_time_s: float, global_batch: int, seq_length: int, nodes: int, gpus_per_node: int,
              tokens: int | None = None, steps: int | None = None, price_per_node_hour: float | None = None,
              checkpoint_interval_steps: int | None = None, job_hours: float = 48.0,
              failures: FailureModel | None = None) -> TrainingPlan:
    """The run split into jobs of at most ``job_hours``; checkpoints every N steps (default ~1 h)."""
    failures = failures if failures is not None else FailureModel()
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
    problems += failures.problems()
    raise_if(problems)
    tokens_per_step = global_batch * seq_length
    total_steps = steps if steps is not None else max(1, math.ceil((tokens or 0) / tokens_per_step))
    interval = checkpoint_interval_steps or max(1, int(3600 // step_time_s))
    gpus = nodes * gpus_per_node
    phases, planned = _schedule(total_steps, step_time_s, interval, job_hours, failures, nodes, tokens_per_step)

    mtbf = mtbf_s(failures.failures_per_gpu_hour, gpus)
    detection = failures.detection_for(step_time_s)

    def expected(interval_steps: int, planned_s: float) -> tuple[float, float]:
        cost = detection + failures.restart_s + interval_steps * step_time_s / 2
        return cost, planned_s * expected_factor(cost, mtbf)

    cost, expected_s = expected(interval, planned)
    if math.isinf(expected_s):
        raise PredictorError([never_finishes(failures, gpus, cost)])
    suggested_s = suggested_steps = at_suggested = None
    if math.isfinite(mtbf):
        suggested_s = young_interval_s(failures.checkpoint_stall_s, mtbf)
        suggested_steps = max(1, round(suggested_s / step_time_s))
        _, planned_suggested = _schedule(total_steps, step_time_s, suggested_steps, job_hours, failures, nodes,
                                         tokens_per_step)
        at_suggested = expected(suggested_steps, planned_suggested)[1]
    saves = sum(len(p.checkpoint_steps) for p in phases)
    interruptions = Interruptions(
        failures_per_gpu_hour=failures.failures_per_gpu_hour, gpus=gpus,
        mtbf_hours=mtbf / 3600.0 if math.isfinite(mtbf) else None,
        expected_failures=expected_s / mtbf if math.isfinite(mtbf) else 0.0, detection_s=detection,
        restart_s=failures.restart_s, redo_s=interval * step_time_s / 2, cost_per_failure_s=cost,
        lost_to_failures_s=expected_s - planned, checkpoint_saves=saves,
        checkpoint_stall_s=failures.checkpoint_stall_s, checkpoint_stalls_s=saves * failures.checkpoint_stall_s,
        job_starts=len(phases), job_starts_s=len(phases) * failures.restart_s,
        checkpoint_interval_s=interval * step_time_s, suggested_interval_s=suggested_s,
        suggested_interval_steps=suggested_steps, expected_s_at_suggested=at_suggested)
    factor = expected_s / planned if planned else 1.0
    milestones = []
    for fraction in MILESTONES:
        step = max(1, math.ceil(fraction * total_steps))
        at = planned_seconds_at(phases, step, step_time_s, failures)
        milestones.append(Milestone(fraction=fraction, step=step, tokens=step * tokens_per_step,
                                    ideal_hours=step * step_time_s / 3600.0, planned_hours=at / 3600.0,
                                    expected_hours=at * factor / 3600.0))
    node_hours = planned / 3600.0 * nodes
    expected_node_hours = expected_s / 3600.0 * nodes
    return TrainingPlan(tokens=total_steps * tokens_per_step, steps=total_steps, nodes=nodes, gpus=gpus,
                        step_time_s=step_time_s, tokens_per_s=tokens_per_step / step_time_s, duration_s=planned,
                        gpu_hours=node_hours * gpus_per_node, node_hours=node_hours,
                        price_per_node_hour=price_per_node_hour,
                        cost=node_hours * price_per_node_hour if price_per_node_hour is not None else None,
                        checkpoint_interval_steps=interval, job_hours=job_hours, phases=tuple(phases),
                        ideal_s=total_steps * step_time_s, expected_s=expected_s,
                        expected_gpu_hours=expected_node_hours * gpus_per_node,
                        expected_cost=(expected_node_hours * price_per_node_hour
                                       if price_per_node_hour is not None else None),
                        interruptions=interruptions, milestones=tuple(milestones))
