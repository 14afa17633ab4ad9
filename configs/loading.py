"""Turn composed OmegaConf trees (from Hydra or a saved run) into typed, validated configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.errors import ConfigError, Problem
from configs.hf_config import HfConfigError, disagreements, model_fields, read_hf_config
from configs.schema import RootConfig
from configs.validate import validate


def to_root(cfg: DictConfig | dict[str, Any], *, resolve_hf: bool = True) -> RootConfig:
    """Merge onto the schema (type checks), convert to dataclasses, validate.

    ``resolve_hf``: fill the architecture from ``model.hf_path`` (the launcher does; a run's saved
    config already holds the resolved values, so the ranks need not read the directory again).
    """
    if resolve_hf:
        cfg = with_hf_architecture(cfg)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RootConfig), cfg)
        root = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError([Problem(str(key), getattr(exc, "msg", str(exc)).splitlines()[0],
                                   "fix the type or the key name (see configs/ for the schema)")]) from None
    if not isinstance(root, RootConfig):  # pragma: no cover - OmegaConf contract
        raise TypeError(f"expected RootConfig, got {type(root).__name__}")
    validate(root)
    return root


def load_run_config(path: str | Path) -> RootConfig:
    """Load the resolved config a launcher wrote into a run directory."""
    loaded = OmegaConf.load(Path(path))
    if not isinstance(loaded, DictConfig):
        raise ConfigError([Problem(str(path), type(loaded).__name__, "a run config must be a YAML mapping")])
    return to_root(loaded, resolve_hf=False)


def with_hf_architecture(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """``cfg`` with the model fields ``model.hf_path`` defines filled in (ConfigError on contradictions)."""
    tree = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    model = tree.get("model")
    if not isinstance(model, DictConfig) or OmegaConf.is_missing(model, "hf_path") or not model.get("hf_path"):
        if isinstance(model, DictConfig) and "hf_path" in model and OmegaConf.is_missing(model, "hf_path"):
            raise ConfigError([Problem("model.hf_path", "???", "model=hf reads the architecture from a Hugging Face "
                                       "model directory: set model.hf_path=<dir with config.json>")])
        return tree
    path = str(model.hf_path)
    try:
        from_hf = model_fields(read_hf_config(path), path)
    except HfConfigError as exc:
        raise ConfigError(exc.problems) from None
    given = {key: model[key] for key in from_hf if key in model and not OmegaConf.is_missing(model, key)}
    problems = disagreements(given, from_hf, path)
    if problems:
        raise ConfigError(problems)
    resolved = tree.copy()
    for key, value in from_hf.items():
        if key not in given:
            OmegaConf.update(resolved, f"model.{key}", value, force_add=True)
    if "name" not in model or OmegaConf.is_missing(model, "name"):
        OmegaConf.update(resolved, "model.name", Path(path).name or "hf", force_add=True)
    return resolved


def dump_config(root: RootConfig) -> str:
    """YAML of a typed config (what the run directory stores and the ranks read back)."""
    return OmegaConf.to_yaml(OmegaConf.structured(root))
