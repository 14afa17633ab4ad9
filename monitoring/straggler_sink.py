"""The straggler detector as a sink: windows per-rank compute times, gathers them, scores them.

Every ``interval_steps`` steps (after ``warmup_steps``) each rank contributes ``[window median of
its compute seconds, its pipeline stage]`` to one all-gather of ``world_size x 2`` floats; every
rank then runs the same pure detector (monitoring.straggler) on the same numbers, exports its own
scores, and rank 0 raises and clears the alerts. The gather is the only collective monitoring
makes, and every rank calls it at the same steps, whatever its sinks are doing.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from monitoring.alerts import straggler_alerts, throughput_alert
from configs.monitoring_config import StragglerConfig
from monitoring.events import Alert, RankIdentity, StepSample
from monitoring.sinks import MetricSink
from monitoring.straggler import RankWindow, StragglerDetector, ThroughputWatch, window_median

Gather = Callable[[list[float]], list[list[float]]]  # this rank's row -> every rank's row, by rank


class StragglerSink(MetricSink):
    name = "straggler"

    def __init__(self, cfg: StragglerConfig, rank: int, group: int, world_size: int, gather: Optional[Gather],
                 downstream: MetricSink, emit_alert: Callable[[Alert], None], run: str = ""):
        self.cfg = cfg
        self.rank = rank
        self.group = group
        self.world_size = world_size
        self.gather = gather
        self.downstream = downstream
        self.emit_alert = emit_alert
        self.run = run
        self.identities: dict[int, RankIdentity] = {}
        self.detector = StragglerDetector(cfg)
        self.watch = ThroughputWatch(cfg)
        self._compute: list[float] = []
        self._tokens: list[float] = []
        self._seen = 0
        self._failed_once = False

    def step(self, sample: StepSample) -> None:
        self._seen += 1
        if self._seen <= self.cfg.warmup_steps:
            return
        self._compute.append(sample.compute_s)
        self._tokens.append(sample.tokens_per_s)
        if sample.step % self.cfg.interval_steps:
            return
        row = [window_median(self._compute), float(self.group)]
        # the collective runs on every rank at the same step; errors here mean the job is broken
        rows = self.gather(row) if self.gather is not None and self.world_size > 1 else [row]
        tokens = window_median(self._tokens)
        self._compute.clear()
        self._tokens.clear()
        try:
            self._detect(sample.step, rows, tokens)
        except Exception as exc:  # the detector must never stop training
            if not self._failed_once:
                self._failed_once = True
                print(f"monitoring: rank {self.rank}: straggler detection failed: {type(exc).__name__}: {exc} "
                      "(training continues; reported once)", file=sys.stderr, flush=True)

    def _detect(self, step: int, rows: list[list[float]], tokens_per_s: float) -> None:
        windows = [RankWindow(rank=r, group=int(g), median_s=m) for r, (m, g, *_) in enumerate(rows)]
        report = self.detector.update(step, windows, self.identities)
        self.downstream.stragglers(report)
        throughput = self.watch.update(step, tokens_per_s)
        self.downstream.throughput(throughput)
        if self.rank != 0:
            return
        for alert in straggler_alerts(self.run, report):
            self.emit_alert(alert)
        drop = throughput_alert(self.run, throughput, report.flagged)
        if drop is not None:
            self.emit_alert(drop)
