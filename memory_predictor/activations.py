"""Activation bytes of one Llama layer for one micro-batch, item by item, on one rank.

Notation: s' = s / cp tokens of each sequence on this rank, b micro-batch, h hidden, a and k
query and KV heads (a/t and k/t per TP rank), d head size, f FFN size, e bytes per activation
element (2 for bf16/fp16, 4 for fp32). With sequence parallelism (SP) the tensors outside
attention and MLP are split over the sequence too (divided by t).

What megatron-core 0.16 keeps for backward in one layer. Every row was checked byte for byte
against the tensors autograd saves for megatron-core's own layer (the trainer's local spec)
on CPU -- tests/memory_predictor/test_crosscheck.py -- for the eager kernels (torch RMSNorm,
unfused softmax attention, unfused SwiGLU). The rows for the GPU kernels (TE fused RMSNorm,
flash attention) follow the kernels' documented saved tensors and are NOT measured here:

=====================  =====================================  ================================
item                   bytes                                  kept by
=====================  =====================================  ================================
norm_inputs            2 norms x e s'b h / sp (TE fused)      RMSNorm backward; eager torch
                       2 norms x 8 s'b h / sp (eager)         RMSNorm keeps two fp32 copies
norm_statistics        2 norms x 4 s'b / sp                   fp32 1/rms per token
gemm_inputs            2 x e s'b h / sp                       QKV and FC1 weight grads
attention_inputs       flash or selective: e s'b d (2a+3k)/t  rotated Q, K + the QKV output
                                                              kept alive by V (a view of it)
                       unfused: e s'b d 3a/t                  Q and K, V expanded to a heads
                       unfused MHA: e s'b d (3a+2k)/t         V a view of the QKV output
rope_tables            4 e s' d                               cos/sin for Q and K
attention_output       e s'b d a/t                            output projection
core_attention         flash: 4 s'b a/t (LSE)                 dropped by selective recompute
                       unfused: (4 + e) b a/t s'^2 + s'^2     fp32 softmax, its cast, mask
fc1_output             2 e s'b f/t                            SwiGLU backward (gate and up)
swiglu_temporaries     unfused: 2 e s'b f/t; fused: 0         silu(gate), up + glu offset
fc2_input              e s'b f/t                              FC2 weight grad
=====================  =====================================  ================================

(For fp32 activations the unfused softmax has no cast: 4 b a/t s'^2 + s'^2.) Whether TE's
flash attention copies V (saving (a+2k) instead of (2a+3k) heads) is settled conservatively:
the larger number, pending a GPU measurement. The published closed forms are special cases:
with e=2, fused kernels, no view retention and f=4h this is Korthikanti et al.'s
34 s b h / t for TP+SP+selective recompute, minus the dropout masks and biases Llama lacks.

Full recompute (uniform method, n layers per checkpoint) keeps only each checkpoint's input,
e s'b h / sp (measured: ceil(layers / n) inputs per chunk), and re-creates n layers'
activations during backward (counted in ``working``).
"""

from __future__ import annotations

from dataclasses import dataclass

from memory_predictor.spec import Layout, ModelSpec, Options

FP32 = 4


@dataclass(frozen=True, slots=True)
class LayerActivations:
    """Per layer and micro-batch (bytes): what is kept until backward, and the transient peak."""

    items: tuple[tuple[str, int], ...]
    per_layer: int  # sum of items: kept per layer (none/selective), re-created per layer (full)
    checkpoint_input: int  # full recompute: kept per checkpoint group
    working: int  # transient peak inside one layer's forward/backward, beyond what is kept
    full_recompute: bool
    layers_per_checkpoint: int

    def kept(self, layers: int) -> int:
        """Bytes kept for backward by ``layers`` consecutive layers of one micro-batch."""
        if self.full_recompute:
            return -(-layers // self.layers_per_checkpoint) * self.checkpoint_input
        return layers * self.per_layer


def kv_heads_per_rank(model: ModelSpec, tp: int) -> float:
    """KV heads on one TP rank; with fewer KV heads than ranks each rank keeps one."""
    return model.num_query_groups / tp if model.num_query_groups >= tp else 1.0


def layer_items(model: ModelSpec, seq_length: int, micro_batch: int, layout: Layout, opts: Options) -> dict[str, int]:
    """Bytes kept for backward by one layer under the layout's recompute choice (one micro-batch).

    For ``recompute="full"`` these are the items of a layer *while it is re-created*.
    """
    e = opts.act_bytes
    t, c = layout.tp, layout.cp
    sp = t if layout.sp else 1
    s_local = seq_length // c
    tokens = s_local * micro_batch
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    a_r = model.num_attention_heads / t
    k_r = kv_heads_per_rank(model, t)
    selective = layout.recompute == "selective"
    if opts.flash_attention or selective:
        attention_inputs = e * tokens * d * (2 * a_r + 3 * k_r)
    elif k_r < a_r:  # Q and K copies, V expanded to every query head (a copy)
        attention_inputs = e * tokens * d * 3 * a_r
    else:  # MHA: V is not expanded, it stays a view that keeps the whole QKV output alive
        attention_inputs = e * tokens * d * (2 * a_r + a_r + 2 * k_r)
    if selective:
        core = 0.0
    elif opts.flash_attention:
        core = FP32 * tokens * a_r
    else:
        core = (FP32 + (e if e < FP32 else 0)) * micro_batch * a_r * s_local * s_local + s_local * s_local
    items = {
        "norm_inputs": 2 * (e if opts.fused_norm else 2 * FP32) * tokens * h / sp,
        "norm_statistics": 2 * FP32 * tokens / sp,
        "gemm_inputs": 2 * e * tokens * h / sp,
        "attention_inputs": attention_inputs,
        "rope_tables": 0 if opts.flash_attention else 4 * e * s_local * d,
        "attention_output": e * tokens * a_r * d,
        "core_attention": core,
        "fc1_output": 2 * e * tokens * f / t,
        "swiglu_temporaries": 0 if opts.fused_swiglu else 2 * e * tokens * f / t,
        "fc2_input": e * tokens * f / t,
    }
    return {k: int(round(v)) for k, v in items.items()}


def layer_activations(model: ModelSpec, seq_length: int, micro_batch: int, layout: Layout,
                      opts: Options) -> LayerActivations:
    items = layer_items(model, seq_length, micro_batch, layout, opts)
    per_layer = sum(items.values())
    e, t = opts.act_bytes, layout.tp
    sp = t if layout.sp else 1
    tokens = seq_length // layout.cp * micro_batch
    h, f = model.hidden_size, model.ffn_hidden_size
    # transient inside a layer: the all-gathered GEMM input under SP, the MLP backward's
    # grads (fc2 input grad + fc1 output grad), the layer's input/output grads, and the
    # weight-grad temporary of the largest matrix when wgrad is not fused into main_grad
    working = e * tokens * (h * (1 if layout.sp else 0) + 3 * f / t + 2 * h / sp)
    if not opts.gradient_accumulation_fusion:
        working += opts.param_bytes * h * 2 * f / t
    checkpoint_input = e * tokens * h / sp
    if layout.recompute == "full":
        working += per_layer * layout.recompute_num_layers  # one checkpoint group re-created
    return LayerActivations(items=tuple(items.items()), per_layer=int(per_layer),
                            checkpoint_input=int(checkpoint_input), working=int(working),
                            full_recompute=layout.recompute == "full",
                            layers_per_checkpoint=layout.recompute_num_layers)
