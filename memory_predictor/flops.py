"""Model FLOPs per training step and MFU: pure functions, no torch.

FLOPs follow Megatron-LM's ``num_floating_point_operations`` (Narayanan et al. 2021, appendix)
for a dense Llama-style model with grouped-query attention and SwiGLU:

    12 * B * s * L * h^2 * ( (1 + g/a + s/h) * (a*d/h)    attention: Q,K,V,out + scores + AV
                             + 3/2 * f/h                   SwiGLU MLP (three h x f GEMMs)
                             + V / (2 * L * h) )           logits

with B sequences of length s per step, L layers, hidden h, a heads of size d, g KV groups,
FFN size f, padded vocab V. The factor 12 = 3 (forward, weight-grad, data-grad) x 2 (two
GEMMs of each size) x 2 (multiply-add). Attention scores are counted in full (no causal
halving), as Megatron-LM does.

:func:`model_flops_per_step` is what the trainer's ``tflops_per_gpu`` and MFU report: *model* FLOPs, so
recomputation never inflates them. :func:`hardware_flops_per_step` adds the recomputed forward
work (what the GPUs actually execute) for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class FlopsShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    padded_vocab_size: int
    seq_length: int
    kv_channels: Optional[int] = None  # head size; hidden_size / num_attention_heads when None

    @property
    def head_size(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


def _per_sequence_terms(m: FlopsShape) -> tuple[float, float, float, float]:
    """(projections, attention scores+AV, MLP, logits) training FLOPs for one sequence."""
    h, s, L = m.hidden_size, m.seq_length, m.num_layers
    scale = 12.0 * s * L * h * h
    q_ratio = m.head_size * m.num_attention_heads / h
    projections = scale * (1.0 + m.num_query_groups / m.num_attention_heads) * q_ratio
    scores = scale * (s / h) * q_ratio
    mlp = scale * 1.5 * m.ffn_hidden_size / h
    logits = scale * m.padded_vocab_size / (2.0 * L * h)
    return projections, scores, mlp, logits


def model_flops_per_step(m: FlopsShape, global_batch_size: int) -> float:
    """Training FLOPs of one optimizer step (forward + backward), recomputation excluded."""
    return global_batch_size * sum(_per_sequence_terms(m))


def hardware_flops_per_step(m: FlopsShape, global_batch_size: int, recompute: str) -> float:
    """Model FLOPs plus recomputed forward work.

    ``selective`` recomputes core attention (scores and AV: one extra forward of that term,
    i.e. +1/3 of it); ``full`` with the uniform method recomputes every layer's forward
    (+1/3 of all layer work; the logits are not recomputed).
    """
    projections, scores, mlp, logits = _per_sequence_terms(m)
    extra = 0.0
    if recompute == "selective":
        extra = scores / 3.0
    elif recompute == "full":
        extra = (projections + scores + mlp) / 3.0
    return global_batch_size * (projections + scores + mlp + logits + extra)


def tflops_per_gpu(flops_per_step: float, step_time_s: float, num_gpus: int) -> float:
    return flops_per_step / step_time_s / num_gpus / 1e12


def mfu_percent(achieved_tflops_per_gpu: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in percent, or None when the device has no peak (CPU)."""
    if not peak_tflops:
        return None
    return 100.0 * achieved_tflops_per_gpu / peak_tflops
