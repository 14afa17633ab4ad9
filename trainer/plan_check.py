"""Plan vs actual: the run's measured step time and peak memory against its own ``prediction.json``.

The launcher writes the predictor's estimate of the layout it runs into every run directory
(``launcher.sizing``). Every ``monitoring.plan.window_steps`` steps after a warm-up the ranks
exchange one row each (window medians of compute and data wait, peak memory: one tiny
all-gather, at the same step on every rank) and rank 0 compares:

* step time: the window median of rank 0's step times / the predicted step time;
* peak memory: the largest rank's peak / the predicted peak (CUDA: the allocator's reserved
  peak against the predicted reserved bytes; CPU: the process's peak resident set against the
  predicted total, whose "context" is the interpreter with torch and megatron loaded).

A ratio outside the band (``monitoring.plan``) is *drift*; the comparison names the likely
causes from what was measured: data waits, a straggling rank, uneven steps, memory far below
or above the estimate, or, when none of these shows, a cluster that runs differently from the
predictor's model (then ``python -m memory_predictor calibrate`` refits it from finished runs).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from configs.monitoring_config import PlanCheckConfig

PREDICTION_FILE = "prediction.json"


@dataclass(frozen=True)
class Prediction:
    step_time_s: float
    peak_bytes: Optional[int]  # what is compared: the allocator's reserved peak (CUDA) or the process total (CPU)


@dataclass(frozen=True)
class Measured:
    step_time_s: float  # window median of the job's step wall time
    compute_s: tuple[float, ...]  # window median of each rank's compute time, by rank
    data_wait_share: float  # the largest rank's median data wait / step time
    slow_share: float  # share of training time in steps slower than 1.25 x the median (the ledger's straggler part)
    peak_bytes: Optional[int]  # the largest rank's peak, or None when not measurable
    memory_kind: str = "cuda_reserved"


@dataclass(frozen=True)
class PlanComparison:
    predicted: Prediction
    measured: Measured
    step_ratio: float
    memory_ratio: Optional[float]
    drift: bool
    causes: tuple[str, ...]

    def line(self) -> str:
        m, p = self.measured, self.predicted
        text = (f"plan: step time {m.step_time_s:.3f} s measured vs {p.step_time_s:.3f} s predicted "
                f"(x{self.step_ratio:.2f})")
        if self.memory_ratio is not None and m.peak_bytes is not None and p.peak_bytes:
            text += (f", peak memory {m.peak_bytes / 2**30:.2f} GiB ({m.memory_kind}) vs {p.peak_bytes / 2**30:.2f} GiB "
                     f"predicted (x{self.memory_ratio:.2f})")
        text += "; " + ("DRIFT" if self.drift else "within the plan's band")
        if self.causes:
            text += ": likely " + "; ".join(self.causes)
        return text


def read_prediction(run_dir: Optional[str], cuda: bool) -> Optional[Prediction]:
    """The run's prediction; its peak is the allocator's reserved bytes on CUDA (what
    ``torch.cuda.max_memory_reserved`` measures: no CUDA context, no NCCL) and the process total on
    CPU (the CPU trainer's "context" is the interpreter with torch and megatron loaded)."""
    if not run_dir:
        return None
    try:
        raw: dict[str, Any] = json.loads((Path(run_dir) / PREDICTION_FILE).read_text())
        step = float(raw["step_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    peak = raw.get("peak_bytes")
    if cuda:
        breakdown = raw.get("breakdown")
        peak_part = breakdown.get("peak") if isinstance(breakdown, dict) else None
        peak = peak_part.get("reserved") if isinstance(peak_part, dict) else None
    return Prediction(step_time_s=step, peak_bytes=int(peak) if isinstance(peak, (int, float)) and peak > 0 else None)


def compare(predicted: Prediction, measured: Measured, cfg: PlanCheckConfig) -> PlanComparison:
    """Pure: the ratios, whether they drift beyond the configured band, and the likely causes."""
    step_ratio = measured.step_time_s / predicted.step_time_s if predicted.step_time_s > 0 else float("inf")
    memory_ratio = (measured.peak_bytes / predicted.peak_bytes
                    if measured.peak_bytes is not None and predicted.peak_bytes else None)
    step_drift = not 1 / (1 + cfg.step_time_band) <= step_ratio <= 1 + cfg.step_time_band
    memory_drift = memory_ratio is not None and not cfg.memory_low <= memory_ratio <= cfg.memory_high
    causes: list[str] = []
    slow_step = step_drift and step_ratio > 1
    if slow_step and measured.data_wait_share >= cfg.data_wait_share:
        causes.append(f"data-wait dominated: ranks wait {measured.data_wait_share:.0%} of each step for batches "
                      "(data loading or the filesystem is the bottleneck)")
    if slow_step and len(measured.compute_s) > 1:
        median = statistics.median(measured.compute_s)
        worst = max(range(len(measured.compute_s)), key=lambda r: measured.compute_s[r])
        if median > 0 and measured.compute_s[worst] / median >= cfg.straggler_ratio:
            causes.append(f"a straggler: rank {worst} computes {measured.compute_s[worst]:.3g} s per step vs "
                          f"{median:.3g} s median (x{measured.compute_s[worst] / median:.2f})")
    if slow_step and measured.slow_share >= 0.1:
        causes.append(f"uneven steps: {measured.slow_share:.0%} of training time in steps slower than 1.25x the "
                      "median (stalls: checkpoints, I/O, network)")
    if memory_ratio is not None and memory_ratio < cfg.memory_low:
        causes.append(f"memory far below the prediction (x{memory_ratio:.2f}): a larger micro-batch or less "
                      "recomputation would fit; recalibrate the predictor's overheads")
    elif memory_ratio is not None and memory_ratio > cfg.memory_high:
        causes.append(f"memory above the prediction (x{memory_ratio:.2f}): out-of-memory risk at other shapes; "
                      "recalibrate the predictor's overheads")
    if step_drift and not any(c.startswith(("data-wait", "a straggler", "uneven")) for c in causes):
        how = "slower" if step_ratio > 1 else "faster"
        causes.append(f"the cluster runs {how} than the predictor's model (kernels, clocks or communication): "
                      "refit it from finished runs with `python -m memory_predictor calibrate --runs <runs root>`")
    return PlanComparison(predicted=predicted, measured=measured, step_ratio=step_ratio, memory_ratio=memory_ratio,
                          drift=step_drift or memory_drift, causes=tuple(causes) if (step_drift or memory_drift) else ())
