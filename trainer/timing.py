"""Per-rank timing of compute and data waits inside one optimizer step.

Compute is timed around the model's forward call only: collectives happen in the schedule
(pipeline p2p) and in the optimizer/gradient reduction, outside these intervals, so a slow
GPU shows here while data-parallel collectives equalize whole-step wall times. On CUDA the
intervals are CUDA events (no host sync inside the step); they are read once after the step.

Test-only fault injection (``HYPERLAUNCH_TEST_FAULT``, see :class:`FaultInjection`) slows or fails a
chosen rank INSIDE its compute interval, the way a slow GPU would; it is inert when unset.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

FAULT_ENV = "HYPERLAUNCH_TEST_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str  # slow | fail
    rank: Optional[int]  # None: every rank
    factor: float = 1.0  # slow: compute takes factor x as long
    start: int = 1  # first step (counted by this process) the fault applies to
    end: int = 1 << 60  # last step


class FaultInjection:
    """Test-only. ``HYPERLAUNCH_TEST_FAULT="slow:rank=1,factor=2,from=20,to=60;fail:rank=1,step=8"``
    (``rank=*``: every rank). CPU runs: the slowdown is a sleep inside the compute interval."""

    def __init__(self, spec: str, rank: int):
        self.faults: list[Fault] = []
        for item in filter(None, (part.strip() for part in spec.split(";"))):
            kind, _, args = item.partition(":")
            kv = dict(a.split("=", 1) for a in args.split(",") if "=" in a)
            who = kv.get("rank", "*")
            if who != "*" and int(who) != rank:
                continue
            if kind == "slow":
                self.faults.append(Fault("slow", None if who == "*" else int(who), float(kv.get("factor", 2)),
                                         int(kv.get("from", 1)), int(kv.get("to", 1 << 60))))
            elif kind == "fail":
                step = int(kv.get("step", 1))
                self.faults.append(Fault("fail", None if who == "*" else int(who), start=step, end=step))

    @classmethod
    def from_env(cls) -> Optional["FaultInjection"]:
        spec = os.environ.get(FAULT_ENV)
        return cls(spec, int(os.environ.get("RANK", "0"))) if spec else None

    def after_compute(self, step: int, elapsed_s: float) -> None:
        for f in self.faults:
            if f.start <= step <= f.end:
                if f.kind == "fail":
                    raise RuntimeError(f"injected test fault ({FAULT_ENV}) at step {step}")
                time.sleep(elapsed_s * (f.factor - 1.0))


class StepTimer:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.step = -1  # steps started by this process (reset() below makes it 0; each step +1)
        self.faults = FaultInjection.from_env()
        self.reset()

    def reset(self) -> None:
        self.step += 1
        self.data_wait_s = 0.0
        self._cpu_compute_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def data(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait_s += time.perf_counter() - start

    @contextmanager
    def compute(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
                if self.faults is not None:
                    self.faults.after_compute(self.step, time.perf_counter() - t0)
            finally:
                self._cpu_compute_s += time.perf_counter() - t0

    def compute_s(self) -> float:
        """Total compute seconds of the step; call after the step's final synchronize."""
        if self.cuda:
            return sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        return self._cpu_compute_s
