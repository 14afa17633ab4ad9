"""Straggler and throughput-drop detection: pure functions of window medians (no torch, no I/O).

Signal. Every rank times its own compute (forward passes, CUDA events on GPU) each step; whole
step wall time is useless because data-parallel collectives make it equal on every rank. Each
interval (``interval_steps``) every rank reduces its window to a median, which ignores GC
pauses, one-off spikes and data-loader hiccups that hit fewer than half the steps.

Scores, computed per *group* of ranks doing the same work (same pipeline stage):

* relative score = reference / this rank's median, capped at 1. The reference is the median of
  the faster half of the group (the fastest rank for two ranks), so it stays put when up to half
  the group slows down and does not chase the single luckiest rank.
* individual score = this rank's best past median / its current median (nvidia-resiliency-ext's
  definition), normalized by the group's reference individual score. A rank that was the fastest
  GPU and becomes 10% slower is still caught although it is not yet 7.5% slower than its peers;
  job-wide slowdowns (all ranks slower together) cancel out. It only counts for a rank slower
  than the reference (a straggler is slower than its peers, whatever its own history), and only
  after ``MIN_HISTORY`` windows (before that its "best" is noise).
* score = min(relative / (1 - peer_tolerance), normalized individual), capped at 1: healthy GPUs
  differ by a few percent (silicon, cooling), so a rank is not flagged for being one of the
  slower healthy ones. A rank is flagged once its score stays below
  ``raise_score`` for ``consecutive`` intervals and cleared once it stays at or above
  ``clear_score`` as long: hysteresis, so a flag does not flap.

A whole-job throughput drop is the other half: the window median of tokens/s against a baseline,
the median of the better half of the last ``baseline_intervals`` windows (the same rule as the
straggler reference). Not the best window: one lucky window would raise the bar for every later
one, so a job whose tokens/s jitter would flap, and would not be seen to recover. A drop that
lasts for about half of ``baseline_intervals`` becomes the new baseline and is reported as
recovered. Nothing is flagged before ``MIN_BASELINE`` windows.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median, median_low
from typing import Iterable, Sequence

from configs.monitoring_config import StragglerConfig
from monitoring.events import RankIdentity, RankScore, StragglerReport, ThroughputReport


@dataclass(frozen=True)
class RankWindow:
    rank: int
    group: int  # ranks are compared only within a group (pipeline stage)
    median_s: float  # window median of this rank's compute seconds


def window_median(values: Iterable[float]) -> float:
    """The lower median: a window counts as slow only when MORE than half its steps were slow."""
    vals = [v for v in values if math.isfinite(v) and v > 0]
    return median_low(vals) if vals else 0.0


def reference(values: Sequence[float], higher_is_better: bool = False) -> float:
    """Median of the better half: the fastest of two, about the quartile of many."""
    ordered = sorted(values, reverse=higher_is_better)
    better = ordered[: (len(ordered) + 1) // 2]
    return median(better) if better else 0.0


MIN_HISTORY = 3  # windows a rank needs before its individual score counts (its best is noise before)
MIN_BASELINE = 5  # windows the throughput baseline needs (the better half of fewer is one lucky window)


@dataclass
class _RankState:
    best_s: float = math.inf
    windows: int = 0
    below: int = 0
    above: int = 0
    flagged: bool = False


class StragglerDetector:
    """Feed one list of window medians per interval; get scores and raise/clear events."""

    def __init__(self, cfg: StragglerConfig):
        self.cfg = cfg
        self._state: dict[int, _RankState] = {}

    def update(self, step: int, windows: Sequence[RankWindow],
               identities: dict[int, RankIdentity] | None = None) -> StragglerReport:
        scores: list[RankScore] = []
        raised: list[int] = []
        cleared: list[int] = []
        groups: dict[int, list[RankWindow]] = {}
        for w in windows:
            groups.setdefault(w.group, []).append(w)
        for members in groups.values():
            valid = [w for w in members if w.median_s > 0 and math.isfinite(w.median_s)]
            ref = reference([w.median_s for w in valid])
            individual: dict[int, float] = {}
            for w in valid:
                st = self._state.setdefault(w.rank, _RankState())
                st.best_s = min(st.best_s, w.median_s)
                st.windows += 1
                individual[w.rank] = st.best_s / w.median_s if st.windows >= MIN_HISTORY else 1.0
            ref_individual = reference(list(individual.values()), higher_is_better=True)
            for w in members:
                st = self._state.setdefault(w.rank, _RankState())
                if w.rank in individual and len(valid) > 1:
                    relative = min(1.0, ref / w.median_s)
                    normalized = min(1.0, individual[w.rank] / ref_individual) if ref_individual > 0 else 1.0
                    if relative >= 1.0:  # as fast as the reference: no straggler, whatever its history
                        normalized = 1.0
                    score = min(1.0, relative / (1.0 - self.cfg.peer_tolerance), normalized)
                else:  # alone in its group, or no data: nothing to compare with
                    relative, score = 1.0, 1.0
                ind = individual.get(w.rank, 1.0)
                st.below = st.below + 1 if score < self.cfg.raise_score else 0
                st.above = st.above + 1 if score >= self.cfg.clear_score else 0
                if not st.flagged and st.below >= self.cfg.consecutive:
                    st.flagged = True
                    raised.append(w.rank)
                elif st.flagged and st.above >= self.cfg.consecutive:
                    st.flagged = False
                    cleared.append(w.rank)
                scores.append(RankScore(rank=w.rank, window_median_s=w.median_s, reference_s=ref, relative=relative,
                                        individual=ind, score=score, flagged=st.flagged))
        scores.sort(key=lambda s: s.rank)
        return StragglerReport(step=step, scores=tuple(scores), raised=tuple(sorted(raised)),
                               cleared=tuple(sorted(cleared)), identities=dict(identities or {}))


class ThroughputWatch:
    """Flags a whole-job slowdown: window tokens/s below (1 - drop) x the baseline (see the module doc);
    clears it at (1 - drop / 2) x the baseline. Both after ``consecutive`` windows."""

    def __init__(self, cfg: StragglerConfig):
        self.cfg = cfg
        self._history: deque[float] = deque(maxlen=cfg.baseline_intervals)
        self._below = 0
        self._above = 0
        self.dropped = False

    def update(self, step: int, tokens_per_s: float) -> ThroughputReport:
        baseline = reference(list(self._history), higher_is_better=True) if self._history else tokens_per_s
        changed = False
        if tokens_per_s <= 0 or baseline <= 0:
            return ThroughputReport(step=step, tokens_per_s=tokens_per_s, baseline=baseline,
                                    dropped=self.dropped, changed=False)
        if len(self._history) >= min(MIN_BASELINE, self.cfg.baseline_intervals):
            low = tokens_per_s < (1.0 - self.cfg.throughput_drop) * baseline
            recovered = tokens_per_s >= (1.0 - self.cfg.throughput_drop / 2) * baseline
            self._below = self._below + 1 if low else 0
            self._above = self._above + 1 if recovered else 0
            if not self.dropped and self._below >= self.cfg.consecutive:
                self.dropped, changed = True, True
            elif self.dropped and self._above >= self.cfg.consecutive:
                self.dropped, changed = False, True
        self._history.append(tokens_per_s)
        return ThroughputReport(step=step, tokens_per_s=tokens_per_s, baseline=baseline,
                                dropped=self.dropped, changed=changed)
