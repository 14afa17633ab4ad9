"""Metric sinks: a no-op base, a fan-out that keeps training alive, and the console.

A sink overrides the events it cares about; everything else stays a no-op. Prometheus, W&B
and the straggler detector are sinks (monitoring.prometheus_sink, monitoring.wandb_sink,
monitoring.straggler_sink). The fan-out isolates them: a sink that raises is reported once
and training continues.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, Iterable, TextIO

from monitoring.events import (Alert, CheckpointEvent, Outcome, ProgressSample, RunInfo, StepSample,
                               StragglerReport, ThroughputReport, ValidationSample)


class MetricSink:
    """The no-op sink. Methods must not raise into training and must not block for long."""

    name = "null"

    def start(self, run: RunInfo) -> None:
        pass

    def step(self, sample: StepSample) -> None:
        pass

    def validation(self, sample: ValidationSample) -> None:
        pass

    def progress(self, sample: ProgressSample) -> None:
        """Rank 0, every step: progress, ETA, the goodput ledger and the plan ratios."""

    def stragglers(self, report: StragglerReport) -> None:
        pass

    def throughput(self, report: ThroughputReport) -> None:
        pass

    def checkpoint(self, event: CheckpointEvent) -> None:
        pass

    def alert(self, alert: Alert) -> None:
        pass

    def degraded(self, component: str, message: str) -> None:
        """Something monitoring needs is missing (said once per component by the console sink)."""

    def finish(self, outcome: Outcome) -> None:
        pass


NullSink = MetricSink


class FanOut(MetricSink):
    """Forwards every event to every sink; a failing sink is reported once per event kind."""

    name = "fan-out"

    def __init__(self, sinks: Iterable[MetricSink], err: TextIO | None = None):
        self.sinks = list(sinks)
        self._err = err
        self._reported: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _each(self, method: str, *args: object) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # a monitoring failure must never stop training
                key = (sink.name, method)
                with self._lock:
                    first = key not in self._reported
                    self._reported.add(key)
                if first:
                    print(f"monitoring: the {sink.name} sink failed in {method}: {type(exc).__name__}: {exc} "
                          "(training continues; reported once)", file=self._err or sys.stderr, flush=True)

    def start(self, run: RunInfo) -> None:
        self._each("start", run)

    def step(self, sample: StepSample) -> None:
        self._each("step", sample)

    def validation(self, sample: ValidationSample) -> None:
        self._each("validation", sample)

    def progress(self, sample: ProgressSample) -> None:
        self._each("progress", sample)

    def stragglers(self, report: StragglerReport) -> None:
        self._each("stragglers", report)

    def throughput(self, report: ThroughputReport) -> None:
        self._each("throughput", report)

    def checkpoint(self, event: CheckpointEvent) -> None:
        self._each("checkpoint", event)

    def alert(self, alert: Alert) -> None:
        self._each("alert", alert)

    def degraded(self, component: str, message: str) -> None:
        self._each("degraded", component, message)

    def finish(self, outcome: Outcome) -> None:
        self._each("finish", outcome)


class ConsoleSink(MetricSink):
    """Rank 0 prints alerts; every rank prints its own health problems, once per component."""

    name = "console"

    def __init__(self, rank: int, out: Callable[[str], None] | None = None):
        self.rank = rank
        self._out = out or (lambda line: print(line, flush=True))
        self._said: set[str] = set()

    def alert(self, alert: Alert) -> None:
        if self.rank == 0:
            first, *rest = alert.text.splitlines() or [""]
            self._out(f"monitoring: [{alert.level.value}] {alert.title}: {first}")

    def degraded(self, component: str, message: str) -> None:
        if component not in self._said:
            self._said.add(component)
            self._out(f"monitoring: rank {self.rank}: {message}")
