"""Hardware catalogues the config is checked against: GPU types and AWS GPU instances.

GPU peak numbers are the vendor's dense (no sparsity) tensor-core figures; MFU divides
achieved model FLOP/s by these. ``cpu`` has no meaningful peak, so MFU is not reported.
Instances carry what validation needs (GPU type and count, EFA devices); the NCCL/EFA
environment each one gets lives with the script renderer (cluster.instances).
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


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu_type: str
    gpus: int
    efa_devices: int


INSTANCE_TYPES: dict[str, InstanceType] = {
    i.name: i
    for i in (
        InstanceType("p5.48xlarge", "h100-80gb", 8, 32),
        InstanceType("p5e.48xlarge", "h200-141gb", 8, 32),
        InstanceType("p5en.48xlarge", "h200-141gb", 8, 16),
        InstanceType("p4de.24xlarge", "a100-80gb", 8, 4),
        InstanceType("p4d.24xlarge", "a100-40gb", 8, 4),
    )
}


def lookup_instance(name: str) -> InstanceType | None:
    """Find an instance by its EC2 or HyperPod (``ml.``-prefixed) name."""
    return INSTANCE_TYPES.get(name.removeprefix("ml."))
