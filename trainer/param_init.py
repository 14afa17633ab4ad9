"""Initial weights that depend on (seed, parameter name) only, never on the parallel layout.

megatron initialises each shard from the RNG state of the rank that holds it, so the same seed
gives different models at TP1 and TP2, or PP1 and PP2. Here every parameter is drawn whole
from a generator seeded by its *global* name (layer numbers counted over the whole model) and
this rank keeps its tensor-parallel shard. Losses are then comparable across layouts, and a
run can be restarted on another layout from the same seed.

Distributions follow megatron: N(0, std) for weights and embeddings, N(0, std/sqrt(2L)) for the
projections that write into the residual stream (``linear_proj``, ``linear_fc2``), 1 for norm
weights, 0 for biases. What a parameter is comes from the module that owns it and its own name
(:func:`param_role`), not from a suffix of the full name: Transformer Engine keeps the layer
norms inside the fused linears (``linear_qkv.layer_norm_weight``), where a suffix rule misses them.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_RESIDUAL_OUTPUTS = ("linear_proj", "linear_fc2")
NORM, BIAS, RESIDUAL, WEIGHT = "norm", "bias", "residual_output", "weight"


def is_norm_module(module: torch.nn.Module) -> bool:
    """torch/apex/TE/megatron norms, by class name (TE and apex need not be importable to tell)."""
    name = type(module).__name__
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or name.endswith(("Norm", "LayerNorm")) \
        or name in ("FusedLayerNorm", "WrappedTorchNorm", "TENorm", "MixedFusedRMSNorm")


def param_role(module_name: str, module: torch.nn.Module, param_name: str) -> str:
    """``norm`` (starts at 1), ``bias`` (0), ``residual_output`` (scaled N(0, std)) or ``weight``."""
    if param_name.startswith("layer_norm_"):  # TE's fused norm inside a linear: layer_norm_weight/_bias
        return BIAS if param_name.endswith("bias") else NORM
    if param_name == "bias" or param_name.endswith("_bias"):
        return BIAS
    if is_norm_module(module):
        return NORM
    if module_name.rsplit(".", 1)[-1] in _RESIDUAL_OUTPUTS:
        return RESIDUAL
    return WEIGHT


def parameter_roles(chunk: torch.nn.Module) -> dict[str, str]:
    """Full parameter name -> role, for every parameter of a model chunk."""
    roles: dict[str, str] = {}
    for module_name, module in chunk.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            roles.setdefault(full, param_role(module_name, module, param_name))
    return roles


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


def _std(role: str, config: TransformerConfig) -> float:
    if role == RESIDUAL:
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
    roles = parameter_roles(chunk)
    for local_name, param in chunk.named_parameters():
        name = global_name(local_name, layer_numbers, tied_embeddings)
        role = roles[local_name]
        shape = list(param.shape)
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            shape[getattr(param, "partition_dim")] *= tp_size
        if role in (NORM, BIAS):
            full = torch.full(shape, 1.0 if role == NORM else 0.0, dtype=torch.float32, device=param.device)
        else:
            std = _std(role, config)
            generator = torch.Generator(device=param.device)
            generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            full = torch.empty(shape, dtype=torch.float32, device=param.device)
            full.normal_(0.0, std, generator=generator)
        param.copy_(_local_shard(full, param, tp_rank, tp_size))
