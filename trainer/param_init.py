"""Initial weights that depend on (seed, parameter name) only, never on the parallel layout.

megatron initialises each shard from the RNG state of the rank that holds it, so the same seed
gives different models at TP1 and TP2, or PP1 and PP2. Here every parameter is drawn whole
from a generator seeded by its *global* name (layer numbers counted over the whole model) and
this rank keeps its tensor-parallel shard. Losses are then comparable across layouts, and a
run can be restarted on another layout from the same seed.

Distributions follow megatron: N(0, std) for weights and embeddings, N(0, std/sqrt(2L)) for the
projections that write into the residual stream (``linear_proj``, ``linear_fc2``), 1 for norms.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_RESIDUAL_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight")


def global_name(local_name: str, layer_numbers: list[int], tied_embeddings: bool) -> str:
    """Name of a parameter in the unsplit model (``layer_numbers``: 1-based global numbers)."""
    if tied_embeddings and local_name == "output_layer.weight":
        # the last stage's copy of a tied embedding starts equal to the first stage's
        return "embedding.word_embeddings.weight"
    match = _LAYER.match(local_name)
    if match is None:
        return local_name
    global_index = layer_numbers[int(match.group(1))] - 1
    return f"decoder.layers.{global_index}.{local_name[match.end():]}"


def _std(name: str, config: TransformerConfig) -> float | None:
    """None for norm weights (ones)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(_RESIDUAL_OUTPUTS):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


def _local_shard(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = getattr(param, "partition_dim")
    stride = getattr(param, "partition_stride", 1)
    # stride 2 (SwiGLU fc1): each rank holds [gate shard; up shard]
    pieces = torch.chunk(full, tp_size * stride, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


@torch.no_grad()
def initialize_layout_independent(chunk: torch.nn.Module, config: TransformerConfig, *, seed: int,
                                  tied_embeddings: bool) -> None:
    """Overwrite every parameter of one (unwrapped) GPTModel chunk in place."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    decoder = getattr(chunk, "decoder", None)
    layer_numbers = [layer.layer_number for layer in decoder.layers] if decoder is not None else []
    for local_name, param in chunk.named_parameters():
        name = global_name(local_name, layer_numbers, tied_embeddings)
        std = _std(name, config)
        shape = list(param.shape)
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            shape[getattr(param, "partition_dim")] *= tp_size
        if std is None:
            full = torch.ones(shape, dtype=torch.float32, device=param.device)
        else:
            generator = torch.Generator(device=param.device)
            generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            full = torch.empty(shape, dtype=torch.float32, device=param.device)
            full.normal_(0.0, std, generator=generator)
        param.copy_(_local_shard(full, param, tp_rank, tp_size))
