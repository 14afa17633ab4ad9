"""Where the run stands: progress and ETA, the goodput ledger, restarts and the plan, per step.

One ``RunTracker`` per rank, owned by the loop. Rank 0 keeps the ledger (trainer.goodput) and
the progress (trainer.progress) and hands a :class:`~trainer.progress.RunProgress` and any
notices (milestones, a restart and what it cost, plan drift) to the callbacks with every step;
every rank takes part in the plan check's one all-gather per window (trainer.plan_check).

A restart (torchrun's in-job restart or a Slurm requeue: a new process in the same run
directory) is told apart from a first start by the ledger file; what it cost is split into
``detection`` (the last progress to the watchdog's verdict, for a hang), ``down`` (to this
process's start), ``reload`` (process start to the first step: imports, build, checkpoint load)
and ``redone`` (steps trained again since the last commit).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from cluster.heartbeat import current_attempt, read_beats
from configs.schema import RootConfig
from trainer.goodput import CATEGORIES, GoodputLedger, process_start_time
from trainer.metrics import human_duration
from trainer.plan_check import Measured, PlanComparison, compare, read_prediction
from trainer.progress import Notice, Progress, RunProgress

HANGS_DIR = "hangs"  # cluster.watchdog's events: hangs/attempt-<a>.json
Gather = Callable[[list[float]], list[list[float]]]


@dataclass(frozen=True)
class RestartCost:
    attempt: int
    resumed_step: int
    detection_s: Optional[float]  # a hang: last progress -> the watchdog's verdict
    down_s: float  # the verdict (or the last progress) -> this process's start
    reload_s: float  # this process's start -> its first step
    redone_steps: int
    redone_s: float
    cause: str

    @property
    def lost_s(self) -> float:
        return (self.detection_s or 0.0) + self.down_s + self.reload_s + self.redone_s

    def line(self) -> str:
        parts = ([f"detection {self.detection_s:.1f} s"] if self.detection_s is not None else [])
        parts += [f"down {self.down_s:.1f} s", f"reload {self.reload_s:.1f} s",
                  f"redone {self.redone_steps} steps {self.redone_s:.1f} s"]
        return (f"restart: attempt {self.attempt} resumed after step {self.resumed_step} ({self.cause}): lost "
                f"{self.lost_s:.1f} s = " + " + ".join(parts))


class RunTracker:
    def __init__(self, cfg: RootConfig, rank: int, world_size: int, total_steps: int, run_dir: Optional[str],
                 gather: Optional[Gather] = None, cuda: bool = False) -> None:
        self.cfg, self.rank, self.world_size, self.total_steps = cfg, rank, world_size, total_steps
        self.run_dir = run_dir
        self.gather, self.cuda = gather, cuda
        self.rank0 = rank == 0
        self.tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_length
        self._previous = _previous_progress(run_dir) if self.rank0 and run_dir else None  # before our first beat
        self.ledger = GoodputLedger(run_dir, active=self.rank0)
        self.ledger.state.run = {"total_steps": total_steps, "tokens_per_step": self.tokens_per_step,
                                 "gpus": world_size, "nodes": cfg.cluster.nodes,
                                 "price_per_node_hour": cfg.cluster.price_per_node_hour}
        self.ledger.save(force=True)  # the attempt counts even if it dies before its first step
        self.prediction = read_prediction(run_dir, cuda) if cfg.monitoring.plan.enabled else None
        self.plan_active = cfg.monitoring.plan.enabled and bool(run_dir)  # the same decision on every rank
        self.progress: Optional[Progress] = None
        self.start_step = 0
        self._notices: list[Notice] = []
        self._restart: Optional[dict[str, Any]] = None
        self._last_restart_lost: Optional[float] = None
        self._plan: Optional[PlanComparison] = None
        self._window: deque[tuple[float, float, float]] = deque(maxlen=cfg.monitoring.plan.window_steps)

    # -- phases and the start ------------------------------------------------------------------

    def phase(self, phase: str) -> None:
        self.ledger.transition(phase)

    def started(self, step: int) -> None:
        """Callbacks ran ``on_train_start``: training continues after ``step`` (0: from the start)."""
        self.start_step = step
        state = self.ledger.state
        self.progress = Progress(self.total_steps, self.tokens_per_step, step, 0.0, tuple(state.milestones))
        if not self.rank0:
            return
        saved_last = state.last_step  # the newest step the previous attempt's ledger saved
        redone, redone_s = self.ledger.resumed(step)
        if state.attempts > 1:
            prev_time, prev_step = self._previous or (0.0, 0)
            unsaved = max(0, prev_step - max(step, saved_last))  # trained after the last save, and redone
            state.redone_steps += unsaved
            hang = _hang_since(self.run_dir, self.ledger.previous_update)
            last_progress = prev_time or self.ledger.previous_update  # the newest heartbeat of the attempt
            failed_at, failure = state.failed_at, state.failure
            state.failed_at, state.failure = 0.0, ""
            detection = None
            cause = "the previous attempt stopped"
            if hang is not None:
                detection = max(0.0, hang["detected"] - hang["last_progress"])
                last_progress = hang["detected"]
                cause = f"hang: {hang.get('text', 'watchdog verdict')}"
            elif failed_at and prev_time and failed_at >= prev_time:  # it raised (a collective timed out, ...)
                detection = failed_at - prev_time
                last_progress = failed_at
                cause = f"rank 0 failed: {failure}" + (f" after step {prev_step}" if prev_step else "")
            elif prev_step:
                cause = f"the previous attempt's last progress was step {prev_step}"
            gap = max(0.0, max(prev_time, self.ledger.previous_update) - self.ledger.previous_update)
            self._restart = {"attempt": state.attempts, "resumed_step": step, "detection_s": detection,
                             "down_s": max(0.0, self.ledger.started - last_progress),
                             "redone_steps": redone + unsaved, "redone_s": redone_s + gap, "cause": cause}

    # -- steps ---------------------------------------------------------------------------------

    def step(self, step: int, step_time_s: float, data_wait_s: float, compute_s: float
             ) -> tuple[Optional[RunProgress], tuple[Notice, ...]]:
        """Book one finished step; every rank calls it (the plan check gathers from all ranks)."""
        self._window.append((step_time_s, compute_s, data_wait_s / step_time_s if step_time_s > 0 else 0.0))
        plan = self._maybe_check_plan(step)
        if not self.rank0 or self.progress is None:
            return None, ()
        if self._restart is not None:
            self._restart_done(step_time_s)
        self.ledger.step(step, step_time_s, data_wait_s)
        report = self.progress.update(step)
        state = self.ledger.state
        if report.milestone is not None:
            state.milestones = sorted(set(state.milestones) | set(self.progress.done))
            eta = f", ETA {human_duration(report.eta_s)}" if report.eta_s is not None and report.fraction < 1 else ""
            text = (f"{report.milestone}% of the tokens ({report.tokens_done:,} of {report.tokens_total:,}) after "
                    f"{human_duration(time.time() - state.first_start)} wall{eta}; goodput {state.goodput:.1%}")
            print(f"milestone: {text}", flush=True)
            self._notices.append(Notice("milestone", f"Milestone {report.milestone}%",
                                        f"run {self._run_name()}: {text}"))
        if plan is not None:
            self._plan_notice(plan)
        self.ledger.save()
        c = self.cfg.cluster
        fraction = report.fraction
        summary = self.ledger.summary(report.tokens_done, self.world_size, c.nodes, c.price_per_node_hour, fraction)
        progress = RunProgress(
            step=step, tokens_done=report.tokens_done, tokens_total=report.tokens_total, fraction=fraction,
            eta_s=report.eta_s, elapsed_s=time.time() - state.first_start, goodput=summary["goodput"],
            seconds={k: float(v) for k, v in summary["seconds"].items()},
            tokens_per_gpu_hour=summary["tokens_per_gpu_hour"], attempts=state.attempts,
            redone_steps=state.redone_steps, milestone=max(state.milestones) if state.milestones else None,
            cost_usd=summary.get("cost_usd"), projected_cost_usd=summary.get("projected_cost_usd"),
            last_restart_lost_s=self._last_restart_lost,
            plan_step_time_ratio=self._plan.step_ratio if self._plan else None,
            plan_memory_ratio=self._plan.memory_ratio if self._plan else None)
        notices, self._notices = tuple(self._notices), []
        return progress, notices

    def finish(self, error: Optional[BaseException] = None) -> None:
        """The loop ended (or raised: ``error``, e.g. a collective that timed out because a peer hung):
        book the phase in progress and persist the ledger; a failure's time lets the next attempt
        tell detection (last progress -> this failure) from the restart."""
        if error is not None and self.ledger.active:
            self.ledger.state.failed_at = time.time()
            self.ledger.state.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        self.ledger.transition("finished")
        self.ledger.save(force=True)

    def summary_line(self) -> Optional[str]:
        if not self.rank0 or not self.ledger.active:
            return None
        state = self.ledger.state
        total = state.total
        parts = ", ".join(f"{k} {state.seconds[k]:.1f} s" for k in CATEGORIES if state.seconds[k] > 0.05)
        return (f"goodput: {state.goodput:.1%} of {total:.1f} s wall over {state.attempts} attempt(s) "
                f"({state.redone_steps} steps redone): {parts}")

    # -- restarts ------------------------------------------------------------------------------

    def _restart_done(self, first_step_s: float) -> None:
        info, self._restart = self._restart, None
        assert info is not None
        reload = max(0.0, time.time() - first_step_s - self.ledger.started)
        cost = RestartCost(reload_s=reload, **info)
        self._last_restart_lost = cost.lost_s
        self.ledger.state.restarts.append({**info, "reload_s": reload, "lost_s": cost.lost_s, "time": time.time(),
                                           "process_start": self.ledger.started, "first_step_start": time.time() - first_step_s})
        print(cost.line(), flush=True)
        self._notices.append(Notice("restart", "Job restarted", f"run {self._run_name()}: {cost.line()}", "WARN"))

    # -- plan vs actual ------------------------------------------------------------------------

    def _maybe_check_plan(self, step: int) -> Optional[PlanComparison]:
        p = self.cfg.monitoring.plan
        done = step - self.start_step
        if not self.plan_active or done < p.warmup_steps + p.window_steps or (done - p.warmup_steps) % p.window_steps:
            return None
        steps = [w[0] for w in self._window]
        row = [statistics.median(w[1] for w in self._window), statistics.median(w[2] for w in self._window),
               float(self._peak_bytes() or -1)]
        rows = self.gather(row) if self.gather is not None and self.world_size > 1 else [row]
        if not self.rank0 or self.prediction is None:
            return None
        peaks = [r[2] for r in rows if r[2] >= 0]
        state = self.ledger.state
        trained = state.seconds["productive"] + state.seconds["straggler"] + state.seconds["data_wait"]
        measured = Measured(step_time_s=statistics.median(steps), compute_s=tuple(r[0] for r in rows),
                            data_wait_share=max(r[1] for r in rows),
                            slow_share=state.seconds["straggler"] / trained if trained > 0 else 0.0,
                            peak_bytes=int(max(peaks)) if peaks else None,
                            memory_kind="cuda_reserved" if self.cuda else "cpu_max_rss")
        return compare(self.prediction, measured, p)

    def _plan_notice(self, plan: PlanComparison) -> None:
        first = self._plan is None
        changed = self._plan is not None and self._plan.drift != plan.drift
        self._plan = plan
        self.ledger.state.plan = {"step": self.ledger.state.last_step, "step_time_ratio": plan.step_ratio,
                                  "memory_ratio": plan.memory_ratio, "drift": plan.drift, "line": plan.line()}
        if first or changed:
            print(plan.line(), flush=True)
        if plan.drift and (first or changed):
            self._notices.append(Notice("plan_drift", "Plan drift", f"run {self._run_name()}: {plan.line()}", "WARN"))
        elif changed:
            self._notices.append(Notice("plan", "Plan drift cleared", f"run {self._run_name()}: {plan.line()}"))

    def _peak_bytes(self) -> Optional[int]:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_reserved())
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def _run_name(self) -> str:
        return Path(self.run_dir).name if self.run_dir else self.cfg.run_name


def _previous_progress(run_dir: str) -> Optional[tuple[float, int]]:
    """(time, step) of the newest heartbeat an earlier process left (read before this attempt beats)."""
    started = process_start_time() or time.time()
    attempt = current_attempt()
    try:  # another attempt's beats; a rank of this attempt may already have beaten (newer than our start)
        beats = [b for b in read_beats(run_dir) if b.attempt != attempt or b.time < started]
    except OSError:
        return None
    if not beats:
        return None
    newest = max(beats, key=lambda b: b.time)
    done = [b.step - (1 if b.phase == "step" else 0) for b in beats if b.attempt == newest.attempt]
    return newest.time, max(done)


def _hang_since(run_dir: Optional[str], since: float) -> Optional[dict[str, Any]]:
    """The newest hang event the watchdog recorded after ``since`` (the previous attempt's last save)."""
    if not run_dir:
        return None
    newest: Optional[dict[str, Any]] = None
    for path in (Path(run_dir) / HANGS_DIR).glob("attempt-*.json"):
        try:
            event = json.loads(path.read_text())
            detected, last = float(event["detected"]), float(event["last_progress"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if detected >= since - 1.0 and (newest is None or detected > newest["detected"]):
            who = ", ".join(f"rank {r} on {h}" for r, h in (event.get("suspects") or event.get("laggards") or []))
            newest = {"detected": detected, "last_progress": last,
                      "text": f"{who or 'a rank'} stopped in step {event.get('step')} ({event.get('phase')})"}
    return newest
