"""Hugging Face (Llama / Qwen2) <-> megatron-core GPT: tensor names and the two fused layouts.

megatron-core names (global layer numbers, local and Transformer Engine specs) against the HF
names of ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``:

=========================================================  =============================================
``embedding.word_embeddings.weight`` [Vp, h]               ``model.embed_tokens.weight`` [V, h]
``decoder.layers.i.input_layernorm.weight``                ``model.layers.i.input_layernorm.weight``
  (TE: ``...self_attention.linear_qkv.layer_norm_weight``)
``decoder.layers.i.self_attention.linear_qkv.weight``      ``...self_attn.{q,k,v}_proj.weight`` (grouped)
``decoder.layers.i.self_attention.linear_qkv.bias``        ``...self_attn.{q,k,v}_proj.bias`` (Qwen2)
``decoder.layers.i.self_attention.linear_proj.weight``     ``...self_attn.o_proj.weight``
``decoder.layers.i.pre_mlp_layernorm.weight``              ``...post_attention_layernorm.weight``
  (TE: ``...mlp.linear_fc1.layer_norm_weight``)
``decoder.layers.i.mlp.linear_fc1.weight`` [2f, h]         ``...mlp.gate_proj.weight`` ; ``...up_proj.weight``
``decoder.layers.i.mlp.linear_fc2.weight``                 ``...mlp.down_proj.weight``
``decoder.final_layernorm.weight``                         ``model.norm.weight``
``output_layer.weight`` [Vp, h] (absent when tied)         ``lm_head.weight`` (absent when tied)
=========================================================  =============================================

``linear_qkv`` is grouped by KV group: for each of the ``k`` groups, its ``a/k`` query heads,
then its key head, then its value head (``d`` rows each). ``linear_fc1`` is ``[gate; up]``.
Under tensor parallelism rank ``r`` of ``t`` holds KV groups ``[r k/t, (r+1) k/t)`` of
``linear_qkv``, rows ``[r f/t, (r+1) f/t)`` of gate and of up (concatenated), columns
``[r a d/t, ...)`` of ``linear_proj`` and ``[r f/t, ...)`` of ``linear_fc2``, and rows
``[r Vp/t, ...)`` of the (padded) vocabulary. Norms are replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Dims:
    """The shapes that decide both layouts."""

    num_layers: int
    hidden: int
    heads: int
    groups: int  # KV heads
    head_dim: int
    ffn: int
    vocab: int  # the tokenizer's (HF) vocabulary
    padded_vocab: int  # megatron's, a multiple of make_vocab_size_divisible_by
    tied: bool
    qkv_bias: bool

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups


# ------------------------------------------------------------------------- names


def hf_names(dims: Dims) -> list[str]:
    """Every tensor an HF checkpoint of this model holds, in the order an export writes them."""
    names = ["model.embed_tokens.weight"]
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if dims.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    names.append("model.norm.weight")
    if not dims.tied:
        names.append("lm_head.weight")
    return names


def hf_shape(name: str, dims: Dims) -> tuple[int, ...]:
    h, d, f = dims.hidden, dims.head_dim, dims.ffn
    table: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (dims.vocab, h), "lm_head.weight": (dims.vocab, h), "norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (dims.heads * d, h), "k_proj.weight": (dims.groups * d, h),
        "v_proj.weight": (dims.groups * d, h), "q_proj.bias": (dims.heads * d,), "k_proj.bias": (dims.groups * d,),
        "v_proj.bias": (dims.groups * d,), "o_proj.weight": (h, dims.heads * d), "o_proj.bias": (h,),
        "gate_proj.weight": (f, h),
        "up_proj.weight": (f, h), "down_proj.weight": (h, f),
    }
    key = name.split(".", 2)[-1] if name.startswith("model.layers.") else name.removeprefix("model.")
    key = ".".join(key.split(".")[-2:])
    return table[key]


def canonical(name: str) -> str:
    """A megatron parameter name with the TE spec's fused norms named as the local spec names them."""
    return (name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
                .replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"))


# ------------------------------------------------------------------------- import: HF -> one rank's slice

Reader = Callable[..., torch.Tensor]  # reader(name, rows=slice|None, cols=slice|None) -> tensor


@dataclass(frozen=True)
class RankSlice:
    tp_rank: int
    tp_size: int


def megatron_slice(name: str, dims: Dims, where: RankSlice, read: Reader) -> torch.Tensor:
    """This rank's shard of the megatron parameter ``name`` (global layer numbers), read from HF tensors."""
    name = canonical(name)
    r, t = where.tp_rank, where.tp_size
    if name == "embedding.word_embeddings.weight":
        return _vocab_rows("model.embed_tokens.weight", dims, where, read)
    if name == "output_layer.weight":
        return _vocab_rows("model.embed_tokens.weight" if dims.tied else "lm_head.weight", dims, where, read)
    if name == "decoder.final_layernorm.weight":
        return read("model.norm.weight")
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(name)
    p, rest = f"model.layers.{match.group(1)}.", match.group(2)
    if rest == "input_layernorm.weight":
        return read(p + "input_layernorm.weight")
    if rest == "pre_mlp_layernorm.weight":
        return read(p + "post_attention_layernorm.weight")
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[-1]
        return _qkv_groups(p, kind, dims, range(r * dims.groups // t, (r + 1) * dims.groups // t), read)
    if rest == "self_attention.linear_proj.weight":
        width = dims.heads * dims.head_dim // t
        return read(p + "self_attn.o_proj.weight", cols=slice(r * width, (r + 1) * width))
    if rest == "mlp.linear_fc1.weight":
        rows = slice(r * dims.ffn // t, (r + 1) * dims.ffn // t)
        return torch.cat([read(p + "mlp.gate_proj.weight", rows=rows), read(p + "mlp.up_proj.weight", rows=rows)])
    if rest == "mlp.linear_fc2.weight":
        width = dims.ffn // t
        return read(p + "mlp.down_proj.weight", cols=slice(r * width, (r + 1) * width))
    raise KeyError(name)


def _vocab_rows(hf_name: str, dims: Dims, where: RankSlice, read: Reader) -> torch.Tensor:
    per_rank = dims.padded_vocab // where.tp_size
    start = where.tp_rank * per_rank
    stop = min(start + per_rank, dims.vocab)
    real = read(hf_name, rows=slice(start, stop)) if stop > start else None
    if real is not None and real.shape[0] == per_rank:
        return real
    out = torch.zeros((per_rank, dims.hidden), dtype=real.dtype if real is not None else torch.float32)
    if real is not None:
        out[: real.shape[0]] = real
    return out


def _qkv_groups(prefix: str, kind: str, dims: Dims, groups: range, read: Reader) -> torch.Tensor:
    d, qg = dims.head_dim, dims.heads_per_group
    parts = []
    for g in groups:
        parts.append(read(f"{prefix}self_attn.q_proj.{kind}", rows=slice(g * qg * d, (g + 1) * qg * d)))
        parts.append(read(f"{prefix}self_attn.k_proj.{kind}", rows=slice(g * d, (g + 1) * d)))
        parts.append(read(f"{prefix}self_attn.v_proj.{kind}", rows=slice(g * d, (g + 1) * d)))
    return torch.cat(parts)


# ------------------------------------------------------------------------- export: global megatron -> HF


def split_qkv(qkv: torch.Tensor, dims: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A global (TP=1) ``linear_qkv`` weight or bias -> HF q, k, v."""
    d, qg = dims.head_dim, dims.heads_per_group
    grouped = qkv.reshape(dims.groups, (qg + 2) * d, *qkv.shape[1:])
    q = grouped[:, : qg * d].reshape(dims.heads * d, *qkv.shape[1:])
    k = grouped[:, qg * d: (qg + 1) * d].reshape(dims.groups * d, *qkv.shape[1:])
    v = grouped[:, (qg + 1) * d:].reshape(dims.groups * d, *qkv.shape[1:])
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: Dims) -> torch.Tensor:
    """HF q, k, v -> the global (TP=1) ``linear_qkv`` layout (the inverse of :func:`split_qkv`)."""
    d, qg = dims.head_dim, dims.heads_per_group
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(dims.groups, qg * d, *rest), k.reshape(dims.groups, d, *rest),
                         v.reshape(dims.groups, d, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def hf_from_layer(layer: int, tensors: dict[str, torch.Tensor], dims: Dims) -> dict[str, torch.Tensor]:
    """HF tensors of one layer from its global megatron tensors (names after ``decoder.layers.i.``)."""
    p = f"model.layers.{layer}."
    out: dict[str, torch.Tensor] = {p + "input_layernorm.weight": tensors["input_layernorm.weight"]}
    q, k, v = split_qkv(tensors["self_attention.linear_qkv.weight"], dims)
    out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v})
    if dims.qkv_bias:
        qb, kb, vb = split_qkv(tensors["self_attention.linear_qkv.bias"], dims)
        out.update({p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb})
    out[p + "self_attn.o_proj.weight"] = tensors["self_attention.linear_proj.weight"]
    out[p + "post_attention_layernorm.weight"] = tensors["pre_mlp_layernorm.weight"]
    gate, up = tensors["mlp.linear_fc1.weight"].chunk(2, dim=0)
    out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": tensors["mlp.linear_fc2.weight"]})
    return out


LAYER_PARAMS = ("input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


def layer_params(dims: Dims) -> tuple[str, ...]:
    return LAYER_PARAMS + (("self_attention.linear_qkv.bias",) if dims.qkv_bias else ())


def strip_padding(vocab_rows: torch.Tensor, dims: Dims) -> torch.Tensor:
    return vocab_rows[: dims.vocab]


def dims_from_model(model: object, padded_vocab: int) -> Dims:
    """Dims from a ``configs.schema.ModelConfig`` (duck-typed: this module stays config-free)."""
    m = model
    heads = int(getattr(m, "num_attention_heads"))
    head_dim: Optional[int] = getattr(m, "head_dim", None)
    return Dims(num_layers=int(getattr(m, "num_layers")), hidden=int(getattr(m, "hidden_size")), heads=heads,
                groups=int(getattr(m, "num_query_groups")), head_dim=int(head_dim or getattr(m, "hidden_size") // heads),
                ffn=int(getattr(m, "ffn_hidden_size")), vocab=int(getattr(m, "vocab_size")), padded_vocab=padded_vocab,
                tied=bool(getattr(m, "tie_embeddings")), qkv_bias=bool(getattr(m, "qkv_bias", False)))
