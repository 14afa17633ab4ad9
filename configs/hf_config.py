"""The model architecture from a Hugging Face ``config.json`` (Llama 3.x and Qwen2/2.5).

``model=hf model.hf_path=<dir>`` leaves every architecture field to ``<dir>/config.json``;
``model.hf_path`` on any other model option checks the option's values against it. Both the
legacy keys (``rope_theta``, ``rope_scaling``: the published Llama 3.3 files) and transformers 5's
``rope_parameters`` are read. Anything the trainer cannot build the same way (another
architecture, biases on the MLP, sliding-window attention, another RoPE scaling) is refused by
name, so a model is never silently built differently from the checkpoint it loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from configs.errors import Problem

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_BY_MODEL_TYPE = {model_type: arch for arch, model_type in SUPPORTED.items()}
CONFIG_NAME = "config.json"


class HfConfigError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def read_hf_config(path: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory; HfConfigError naming ``model.hf_path`` otherwise."""
    directory = Path(path).expanduser()
    file = directory / CONFIG_NAME
    if not directory.is_dir():
        raise HfConfigError([Problem("model.hf_path", path, "is not a directory; give a Hugging Face model "
                                     "directory (with config.json and *.safetensors)")])
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise HfConfigError([Problem("model.hf_path", path, f"has no {CONFIG_NAME}: not a Hugging Face model "
                                     "directory")]) from None
    except (OSError, ValueError) as exc:
        raise HfConfigError([Problem("model.hf_path", path, f"cannot read {CONFIG_NAME}: {exc}")]) from None
    if not isinstance(raw, dict):
        raise HfConfigError([Problem("model.hf_path", path, f"{CONFIG_NAME} is not a JSON object")])
    return raw


def architecture_of(raw: dict[str, Any]) -> str | None:
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs:
        return str(archs[0])
    return _BY_MODEL_TYPE.get(str(raw.get("model_type")))


def model_fields(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields a config.json defines; HfConfigError for what is not supported."""
    arch = architecture_of(raw)
    problems: list[Problem] = []
    if arch not in SUPPORTED:
        shown = raw.get("architectures", raw.get("model_type"))
        raise HfConfigError([Problem("model.hf_path", path, f"architectures={shown!r} is not supported; supported: "
                                     f"{', '.join(SUPPORTED)}")])

    def need(key: str) -> Any:
        if key not in raw:
            problems.append(Problem("model.hf_path", path, f"{CONFIG_NAME} has no {key!r}"))
        return raw.get(key)

    heads, hidden = need("num_attention_heads"), need("hidden_size")
    fields: dict[str, Any] = {
        "num_layers": need("num_hidden_layers"), "hidden_size": hidden, "ffn_hidden_size": need("intermediate_size"),
        "num_attention_heads": heads, "num_query_groups": raw.get("num_key_value_heads") or heads,
        "vocab_size": need("vocab_size"), "norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(raw.get("max_position_embeddings", 8192)),
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)), "hf_architecture": arch,
        "qkv_bias": arch == "Qwen2ForCausalLM",
    }
    if arch == "LlamaForCausalLM" and raw.get("attention_bias"):
        problems.append(Problem("model.hf_path", path, "attention_bias=true: a Llama with attention biases also biases "
                                "o_proj, which megatron's layers cannot hold (only Q, K, V biases: Qwen2)"))
    head_dim = raw.get("head_dim")
    fields["head_dim"] = None if head_dim is None or (heads and hidden and head_dim * heads == hidden) else head_dim
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(Problem("model.hf_path", path, f"hidden_act={raw.get('hidden_act')!r}: only silu (SwiGLU) "
                                "is supported"))
    if raw.get("mlp_bias"):
        problems.append(Problem("model.hf_path", path, "mlp_bias=true is not supported (Llama/Qwen2 MLPs have none)"))
    if raw.get("use_sliding_window"):
        problems.append(Problem("model.hf_path", path, "use_sliding_window=true is not supported (full attention only)"))
    fields.update(_rope(raw, path, problems))
    if problems:
        raise HfConfigError(problems)
    return fields


def _rope(raw: dict[str, Any], path: str, problems: list[Problem]) -> dict[str, Any]:
    params: dict[str, Any] = raw["rope_parameters"] if isinstance(raw.get("rope_parameters"), dict) else {}
    scaling: dict[str, Any] = raw["rope_scaling"] if isinstance(raw.get("rope_scaling"), dict) else params
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling_factor": None,
                           "rope_scaling_low_freq_factor": 1.0, "rope_scaling_high_freq_factor": 4.0,
                           "rope_scaling_original_max_position": 8192}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return out
    if kind != "llama3":
        problems.append(Problem("model.hf_path", path, f"rope_scaling type {kind!r} is not supported "
                                "(supported: none, llama3)"))
        return out
    out.update(rope_scaling_factor=float(scaling["factor"]),
               rope_scaling_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
               rope_scaling_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
               rope_scaling_original_max_position=int(scaling.get("original_max_position_embeddings", 8192)))
    return out


def disagreements(given: dict[str, Any], from_hf: dict[str, Any], path: str) -> list[Problem]:
    """A problem per field set in the config that contradicts config.json (both values named)."""
    problems = []
    for key, hf_value in from_hf.items():
        if key not in given:
            continue
        mine = given[key]
        if key == "head_dim":  # null means hidden/heads: compare what the model would use
            mine = _effective_head_dim(given, mine)
            hf_value = _effective_head_dim(from_hf, hf_value)
        if not _same(mine, hf_value):
            problems.append(Problem(f"model.{key}", given[key], f"contradicts {path}/{CONFIG_NAME} ({key} = "
                                    f"{hf_value!r}); remove the override or use the model it describes"))
    return problems


def _effective_head_dim(fields: dict[str, Any], head_dim: Any) -> Any:
    if head_dim is not None:
        return head_dim
    hidden, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return bool(a == b)
