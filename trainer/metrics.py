"""The per-step log line of rank 0: format and parse (pure functions, no torch).

``step=3/30 loss=5.8486 grad_norm=0.707 lr=3.000e-03 step_time_s=0.070 tokens_per_s=7300.0
tflops_per_gpu=0.011 mfu=n/a`` -- TFLOP/s and MFU come from memory_predictor.flops (the one
FLOPs formula, shared with the throughput model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StepMetrics:
    step: int  # 1-based
    total_steps: int
    loss: float
    grad_norm: Optional[float]
    lr: float
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu_percent: Optional[float]


def format_step_line(m: StepMetrics) -> str:
    """``step=3/30 loss=5.1234 grad_norm=1.234 lr=3.000e-03 step_time_s=0.123 tokens_per_s=4160.0
    tflops_per_gpu=0.012 mfu=n/a`` (``mfu=41.23%`` where the GPU has a peak)."""
    grad_norm = "n/a" if m.grad_norm is None else f"{m.grad_norm:.3f}"
    mfu = "n/a" if m.mfu_percent is None else f"{m.mfu_percent:.2f}%"
    return (f"step={m.step}/{m.total_steps} loss={m.loss:.4f} grad_norm={grad_norm} lr={m.lr:.3e} "
            f"step_time_s={m.step_time_s:.3f} tokens_per_s={m.tokens_per_s:.1f} "
            f"tflops_per_gpu={m.tflops_per_gpu:.3f} mfu={mfu}")


def format_final_line(steps: int, final_loss: float) -> str:
    return f"training finished: steps={steps} final_loss={final_loss:.4f}"


_STEP_LINE = re.compile(
    r"^step=(?P<step>\d+)/(?P<total>\d+) loss=(?P<loss>\S+) grad_norm=(?P<grad_norm>\S+) lr=(?P<lr>\S+) "
    r"step_time_s=(?P<time>\S+) tokens_per_s=(?P<tps>\S+) tflops_per_gpu=(?P<tflops>\S+) mfu=(?P<mfu>\S+)$")


def parse_step_line(line: str) -> Optional[StepMetrics]:
    """The inverse of :func:`format_step_line` (values rounded as printed); None for other lines."""
    match = _STEP_LINE.match(line.strip())
    if match is None:
        return None
    g = match.groupdict()
    return StepMetrics(
        step=int(g["step"]), total_steps=int(g["total"]), loss=float(g["loss"]),
        grad_norm=None if g["grad_norm"] == "n/a" else float(g["grad_norm"]), lr=float(g["lr"]),
        step_time_s=float(g["time"]), tokens_per_s=float(g["tps"]), tflops_per_gpu=float(g["tflops"]),
        mfu_percent=None if g["mfu"] == "n/a" else float(g["mfu"].rstrip("%")),
    )
