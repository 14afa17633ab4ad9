"""What an export writes besides the weights: config.json, generation_config.json, the tokenizer files.

The model comes from the step's manifest (``model_config``; older manifests: the run's config.yaml);
``config.json`` starts from the source Hugging Face model's when the run began from one (so ids
such as bos/eos and extra fields survive) and its architecture fields are overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

from checkpointing.manifest import Manifest
from checkpointing.signature import tokenizer_dir
from configs.hf_config import SUPPORTED
from configs.schema import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")


class ExportError(Exception):
    """Bad input to the export: the message names the thing and the fix (exit status 2)."""


@dataclass(frozen=True)
class RunInfo:
    model: ModelConfig
    tokenizer: Optional[str]  # a Hugging Face tokenizer directory to copy
    hf_source: Optional[str]  # a Hugging Face model directory whose config.json to start from


def run_info(manifest: Manifest, step_dir: str, run_dir: Optional[str], *, model: Optional[ModelConfig],
             tokenizer: Optional[str], with_tokenizer: bool, hf_source: Optional[str],
             say: Callable[[str], None]) -> RunInfo:
    """Explicit values first, then the manifest, then (older manifests) the run's config.yaml."""
    recorded = _model_from_dict(manifest.model_config)
    run: Optional[_RunConfig] = None
    if (recorded is None and (model is None or (with_tokenizer and tokenizer is None))) or hf_source is None:
        run = _RunConfig.find(run_dir or run_dir_above(os.path.dirname(step_dir)), say)
    model = model or recorded or (run.model if run is not None else None)
    if model is None:
        raise ExportError(f"{step_dir}: its manifest records no model_config and no run config.yaml was found "
                          "(looked next to the checkpoint directory): pass --checkpoint <run dir>")
    if model.hf_architecture not in SUPPORTED:
        raise ExportError(f"model.hf_architecture={model.hf_architecture!r} cannot be exported; supported: "
                          f"{', '.join(SUPPORTED)}")
    origin = "--tokenizer"
    if not with_tokenizer:
        tokenizer = None
    elif tokenizer is None and recorded is not None:
        tokenizer, origin = manifest.tokenizer, "the manifest"
    elif tokenizer is None:
        tokenizer, origin = (run.tokenizer if run is not None else None), "the run's config.yaml"
    if tokenizer is not None:
        if not os.path.isdir(tokenizer) or not any(os.path.isfile(os.path.join(tokenizer, n)) for n in TOKENIZER_FILES):
            raise ExportError(f"tokenizer directory {tokenizer} (from {origin}) is missing or holds no tokenizer files "
                              f"({', '.join(TOKENIZER_FILES[:4])}): pass --tokenizer DIR or --no-tokenizer")
    if hf_source is not None:
        if not os.path.isfile(os.path.join(hf_source, "config.json")):
            raise ExportError(f"--hf-source {hf_source} has no config.json: give a Hugging Face model directory")
    else:
        candidates = [("model.hf_path", model.hf_path), ("checkpoint.init_from", run.init_from if run else None)]
        for what, candidate in candidates:
            if candidate and os.path.isfile(os.path.join(candidate, "config.json")):
                hf_source = candidate
                break
            if candidate and what == "model.hf_path":
                say(f"export_hf: {what}={candidate} has no config.json (any more): config.json is written from the "
                    "model config alone")
    return RunInfo(model, tokenizer, hf_source)


def _model_from_dict(raw: dict[str, Any]) -> Optional[ModelConfig]:
    known = {f.name for f in fields(ModelConfig)}
    if not raw or not all(raw.get(name) not in (None, "???") for name in ("num_layers", "hidden_size", "vocab_size")):
        return None
    try:
        return ModelConfig(**{k: v for k, v in raw.items() if k in known})
    except TypeError:
        return None


@dataclass(frozen=True)
class _RunConfig:
    model: Optional[ModelConfig]
    tokenizer: Optional[str]
    init_from: Optional[str]

    @classmethod
    def find(cls, run_dir: Optional[str], say: Callable[[str], None]) -> Optional["_RunConfig"]:
        """The run's config.yaml as the launcher wrote it, else (an older schema) its raw model node."""
        path = os.path.join(run_dir, "config.yaml") if run_dir else None
        if path is None or not os.path.isfile(path):
            return None
        from omegaconf import OmegaConf

        from configs.loading import load_run_config

        try:
            cfg = load_run_config(path)
            return cls(cfg.model, tokenizer_dir(cfg), cfg.checkpoint.init_from)
        except Exception:  # noqa: BLE001 - validated by today's schema; the model node may still read
            pass
        try:
            raw = OmegaConf.load(path)
            model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                        OmegaConf.select(raw, "model") or {}))
            tokenizer, init_from = OmegaConf.select(raw, "training.data.tokenizer"), OmegaConf.select(
                raw, "checkpoint.init_from")
        except Exception as exc:  # noqa: BLE001 - any YAML or schema error: report and go on without it
            say(f"export_hf: cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            return None
        return cls(model if isinstance(model, ModelConfig) else None, str(tokenizer) if tokenizer else None,
                   str(init_from) if init_from else None)


def read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path) as handle:
            body = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable ({exc}); fix or remove it, or pass --hf-source") from None
    return body if isinstance(body, dict) else None


# --------------------------------------------------------------------------- config.json, generation_config.json


def hf_config(model: ModelConfig, dtype: str, source: Optional[dict[str, Any]],
              tokenizer: Optional[str]) -> dict[str, Any]:
    """config.json: the source model's (same architecture) with every architecture field overwritten."""
    arch, model_type = model.hf_architecture, SUPPORTED[model.hf_architecture]
    config = dict(source) if source and source.get("model_type", model_type) == model_type else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # token ids survive an architecture change
        if source and key in source:
            config[key] = source[key]
    heads = model.num_attention_heads
    scaling = None if model.rope_scaling_factor is None else {
        "rope_type": "llama3", "factor": float(model.rope_scaling_factor),
        "low_freq_factor": float(model.rope_scaling_low_freq_factor),
        "high_freq_factor": float(model.rope_scaling_high_freq_factor),
        "original_max_position_embeddings": int(model.rope_scaling_original_max_position)}
    torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    config.update({
        "architectures": [arch], "model_type": model_type, "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": heads,
        "num_key_value_heads": model.num_query_groups, "head_dim": model.head_dim or model.hidden_size // heads,
        "hidden_act": "silu", "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_theta, "rope_scaling": scaling,
        "tie_word_embeddings": model.tie_embeddings, "torch_dtype": torch_dtype})
    config.setdefault("initializer_range", model.init_method_std)
    config.setdefault("attention_dropout", 0.0)
    config.setdefault("use_cache", True)
    if "dtype" in config:  # transformers 5 spelling
        config["dtype"] = torch_dtype
    if "rope_parameters" in config:  # transformers 5 spelling of rope_theta + rope_scaling
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": model.rope_theta, **(scaling or {})}
    if arch == "LlamaForCausalLM":
        config.update({"attention_bias": model.qkv_bias, "mlp_bias": False})
        config.setdefault("pretraining_tp", 1)
    else:  # Qwen2: full attention in every layer
        config.update({"use_sliding_window": False, "max_window_layers": model.num_layers})
        config.setdefault("sliding_window", None)
        if "layer_types" in config:
            config["layer_types"] = ["full_attention"] * model.num_layers
    if tokenizer:
        for role, token_id in special_token_ids(tokenizer).items():
            if config.get(f"{role}_token_id") is None:
                config[f"{role}_token_id"] = token_id
    return config


def generation_config(config: dict[str, Any], source: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The source model's generation_config.json (sampling defaults, stop ids), else one from config.json."""
    generation = dict(source) if source else {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if generation.get(key) is None and config.get(key) is not None:
            generation[key] = config[key]
    return generation


def special_token_ids(tokenizer: str) -> dict[str, int]:
    """bos/eos/pad ids named by tokenizer_config.json (or special_tokens_map.json), looked up in tokenizer.json."""
    settings = {**(read_json(os.path.join(tokenizer, "special_tokens_map.json")) or {}),
                **(read_json(os.path.join(tokenizer, "tokenizer_config.json")) or {})}
    vocabulary = read_json(os.path.join(tokenizer, "tokenizer.json")) or {}
    ids: dict[str, int] = {}
    for added in vocabulary.get("added_tokens") or []:
        if isinstance(added, dict) and "content" in added and "id" in added:
            ids[str(added["content"])] = int(added["id"])
    vocab = (vocabulary.get("model") or {}).get("vocab")
    found = {}
    for role in ("bos", "eos", "pad"):
        token = settings.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if not isinstance(token, str):
            continue
        token_id = ids.get(token, vocab.get(token) if isinstance(vocab, dict) else None)
        if token_id is not None:
            found[role] = int(token_id)
    return found


def copy_tokenizer(tokenizer: str, directory: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        source = os.path.join(tokenizer, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(directory, name))
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- S3


def run_dir_above(checkpoint_dir: str) -> Optional[str]:
    """The run directory holding ``checkpoint_dir`` (``<run>/checkpoints``), when it has a config.yaml."""
    parent = os.path.dirname(os.path.abspath(checkpoint_dir))
    return parent if os.path.isfile(os.path.join(parent, "config.yaml")) else None
