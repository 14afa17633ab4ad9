"""Where a ``ModelSpec`` comes from: this project's model configs, or a Hugging Face config.json.

This is the predictor's only file reading. ``configs/model/<name>.yaml`` is read with PyYAML
(a flat mapping; 9 ms to import, against ~60 ms for omegaconf), so ``python -m
memory_predictor`` stays well inside its 1 s budget. The same keys as ``configs.schema.ModelConfig``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memory_predictor.errors import Problem, PredictorError, raise_if
from memory_predictor.spec import ModelSpec

MODEL_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

# Hugging Face config.json keys (LlamaConfig and compatible) -> ModelSpec fields
HF_REQUIRED = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "vocab_size": "vocab_size",
}


def model_names(model_dir: Path = MODEL_DIR) -> list[str]:
    """The model configs that spell out an architecture (``hf.yaml`` reads it from a Hugging Face
    directory: give the predictor that directory's config.json instead)."""
    return sorted(p.stem for p in model_dir.glob("*.yaml")
                  if any(line.startswith("num_layers:") for line in p.read_text().splitlines()))


def load_model(name_or_path: str, model_dir: Path = MODEL_DIR) -> ModelSpec:
    """A model config name (``llama3.1_8b``), a model YAML path, or a Hugging Face config.json."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" or path.is_dir():
        return load_hf_config(path / "config.json" if path.is_dir() else path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return _from_project_yaml(path)
    candidate = model_dir / f"{name_or_path}.yaml"
    if candidate.exists():
        return _from_project_yaml(candidate)
    raise PredictorError([Problem("model", name_or_path, f"unknown model; use one of: {', '.join(model_names(model_dir))}, "
                                  "or the path of a Hugging Face config.json")])


def _from_project_yaml(path: Path) -> ModelSpec:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PredictorError([Problem("model", str(path), f"cannot read this YAML file ({exc.__class__.__name__}); "
                                      "fix it or pass another model")]) from None
    if not isinstance(data, dict):
        raise PredictorError([Problem("model", str(path), "expected a mapping of model fields (see configs/model/)")])
    required = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size")
    raise_if([Problem(f"model.{key}", None, f"missing in {path}; add it (see configs/model/llama3.1_8b.yaml)")
              for key in required if key not in data])
    spec = ModelSpec(name=str(data.get("name", path.stem)), num_layers=data["num_layers"],
                     hidden_size=data["hidden_size"], ffn_hidden_size=data["ffn_hidden_size"],
                     num_attention_heads=data["num_attention_heads"], num_query_groups=data["num_query_groups"],
                     vocab_size=data["vocab_size"],
                     make_vocab_size_divisible_by=data.get("make_vocab_size_divisible_by", 128),
                     tie_embeddings=bool(data.get("tie_embeddings", False)),
                     qkv_bias=bool(data.get("qkv_bias", False)),
                     kv_channels=int(data["head_dim"]) if data.get("head_dim") else None)
    raise_if(spec.problems())
    return spec


def load_hf_config(path: Path) -> ModelSpec:
    """A Llama-style Hugging Face ``config.json`` (LlamaConfig keys)."""
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise PredictorError([Problem("model", str(path), "no such file; pass a Hugging Face config.json or a model "
                                      f"name ({', '.join(model_names())})")]) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PredictorError([Problem("model", str(path), f"not valid JSON ({exc}); pass a Hugging Face config.json")]) from None
    if not isinstance(data, dict):
        raise PredictorError([Problem("model", str(path), "expected a JSON object (a Hugging Face config.json)")])
    if isinstance(data.get("text_config"), dict):  # multimodal wrappers keep the LLM here
        data = {**data, **data["text_config"]}
    missing = [key for key in HF_REQUIRED if key not in data]
    raise_if([Problem(f"config.json:{key}", None, f"missing in {path}; a Llama-style config needs "
                      f"{', '.join(HF_REQUIRED)} (num_key_value_heads defaults to num_attention_heads)")
              for key in missing])
    problems: list[Problem] = []
    if data.get("num_local_experts") or data.get("num_experts"):
        problems.append(Problem("config.json:num_local_experts", data.get("num_local_experts") or data.get("num_experts"),
                                "mixture-of-experts models are not modelled yet; use a dense model"))
    act = data.get("hidden_act", "silu")
    if act not in ("silu", "swiglu"):
        problems.append(Problem("config.json:hidden_act", act, "only SwiGLU (hidden_act=silu) models are modelled"))
    raise_if(problems)
    values = {field: data[key] for key, field in HF_REQUIRED.items()}
    bad = [Problem(f"config.json:{key}", data[key], "must be a positive integer")
           for key, field in HF_REQUIRED.items() if not isinstance(values[field], int) or values[field] <= 0]
    raise_if(bad)
    head_dim = data.get("head_dim")
    spec = ModelSpec(name=str(data.get("_name_or_path") or path.parent.name or path.stem),
                     num_query_groups=int(data.get("num_key_value_heads") or data["num_attention_heads"]),
                     tie_embeddings=bool(data.get("tie_word_embeddings", False)),
                     qkv_bias=bool(data.get("attention_bias")) or data.get("model_type") == "qwen2",
                     kv_channels=int(head_dim) if head_dim else None, **values)
    raise_if(spec.problems(prefix="config.json"))
    return spec
