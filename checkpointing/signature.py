"""What must match between a checkpoint and the run that resumes it (pure functions, no torch)."""

from __future__ import annotations

import os
from typing import Any, Optional

from configs.schema import ModelConfig, RootConfig
from configs.derived import padded_vocab_size

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "tie_embeddings", "qkv_bias", "head_dim")


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


def tokenizer_dir(cfg: RootConfig) -> Optional[str]:
    """The Hugging Face tokenizer of a run: the data's, else the HF model it started from (if it has one)."""
    if cfg.training.data.tokenizer:
        return cfg.training.data.tokenizer
    for candidate in (cfg.checkpoint.init_from, cfg.model.hf_path):
        if candidate and any(os.path.isfile(os.path.join(candidate, name)) for name in TOKENIZER_FILES):
            return candidate
    return None


def data_consumption(state: Any) -> dict[str, Any]:
    """Samples and tokens consumed per data source up to ``state.step`` (the source reports its own)."""
    source = state.extra.get("source")
    report = getattr(source, "consumption", None)
    return report(state.consumed_samples) if callable(report) else {}


def layout_signature(cfg: RootConfig, world_size: int, dp_size: int) -> dict[str, Any]:
    p = cfg.parallelism
    return {"world_size": world_size, "tp": p.tp, "pp": p.pp, "vpp": p.vpp if p.vpp and p.vpp > 1 else 1,
            "cp": p.cp, "dp": dp_size, "distributed_optimizer": p.distributed_optimizer}


def model_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved, current) for every architecture difference."""
    defaults = {"qkv_bias": False, "head_dim": None}  # fields older checkpoints did not record
    return [(k, saved.get(k, defaults.get(k)), current[k]) for k in current
            if saved.get(k, defaults.get(k)) != current[k]]


def describe(sig: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sig.items())
