"""What must match between a checkpoint and the run that resumes it (pure functions, no torch)."""

from __future__ import annotations

from typing import Any

from configs.schema import ModelConfig, RootConfig
from configs.derived import padded_vocab_size

_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "tie_embeddings")


def model_signature(model: ModelConfig) -> dict[str, Any]:
    """The architecture fields a checkpoint must match (shapes, not names or RoPE tuning)."""
    sig: dict[str, Any] = {name: getattr(model, name) for name in _SHAPE_FIELDS}
    sig["padded_vocab_size"] = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by)
    return sig


def training_signature(cfg: RootConfig) -> dict[str, Any]:
    """Training settings resume depends on: the data position is step x global batch size."""
    t = cfg.training
    return {"global_batch_size": t.global_batch_size, "seq_length": t.seq_length, "data_source": t.data.source,
            "data_seed": t.data.seed, "precision": t.precision}


def layout_signature(cfg: RootConfig, world_size: int, dp_size: int) -> dict[str, Any]:
    p = cfg.parallelism
    return {"world_size": world_size, "tp": p.tp, "pp": p.pp, "vpp": p.vpp if p.vpp and p.vpp > 1 else 1,
            "cp": p.cp, "dp": dp_size, "distributed_optimizer": p.distributed_optimizer}


def model_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved, current) for every architecture difference."""
    return [(k, saved.get(k), current[k]) for k in current if saved.get(k) != current[k]]


def describe(sig: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sig.items())
