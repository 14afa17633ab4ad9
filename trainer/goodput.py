"""The goodput ledger: where a run's wall time went, kept across requeues and in-job restarts.

Rank 0 books the time between the heartbeat phases it passes (trainer.callbacks ``TrainState.beat``)
into categories, and persists the ledger in ``<run dir>/goodput.json`` (atomically, every few
steps and at the end), so the next attempt continues it:

* ``productive``   training steps minus their data waits (of steps that were not redone later),
* ``startup``      process start to the first step: imports, model build, resume or weight loading,
* ``checkpoint``   training stalled for a save (the blocking part; the final save all of it),
* ``evaluation``   validation passes,
* ``data_wait``    waiting for the next micro-batch inside steps,
* ``restarts``     time lost to restarts: from the previous attempt's last ledger save (at most
                   10 s old, or its clean end) to the next attempt's process start -- the downtime
                   and the work after that save -- plus the productive time of the steps redone
                   since the last commit (moved out of ``productive``),
* ``straggler``    the part of steps slower than 1.25 x the rolling median (a slow rank or link),
* ``other``        everything between steps not booked above (logging, callbacks).

``goodput = productive / total``; tokens per GPU-hour use the tokens of the newest step; with
``cluster.price_per_node_hour`` the cost so far and the projection to the end.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

LEDGER_FILE = "goodput.json"
CATEGORIES = ("productive", "startup", "checkpoint", "evaluation", "data_wait", "restarts", "straggler", "other")
_PHASE_CATEGORY = {"startup": "startup", "resume": "startup", "checkpoint": "checkpoint",
                   "validation": "evaluation", "export": "other", "finished": "other", "step_end": "other"}
SLOW = 1.25  # a step slower than this x the rolling median books the excess as straggler slowdown
_KEEP_STEPS = 5000  # per-step productive seconds kept for redone-work accounting


@dataclass
class LedgerState:
    seconds: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in CATEGORIES})
    step_seconds: dict[str, float] = field(default_factory=dict)  # str(step) -> productive seconds (recent)
    attempts: int = 0
    redone_steps: int = 0
    last_update: float = 0.0  # unix time of the last save (the previous attempt's end, at worst)
    last_step: int = 0
    first_start: float = 0.0
    milestones: list[int] = field(default_factory=list)  # progress milestones (percent) already announced
    restarts: list[dict[str, Any]] = field(default_factory=list)  # one record per restart (trainer.tracker)
    plan: dict[str, Any] = field(default_factory=dict)  # the newest plan-vs-actual comparison (trainer.plan_check)
    failed_at: float = 0.0  # when the previous attempt raised (0: it did not, or it was killed)
    failure: str = ""
    run: dict[str, Any] = field(default_factory=dict)  # total_steps, tokens_per_step, gpus, nodes, price_per_node_hour

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def goodput(self) -> float:
        return self.seconds["productive"] / self.total if self.total > 0 else 0.0


class GoodputLedger:
    """Rank 0's ledger (a no-op elsewhere or without a run directory)."""

    def __init__(self, run_dir: Optional[str], active: bool, process_start: Optional[float] = None) -> None:
        self.path = Path(run_dir) / LEDGER_FILE if run_dir and active else None
        self.state = _load(self.path) if self.path else LedgerState()
        now = time.time()
        self.started = process_start or process_start_time() or now
        self.phase, self.phase_since = "startup", self.started
        self._recent: deque[float] = deque(maxlen=50)
        self._saved_at = 0.0
        self.last_step_wall: Optional[float] = None  # the step phase just closed, as the transitions timed it
        self.previous_update = self.state.last_update  # the last save of the previous attempt (0: none)
        if self.path is None:
            return
        if self.state.attempts and self.state.last_update:  # downtime since the previous attempt stopped
            self.state.seconds["restarts"] += max(0.0, self.started - self.state.last_update)
        if not self.state.first_start:
            self.state.first_start = self.started
        self.state.attempts += 1

    @property
    def active(self) -> bool:
        return self.path is not None

    # -- booking ---------------------------------------------------------------------------------

    def transition(self, phase: str, now: Optional[float] = None) -> None:
        """Book the time since the last transition to the phase we leave; ``step`` is booked by :meth:`step`."""
        if self.path is None:
            return
        now = now or time.time()
        if self.phase != "step":
            category = _PHASE_CATEGORY.get(self.phase, "other")
            self.state.seconds[category] += max(0.0, now - self.phase_since)
        elif phase != "step":
            self.last_step_wall = max(0.0, now - self.phase_since)
        else:  # a save in the middle of a step (a failing one): the step stays unbooked, lost to the restart
            return
        self.phase, self.phase_since = phase, now

    def step(self, step: int, step_time_s: float, data_wait_s: float) -> None:
        """One finished step, booked when the loop reports it: its wall time as the phase transitions
        measured it (``step`` -> ``step_end``; else ``step_time_s``) split into data wait, straggler
        slowdown and productive work."""
        if self.path is None:
            return
        step_time_s = self.last_step_wall if self.last_step_wall is not None else step_time_s
        self.last_step_wall = None
        wait = min(max(data_wait_s, 0.0), step_time_s)
        work = step_time_s - wait
        median = statistics.median(self._recent) if len(self._recent) >= 10 else None
        slow = max(0.0, step_time_s - SLOW * median) if median else 0.0
        self._recent.append(step_time_s)
        s = self.state.seconds
        s["data_wait"] += wait
        s["straggler"] += min(slow, work)
        s["productive"] += work - min(slow, work)
        self.state.step_seconds[str(step)] = work - min(slow, work)
        if len(self.state.step_seconds) > _KEEP_STEPS:
            for key in sorted(self.state.step_seconds, key=int)[: len(self.state.step_seconds) - _KEEP_STEPS]:
                del self.state.step_seconds[key]
        self.state.last_step = step

    def resumed(self, step: int) -> tuple[int, float]:
        """The run restarts from ``step``: steps after it that an earlier attempt trained are redone.

        Returns (redone steps, their seconds), moved from productive to restarts."""
        if self.path is None:
            return 0, 0.0
        redone = {k: v for k, v in self.state.step_seconds.items() if int(k) > step}
        seconds = sum(redone.values())
        self.state.seconds["productive"] -= seconds
        self.state.seconds["restarts"] += seconds
        self.state.redone_steps += len(redone)
        for key in redone:
            del self.state.step_seconds[key]
        self.state.last_step = step
        return len(redone), seconds

    def save(self, force: bool = False) -> None:
        """Persist (atomically) at most every 10 s unless forced."""
        if self.path is None:
            return
        now = time.time()
        if not force and now - self._saved_at < 10.0:
            return
        self.transition(self.phase, now)  # book the phase in progress up to now
        self.state.last_update = now
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(self.state), indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            return
        self._saved_at = now

    def summary(self, tokens_done: int, gpus: int, nodes: int, price_per_node_hour: Optional[float],
                fraction_done: float) -> dict[str, Any]:
        s = self.state
        total = s.total
        out: dict[str, Any] = {"seconds": dict(s.seconds), "total_s": total, "goodput": s.goodput,
                               "attempts": s.attempts, "redone_steps": s.redone_steps,
                               "tokens_per_gpu_hour": tokens_done / (total / 3600 * gpus) if total > 0 else 0.0}
        if price_per_node_hour is not None:
            so_far = total / 3600 * nodes * price_per_node_hour
            out["cost_usd"] = so_far
            out["projected_cost_usd"] = so_far / fraction_done if fraction_done > 0 else None
        return out


def _load(path: Path) -> LedgerState:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return LedgerState()
    state = LedgerState()
    for key, value in raw.items():
        if key == "seconds":
            state.seconds.update({k: float(v) for k, v in value.items() if k in CATEGORIES})
        elif hasattr(state, key):
            setattr(state, key, value)
    return state


def process_start_time(pid: Optional[int] = None) -> Optional[float]:
    """When a process (default: this one) started, in wall-clock seconds, to one clock tick (10 ms).

    Not ``psutil.Process.create_time()`` alone: it adds the start tick to the boot time that /proc/stat
    rounds down to a whole second, so it is early by up to a second (0.2-0.4 s measured), which
    moved that much of a restart's time from "restart" to "reload" in the ledger. Here the process's
    age (CLOCK_BOOTTIME now minus its start tick since boot) is subtracted from the wall clock."""
    import psutil

    try:
        boot = psutil.boot_time()  # first: psutil < 7 adds the boot time this call cached
        since_boot = psutil.Process(pid or os.getpid()).create_time() - boot
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (psutil.Error, OSError, AttributeError):  # /proc unreadable, no CLOCK_BOOTTIME: the caller starts now
        return None


def read_ledger(run_dir: str) -> Optional[dict[str, Any]]:
    """A run's ledger as stored (for ``launcher status``), or None."""
    try:
        return dict(json.loads((Path(run_dir) / LEDGER_FILE).read_text()))
    except (OSError, ValueError):
        return None
