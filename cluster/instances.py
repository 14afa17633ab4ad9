"""Per-instance EFA/NCCL environment for AWS GPU instances (HyperPod names carry ``ml.``).

Values follow the public awsome-distributed-training P5/P4de scripts. The AMI and the
NGC/DLC containers set some of these already; setting them explicitly keeps a job's
behaviour independent of the image. CUDA_DEVICE_MAX_CONNECTIONS=1 is needed by
Megatron's TP communication overlap. What an instance *is* (GPUs, EFA devices) lives in
the config's hardware catalogue, configs.hardware.
"""

from __future__ import annotations

from configs.hardware import lookup_instance

Env = tuple[tuple[str, str], ...]

# Any NVIDIA GPU cluster, EFA or not.
GPU_ENV: Env = (
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    ("TORCH_NCCL_AVOID_RECORD_STREAMS", "1"),
    ("CUDA_DEVICE_MAX_CONNECTIONS", "1"),
    ("NCCL_DEBUG", "WARN"),
)

_COMMON_EFA: Env = (
    ("FI_PROVIDER", "efa"),
    ("FI_EFA_FORK_SAFE", "1"),
    ("NCCL_SOCKET_IFNAME", "^lo,docker0,veth_def_agent"),
    ("NCCL_BUFFSIZE", "8388608"),
    ("NCCL_P2P_NET_CHUNKSIZE", "524288"),
)

_P5_EXTRA: Env = (
    ("FI_EFA_SET_CUDA_SYNC_MEMOPS", "0"),
    ("NCCL_NVLS_ENABLE", "0"),
)

_P4_EXTRA: Env = (("FI_EFA_USE_DEVICE_RDMA", "1"),)

_EFA_ENV: dict[str, Env] = {
    "p5.48xlarge": _COMMON_EFA + _P5_EXTRA,
    "p5e.48xlarge": _COMMON_EFA + _P5_EXTRA,
    "p5en.48xlarge": _COMMON_EFA + _P5_EXTRA,
    "p4de.24xlarge": _COMMON_EFA + _P4_EXTRA,
    "p4d.24xlarge": _COMMON_EFA + _P4_EXTRA,
}


def instance_env(name: str) -> Env:
    """The EFA/NCCL environment of an instance (EC2 or ``ml.`` name); empty when unknown."""
    inst = lookup_instance(name)
    return _EFA_ENV.get(inst.name, ()) if inst is not None else ()
