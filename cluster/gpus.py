"""GPU catalogue: memory and peak dense throughput per accelerator type.

Peak numbers are the vendor's dense (no sparsity) tensor-core figures; MFU divides
achieved model FLOP/s by these. ``cpu`` has no meaningful peak, so MFU is not reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GIB = 1024**3


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_bytes: int
    peak_bf16_tflops: Optional[float]  # dense; None for CPU
    description: str


GPU_TYPES: dict[str, GpuType] = {
    g.name: g
    for g in (
        GpuType("a100-40gb", 40 * GIB, 312.0, "NVIDIA A100 SXM 40 GB (p4d)"),
        GpuType("a100-80gb", 80 * GIB, 312.0, "NVIDIA A100 SXM 80 GB (p4de)"),
        GpuType("h100-80gb", 80 * GIB, 989.0, "NVIDIA H100 SXM 80 GB (p5)"),
        GpuType("h100-94gb", 94 * GIB, 989.0, "NVIDIA H100 NVL 94 GB"),
        GpuType("h200-141gb", 141 * GIB, 989.0, "NVIDIA H200 141 GB (p5e/p5en)"),
        GpuType("cpu", 0, None, "CPU processes (gloo), for local runs and tests"),
    )
}


def gpu_type(name: str) -> GpuType:
    """Look up a GPU type; KeyError lists the valid names (validation catches it first)."""
    try:
        return GPU_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown GPU type {name!r}; valid: {', '.join(GPU_TYPES)}") from None
