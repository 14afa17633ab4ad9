"""Per-rank timing of compute and data waits inside one optimizer step.

Compute is timed around the model's forward call only: collectives happen in the schedule
(pipeline p2p) and in the optimizer/gradient reduction, outside these intervals, so a slow
GPU shows here while data-parallel collectives equalize whole-step wall times. On CUDA the
intervals are CUDA events (no host sync inside the step); they are read once after the step.

Tests slow a rank inside its compute interval, as a slow GPU would, through a plugin
(tests/faults.py hooks the model's forward); nothing here knows about it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

class StepTimer:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.step = -1  # steps started by this process (reset() below makes it 0; each step +1)
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
            finally:
                self._cpu_compute_s += time.perf_counter() - t0

    def compute_s(self) -> float:
        """Total compute seconds of the step; call after the step's final synchronize."""
        if self.cuda:
            return sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        return self._cpu_compute_s
