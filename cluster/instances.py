"""Per-instance EFA/NCCL environment for AWS GPU instances (HyperPod names carry ``ml.``).

Values follow the public awsome-distributed-training P5/P4de scripts. The AMI and the
NGC/DLC containers set some of these already; setting them explicitly keeps a job's
behaviour independent of the image. CUDA_DEVICE_MAX_CONNECTIONS=1 is needed by
Megatron's TP communication overlap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu_type: str
    gpus: int
    efa_devices: int
    env: tuple[tuple[str, str], ...]


# Any NVIDIA GPU cluster, EFA or not.
GPU_ENV = (
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    ("TORCH_NCCL_AVOID_RECORD_STREAMS", "1"),
    ("CUDA_DEVICE_MAX_CONNECTIONS", "1"),
    ("NCCL_DEBUG", "WARN"),
)

_COMMON_EFA = (
    ("FI_PROVIDER", "efa"),
    ("FI_EFA_FORK_SAFE", "1"),
    ("NCCL_SOCKET_IFNAME", "^lo,docker0,veth_def_agent"),
    ("NCCL_BUFFSIZE", "8388608"),
    ("NCCL_P2P_NET_CHUNKSIZE", "524288"),
)

_P5_EXTRA = (
    ("FI_EFA_SET_CUDA_SYNC_MEMOPS", "0"),
    ("NCCL_NVLS_ENABLE", "0"),
)

_P4_EXTRA = (("FI_EFA_USE_DEVICE_RDMA", "1"),)

INSTANCE_TYPES: dict[str, InstanceType] = {
    i.name: i
    for i in (
        InstanceType("p5.48xlarge", "h100-80gb", 8, 32, _COMMON_EFA + _P5_EXTRA),
        InstanceType("p5e.48xlarge", "h200-141gb", 8, 32, _COMMON_EFA + _P5_EXTRA),
        InstanceType("p5en.48xlarge", "h200-141gb", 8, 16, _COMMON_EFA + _P5_EXTRA),
        InstanceType("p4de.24xlarge", "a100-80gb", 8, 4, _COMMON_EFA + _P4_EXTRA),
        InstanceType("p4d.24xlarge", "a100-40gb", 8, 4, _COMMON_EFA + _P4_EXTRA),
    )
}


def lookup_instance(name: str) -> InstanceType | None:
    """Find an instance by its EC2 or HyperPod (``ml.``-prefixed) name."""
    return INSTANCE_TYPES.get(name.removeprefix("ml."))
