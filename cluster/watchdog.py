"""The per-node hang watchdog: no progress from any rank -> stacks dumped, worker group ended, torchrun restarts it.

    python -m cluster.watchdog --run-dir <run dir> --parent-pid <torchrun pid>

Started next to torchrun on every node (the step script; the local executor for local runs). It
polls the ranks' heartbeats (cluster.heartbeat). When no rank anywhere has progressed for
``max(step_factor x median step time, floor_s)`` (``startup_s`` while any rank starts, loads or
saves a checkpoint, validates or exports) it

1. names the ranks that stopped (the least progress; ranks whose stack shows no collective wait
   are named as suspects) and their hosts,
2. dumps the stacks of this node's ranks (py-spy; SIGUSR1 -> faulthandler into the rank's log
   when py-spy is missing) into ``<run dir>/hangs/``,
3. records the event (``hangs/attempt-<a>.json``, written by the first node to get there), and
4. kills this node's worker processes: torchrun's agents restart the worker group on every node
   (``--max-restarts``), and training resumes from the last committed checkpoint.

A host named in ``max_hangs_per_host`` events is drained (``scontrol update ... state=drain``)
and the job is asked to requeue without it (``control/requeue``); this node's torchrun is ended.
Exits when its parent (torchrun) is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cluster.heartbeat import LONG_PHASES, Beat, current_attempt, read_beats
from cluster.local import process_alive

HANGS_DIR = "hangs"
REQUEUE_MARK = "requeue"  # control/requeue: the batch shell requeues the job (a node was drained)
_WAITING = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier", "recv", "send", "_wait",
            "wait (", "synchronize", "batch_isend_irecv", "store_based_barrier")


@dataclass(frozen=True)
class Limits:
    step_factor: float
    floor_s: float
    startup_s: float


@dataclass(frozen=True)
class Hang:
    detected: float
    last_progress: float
    allowance_s: float
    phase: str  # the phase the stopped ranks are in
    step: int
    laggards: list[tuple[int, str]]  # (rank, host): the ranks with the least progress
    suspects: list[tuple[int, str]] = field(default_factory=list)  # stacks not waiting in a collective

    def describe(self) -> str:
        who = ", ".join(f"rank {r} on {h}" for r, h in (self.suspects or self.laggards))
        return (f"no rank progressed for {self.detected - self.last_progress:.0f} s (limit {self.allowance_s:.0f} s): "
                f"{who} stopped in step {self.step} ({self.phase})")


class StepClock:
    """Median step time from the lowest rank's step boundaries the watchdog has seen.

    A step's boundary is its start (phase ``step``) or the previous step's end (``step_end``):
    whichever the poll catches, so steps far shorter than the poll interval still count."""

    def __init__(self, keep: int = 50) -> None:
        self.keep = keep
        self.ends: dict[int, float] = {}  # step s -> when step s+1 could start

    def observe(self, beats: list[Beat]) -> None:
        if not beats:
            return
        lead = min(beats, key=lambda b: b.rank)
        boundary = lead.step if lead.phase == "step_end" else lead.step - 1 if lead.phase == "step" else None
        if boundary is not None and boundary > 0 and boundary not in self.ends:
            self.ends[boundary] = lead.time
            for old in sorted(self.ends)[:-self.keep]:
                del self.ends[old]

    def median(self) -> Optional[float]:
        steps = sorted(self.ends)
        deltas = [(self.ends[b] - self.ends[a]) / (b - a) for a, b in zip(steps, steps[1:]) if b > a]
        return statistics.median(deltas) if deltas else None


def verdict(beats: list[Beat], now: float, clock: StepClock, limits: Limits) -> Optional[Hang]:
    """A hang when no rank progressed for longer than the allowance (pure: testable with any beats)."""
    if not beats or any(b.phase == "export" for b in beats) or all(b.phase == "finished" for b in beats):
        return None  # training is over: an export runs on one rank for as long as it takes
    last = max(b.time for b in beats)
    median = clock.median()
    long_phase = any(b.phase in LONG_PHASES for b in beats)
    # steps completed in this attempt: past start-up even when the poll has not timed two step boundaries
    # yet (short steps, a checkpoint in between), so a hang in the first steps gets the floor, not startup_s
    completed = max(b.step - (1 if b.phase == "step" else 0) for b in beats) >= 1
    if long_phase or (median is None and not completed):
        allowance = limits.startup_s
    else:
        allowance = max(limits.step_factor * median, limits.floor_s) if median is not None else limits.floor_s
    if now - last <= allowance:
        return None
    least = min(b.progress for b in beats)
    laggards = sorted((b.rank, b.host) for b in beats if b.progress == least)
    stuck = next(b for b in beats if b.progress == least)
    return Hang(detected=now, last_progress=last, allowance_s=allowance, phase=stuck.phase, step=stuck.step,
                laggards=laggards)


def _attempt_key(attempt: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in attempt.split("."))
    except ValueError:
        return (0,)


def waiting_in_collective(stack: str) -> bool:
    return any(marker in stack for marker in _WAITING)


class Watchdog:
    def __init__(self, run_dir: str, parent_pid: int, limits: Limits, poll_s: float, max_hangs_per_host: int,
                 stack_dumps: bool, say: Callable[[str], None]) -> None:
        self.run_dir, self.parent_pid, self.limits, self.poll_s = run_dir, parent_pid, limits, poll_s
        self.max_hangs, self.stack_dumps, self.say = max_hangs_per_host, stack_dumps, say
        self.host = socket.gethostname()
        self.clock = StepClock()
        self.started = time.time()

    def run(self) -> int:
        while process_alive(self.parent_pid):
            beats = self._current_beats()
            self.clock.observe(beats)
            hang = verdict(beats, time.time(), self.clock, self.limits) if beats else self._startup_hang()
            if hang is not None:
                self._act(hang, beats)
                self.clock = StepClock()  # the restarted group starts a new clock
                self.started = time.time()
            time.sleep(self.poll_s)
        return 0

    def _current_beats(self) -> list[Beat]:
        """The heartbeats of the running attempt (written since this worker group started)."""
        beats = [b for b in read_beats(self.run_dir) if b.time >= self.started - 1.0]
        newest = max((_attempt_key(b.attempt) for b in beats), default=None)
        return [b for b in beats if _attempt_key(b.attempt) == newest]

    def _startup_hang(self) -> Optional[Hang]:
        """No heartbeat at all since the group started: a hang before the first beat (e.g. the rendezvous)."""
        now = time.time()
        if now - self.started <= self.limits.startup_s:
            return None
        return Hang(detected=now, last_progress=self.started, allowance_s=self.limits.startup_s, phase="startup",
                    step=0, laggards=[])

    def _act(self, hang: Hang, beats: list[Beat]) -> None:
        local = [b for b in beats if b.host == self.host]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(hang.detected))
        hang_dir = Path(self.run_dir) / HANGS_DIR
        hang_dir.mkdir(parents=True, exist_ok=True)
        stacks = self._dump_stacks(local, hang_dir / f"{stamp}-{self.host}.txt") if self.stack_dumps else {}
        suspects = [(b.rank, b.host) for b in local if b.rank in stacks and not waiting_in_collective(stacks[b.rank])]
        hang = Hang(**{**asdict(hang), "laggards": [tuple(x) for x in hang.laggards],  # type: ignore[arg-type]
                       "suspects": suspects})
        self.say(f"watchdog: HANG: {hang.describe()}; stacks in {hang_dir}; ending the worker group for a restart")
        attempt = max((b.attempt for b in beats), key=_attempt_key, default=current_attempt())
        event = self._record(hang, stamp, attempt)
        if self._hangs_named(self.host) >= self.max_hangs:
            self._quarantine(event)
        self._kill(local)

    def _dump_stacks(self, local: list[Beat], path: Path) -> dict[int, str]:
        stacks: dict[int, str] = {}
        spy = shutil.which("py-spy")
        with open(path, "w") as out:
            for beat in sorted(local, key=lambda b: b.rank):
                text = ""
                if spy:
                    try:
                        text = subprocess.run([spy, "dump", "--pid", str(beat.pid)], capture_output=True, text=True,
                                              timeout=30).stdout
                    except (OSError, subprocess.TimeoutExpired) as exc:
                        text = f"(py-spy failed: {exc})"
                else:  # faulthandler in the rank prints its stacks into the rank's log on SIGUSR1
                    try:
                        os.kill(beat.pid, signal.SIGUSR1)
                        text = "(py-spy not installed: stacks printed into the rank's log by faulthandler)"
                    except ProcessLookupError:
                        text = "(process gone)"
                stacks[beat.rank] = text
                out.write(f"=== rank {beat.rank} (local {beat.local_rank}) pid {beat.pid} on {beat.host}: "
                          f"step {beat.step} {beat.phase}\n{text}\n")
        return stacks

    def _record(self, hang: Hang, stamp: str, attempt: str) -> Path:
        """One event per worker-group attempt: the first node to get here writes it."""
        path = Path(self.run_dir) / HANGS_DIR / f"attempt-{attempt}.json"
        body = {**asdict(hang), "reported_by": self.host, "stamp": stamp, "attempt": attempt}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as handle:
                json.dump(body, handle, indent=1)
        except FileExistsError:
            pass
        return path

    def _hangs_named(self, host: str) -> int:
        count = 0
        for event in (Path(self.run_dir) / HANGS_DIR).glob("attempt-*.json"):
            try:
                named = json.loads(event.read_text())
            except (OSError, ValueError):
                continue
            hosts = {h for _, h in (named.get("suspects") or named.get("laggards") or [])}
            count += host in hosts
        return count

    def _quarantine(self, event: Path) -> None:
        node = os.environ.get("SLURMD_NODENAME") or self.host
        reason = f"hyperlaunch watchdog: {self.max_hangs} hangs named this host (run {Path(self.run_dir).name})"
        self.say(f"watchdog: draining {node} ({reason}) and asking the job to requeue without it")
        if shutil.which("scontrol") and os.environ.get("SLURM_JOB_ID"):
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=drain", f"reason={reason}"],
                           capture_output=True, text=True, timeout=30)
            control = Path(os.environ.get("HYPERLAUNCH_CONTROL_DIR") or Path(self.run_dir) / "control")
            control.mkdir(parents=True, exist_ok=True)
            (control / REQUEUE_MARK).write_text(f"{node}: {reason}\n")
        try:
            os.kill(self.parent_pid, signal.SIGTERM)  # this node's torchrun: no more restarts here
        except ProcessLookupError:
            pass

    @staticmethod
    def _kill(local: list[Beat]) -> None:
        import psutil

        for beat in local:
            try:
                proc = psutil.Process(beat.pid)
                tree = [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for member in tree:
                try:
                    member.kill()
                except psutil.NoSuchProcess:
                    pass


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.watchdog", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--parent-pid", type=int, required=True, help="torchrun: the watchdog exits with it")
    args = parser.parse_args(argv)
    from configs.loading import load_run_config

    cfg = load_run_config(Path(args.run_dir) / "config.yaml").resilience
    if not cfg.watchdog:
        return 0

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    limits = Limits(step_factor=cfg.step_factor, floor_s=cfg.floor_s, startup_s=cfg.startup_s)
    return Watchdog(args.run_dir, args.parent_pid, limits, cfg.poll_s, cfg.max_hangs_per_host, cfg.stack_dumps,
                    say).run()


if __name__ == "__main__":
    sys.exit(main())
