"""Heartbeats: every rank says where it is, so a per-node watchdog can tell a hang from slow progress.

A rank writes ``<run dir>/heartbeats/<host>/rank_<r>.json`` atomically (tmp + rename) at every
phase change and at the end of every step: ``{rank, local_rank, host, pid, step, phase, time,
attempt}``. Phases are ordered within a step (:data:`PHASES`); ``startup``, ``resume``,
``checkpoint``, ``validation`` and ``export`` are the long ones that get the watchdog's start-up
allowance. The directory lives on the shared filesystem (one small file per rank: a few writes
per step, nothing on the training path waits for it).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

HEARTBEAT_DIR = "heartbeats"
PHASES = ("startup", "resume", "step", "step_end", "checkpoint", "validation", "export", "finished")
LONG_PHASES = frozenset({"startup", "resume", "checkpoint", "validation", "export"})


@dataclass(frozen=True)
class Beat:
    rank: int
    local_rank: int
    host: str
    pid: int
    step: int  # the step in progress (phase "step") or the last completed one
    phase: str
    time: float
    attempt: str  # Slurm restart count / torchrun restart count: heartbeats of earlier attempts are stale

    @property
    def progress(self) -> tuple[int, int]:
        """Order of how far a rank got: (step, phase index); a rank in ``step`` N is behind one at ``step_end`` N."""
        return self.step, PHASES.index(self.phase) if self.phase in PHASES else 0


def current_attempt() -> str:
    return f"{os.environ.get('SLURM_RESTART_COUNT', '0')}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


class HeartbeatWriter:
    """One rank's heartbeat file (a no-op without a run directory)."""

    def __init__(self, run_dir: Optional[str], rank: int, local_rank: int) -> None:
        self.host = socket.gethostname()
        self.rank, self.local_rank = rank, local_rank
        self.path: Optional[Path] = None
        if run_dir:
            directory = Path(run_dir) / HEARTBEAT_DIR / self.host
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / f"rank_{rank}.json"
        self.attempt = current_attempt()

    def beat(self, step: int, phase: str) -> None:
        if self.path is None:
            return
        beat = Beat(self.rank, self.local_rank, self.host, os.getpid(), step, phase, time.time(), self.attempt)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(beat)))
            os.replace(tmp, self.path)
        except OSError:  # a full or flaky filesystem must not stop training; the watchdog sees staleness
            pass


def read_beats(run_dir: str, host: Optional[str] = None) -> list[Beat]:
    """Every rank's latest heartbeat (only ``host``'s when given); unreadable files are skipped."""
    root = Path(run_dir) / HEARTBEAT_DIR
    hosts = [root / host] if host else [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    beats = []
    for directory in hosts:
        for path in directory.glob("rank_*.json"):
            try:
                beats.append(Beat(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
    return beats
