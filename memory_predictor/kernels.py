"""The one decision of which kernels a run uses: the trainer builds with it, the predictor predicts with it.

Inputs: the GPU type (``cpu`` for gloo runs) and whether Transformer Engine is available on the
nodes (the launcher resolves ``cluster.transformer_engine``: a container image is taken to carry
it, as NGC/DLC images do; otherwise the launching Python environment is probed). Output: a
frozen :class:`Kernels` the trainer maps onto megatron's TransformerConfig and layer spec, and the
predictor onto its activation and speed model. The run directory records it (``kernels.json``);
the ranks refuse to start when the kernels planned at launch are not importable there, instead
of silently falling back to slower, hungrier ones.

On GPUs with Transformer Engine these are Megatron-LM's Llama recipe settings: TE layers (fused
norm + linear, fused/flash attention), fused SwiGLU (``bias_activation_fusion``), fused RoPE,
weight-gradient accumulation fused into the GEMM, and megatron's fused vocab-parallel cross entropy.
Without TE on a GPU: megatron's local layers with unfused ``s^2`` attention and only the fusions
megatron implements itself (SwiGLU through its JIT fuser, the native cross entropy). On CPU:
plain torch ops everywhere (the tests' path).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Kernels:
    transformer_engine: bool  # TE layer spec (fused norm+linear, TE attention); megatron's local spec otherwise
    flash_attention: bool  # TE fused/flash attention: no s^2 score tensor kept
    fused_swiglu: bool  # bias_activation_fusion: one kernel for silu(gate) * up
    rope_fusion: bool  # apply_rope_fusion (TE's fused RoPE)
    masked_softmax_fusion: bool  # only meaningful for the local attention
    gradient_accumulation_fusion: bool  # weight-gradient GEMM accumulates into main_grad (TE)
    cross_entropy_fusion: bool  # cross_entropy_loss_fusion
    cross_entropy_impl: str  # "te" | "native"
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_kernels(gpu_type: str, *, transformer_engine: bool) -> Kernels:
    """The kernels for this device and software (pure: the caller says whether TE is there)."""
    if gpu_type == "cpu":
        return Kernels(transformer_engine=False, flash_attention=False, fused_swiglu=False, rope_fusion=False,
                       masked_softmax_fusion=False, gradient_accumulation_fusion=False, cross_entropy_fusion=False,
                       cross_entropy_impl="native", reason="CPU (gloo): plain torch ops")
    if transformer_engine:
        return Kernels(transformer_engine=True, flash_attention=True, fused_swiglu=True, rope_fusion=True,
                       masked_softmax_fusion=False, gradient_accumulation_fusion=True, cross_entropy_fusion=True,
                       cross_entropy_impl="native",  # megatron's own fused kernel: no TE version requirement
                       reason="GPU with Transformer Engine: Megatron-LM's Llama recipe kernels")
    return Kernels(transformer_engine=False, flash_attention=False, fused_swiglu=True, rope_fusion=False,
                   masked_softmax_fusion=False, gradient_accumulation_fusion=False, cross_entropy_fusion=True,
                   cross_entropy_impl="native",
                   reason="GPU WITHOUT Transformer Engine: megatron's local layers, unfused s^2 attention "
                          "(slower, more activation memory; no context parallelism or TP comm overlap)")
