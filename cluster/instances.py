"""The NCCL/EFA environment a job gets, by instance type (HyperPod names carry ``ml.``).

Kept short on purpose, following the current aws-ofi-nccl and EFA installer guidance (the
plugin configures libfabric and NCCL itself):

* not set any more: ``FI_PROVIDER=efa`` (only plugins <= 1.5 needed it), ``FI_EFA_USE_DEVICE_RDMA``
  (default since libfabric 1.18 with plugin >= 1.7), ``FI_EFA_SET_CUDA_SYNC_MEMOPS`` (removed in
  libfabric 1.19, EFA installer >= 1.29), ``FI_EFA_FORK_SAFE`` (the plugin sets it),
  ``NCCL_BUFFSIZE``/``NCCL_P2P_NET_CHUNKSIZE`` (the plugin tunes them per platform),
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (PyTorch's default 3 skips the communicator abort that
  can hang and delay auto-resume) and ``TORCH_NCCL_AVOID_RECORD_STREAMS`` (deprecated; NVIDIA
  advises unsetting it after wrong losses with Megatron's VPP). An older stack can still get
  any of them through ``cluster.env``.
* ``NCCL_NVLS_ENABLE``: left to NCCL and the plugin (which disables NVLS before NCCL 2.18.5 and
  tunes it on P5) unless ``cluster.nccl_nvls`` says otherwise.
* without a container image, the EFA installer's libfabric and the aws-ofi-nccl plugin are put on
  ``LD_LIBRARY_PATH`` (a pip-installed NCCL would otherwise not find the plugin and fall back to
  TCP sockets); images carry their own.

What an instance *is* (GPUs, EFA devices) lives in the config's hardware catalogue
(configs.hardware).
"""

from __future__ import annotations

from typing import Optional

from configs.hardware import lookup_instance

Env = tuple[tuple[str, str], ...]

# Any NVIDIA GPU cluster, EFA or not. CUDA_DEVICE_MAX_CONNECTIONS=1: Megatron's TP/CP
# communication overlap orders kernels on one hardware queue.
GPU_ENV: Env = (
    ("CUDA_DEVICE_MAX_CONNECTIONS", "1"),
    ("NCCL_DEBUG", "WARN"),
)

# bootstrap traffic stays off the loopback, docker and HyperPod agent interfaces
EFA_ENV: Env = (("NCCL_SOCKET_IFNAME", "^lo,docker0,veth_def_agent"),)

# where the EFA installer puts libfabric and the aws-ofi-nccl plugin (hosts without a container)
EFA_LIBRARY_DIRS = ("/opt/amazon/efa/lib", "/opt/amazon/ofi-nccl/lib", "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu",
                    "/opt/aws-ofi-nccl/lib")


def instance_env(name: str, *, nvls: Optional[bool] = None) -> Env:
    """The EFA/NCCL environment of an instance (EC2 or ``ml.`` name); empty when unknown."""
    if lookup_instance(name) is None:
        return ()
    env = EFA_ENV
    if nvls is not None:
        env += (("NCCL_NVLS_ENABLE", "1" if nvls else "0"),)
    return env


def efa_device_count_command() -> str:
    """Shell: the number of EFA devices libfabric sees (one ``domain`` per device for RDM endpoints)."""
    return "fi_info -p efa -t FI_EP_RDM 2>/dev/null | awk '/domain:/ {print $2}' | sort -u | wc -l"
