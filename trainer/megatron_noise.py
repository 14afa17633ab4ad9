"""Silence megatron-core warnings that are expected here and repeat once per rank."""

from __future__ import annotations

import warnings

_EXPECTED = (
    ".*Apex are not installed.*",  # no Transformer Engine / apex: megatron's local fallbacks
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",  # TransformerConfig's own default for cuda_graph_scope
    ".*grad attribute of a Tensor that is not a leaf.*",  # megatron's DistributedOptimizer.zero_grad
    ".*If you are using transformer_engine as the transformer implementation.*",  # selective recompute
    ".*all_gather_into_tensor. is deprecated.*",  # torch 2.13 renames, called inside megatron
    ".*reduce_scatter_tensor. is deprecated.*",
    ".*`load_state_dict` is deprecated and will be removed.*",  # megatron's torch_dist checkpoint load
    ".*Please use DTensor instead and we are deprecating ShardedTensor.*",
)


def silence() -> None:
    for message in _EXPECTED:
        warnings.filterwarnings("ignore", message=message)


def silence_cpu_only() -> None:
    """On CPU, CUDA tuning advice is noise (on GPUs the launcher sets the variable)."""
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
