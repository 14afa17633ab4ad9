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
    # progress (trainer.progress): consumed / total tokens, ETA and wall time including restarts
    tokens_done: Optional[int] = None
    tokens_total: Optional[int] = None
    eta_s: Optional[float] = None
    elapsed_s: Optional[float] = None


def format_step_line(m: StepMetrics) -> str:
    """``step=3/30 loss=5.1234 grad_norm=1.234 lr=3.000e-03 step_time_s=0.123 tokens_per_s=4160.0
    tflops_per_gpu=0.012 mfu=n/a tokens=1.57K/15.7K progress=10.0% eta=0:00:12 elapsed=0:00:03``
    (``mfu=41.23%`` where the GPU has a peak; the progress fields when known)."""
    grad_norm = "n/a" if m.grad_norm is None else f"{m.grad_norm:.3f}"
    mfu = "n/a" if m.mfu_percent is None else f"{m.mfu_percent:.2f}%"
    line = (f"step={m.step}/{m.total_steps} loss={m.loss:.4f} grad_norm={grad_norm} lr={m.lr:.3e} "
            f"step_time_s={m.step_time_s:.3f} tokens_per_s={m.tokens_per_s:.1f} "
            f"tflops_per_gpu={m.tflops_per_gpu:.3f} mfu={mfu}")
    if m.tokens_done is not None and m.tokens_total:
        line += (f" tokens={human_count(m.tokens_done)}/{human_count(m.tokens_total)} "
                 f"progress={100.0 * m.tokens_done / m.tokens_total:.1f}%")
    if m.eta_s is not None:
        line += f" eta={human_duration(m.eta_s)}"
    if m.elapsed_s is not None:
        line += f" elapsed={human_duration(m.elapsed_s)}"
    return line


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def human_duration(seconds: float) -> str:
    """``H:MM:SS``, or ``Nd H:MM:SS`` past a day."""
    total = max(0, int(round(seconds)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{secs:02d}"


def parse_duration(text: str) -> float:
    days = 0
    if "d " in text:
        day_text, text = text.split("d ", 1)
        days = int(day_text)
    h, m, s = (int(x) for x in text.split(":"))
    return float(((days * 24 + h) * 60 + m) * 60 + s)


def format_final_line(steps: int, final_loss: float) -> str:
    return f"training finished: steps={steps} final_loss={final_loss:.4f}"


_STEP_LINE = re.compile(
    r"^step=(?P<step>\d+)/(?P<total>\d+) loss=(?P<loss>\S+) grad_norm=(?P<grad_norm>\S+) lr=(?P<lr>\S+) "
    r"step_time_s=(?P<time>\S+) tokens_per_s=(?P<tps>\S+) tflops_per_gpu=(?P<tflops>\S+) mfu=(?P<mfu>\S+)"
    r"(?: tokens=\S+/\S+ progress=(?P<progress>\S+)%)?(?: eta=(?P<eta>(?:\d+d )?\d+:\d\d:\d\d))?"
    r"(?: elapsed=(?P<elapsed>(?:\d+d )?\d+:\d\d:\d\d))?$")


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
        eta_s=parse_duration(g["eta"]) if g.get("eta") else None,
        elapsed_s=parse_duration(g["elapsed"]) if g.get("elapsed") else None,
    )
