"""Turn composed OmegaConf trees (from Hydra or a saved run) into typed, validated configs."""

from __future__ import annotations

from pathlib import Path
import dataclasses
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.errors import ConfigError, Problem
from configs.hf_config import HfConfigError, disagreements, model_fields, read_hf_config
from configs.schema import ModelConfig, RootConfig
from configs.validate import validate


def to_root(cfg: DictConfig | dict[str, Any], *, resolve_hf: bool = True,
            explicit: Optional[set[str]] = None) -> RootConfig:
    """Merge onto the schema (type checks), convert to dataclasses, validate.

    ``resolve_hf``: fill the architecture from ``model.hf_path`` (the launcher does; a run's saved
    config already holds the resolved values, so the ranks need not read the directory again);
    ``explicit``: the model fields the user set on the command line (see with_hf_architecture).
    """
    if resolve_hf:
        cfg = with_hf_architecture(cfg, explicit)
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


def explicit_model_fields(overrides: list[str]) -> set[str]:
    """Model fields set on the command line (``model.num_layers=40``, ``+model.x=...``)."""
    fields = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            fields.add(key.split(".", 2)[1])
    return fields


def with_hf_architecture(cfg: DictConfig | dict[str, Any], explicit: Optional[set[str]] = None) -> DictConfig:
    """``cfg`` with the model fields ``model.hf_path`` defines filled in (ConfigError on contradictions).

    With ``model=hf`` (no architecture of its own) a field is filled unless the user set it
    (``explicit``: the command-line fields; unknown -> any value other than the schema default);
    with another model option every value it defines must agree with config.json.
    """
    tree = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    model = tree.get("model")
    if not isinstance(model, DictConfig) or "hf_path" not in model or OmegaConf.is_missing(model, "hf_path") \
            or not model.get("hf_path"):
        if isinstance(model, DictConfig) and model.get("name", None) == "hf":
            raise ConfigError([Problem("model.hf_path", None, "model=hf reads the architecture from a Hugging Face "
                                       "model directory: set model.hf_path=<dir with config.json>")])
        return tree
    path = str(model.hf_path)
    try:
        from_hf = model_fields(read_hf_config(path), path)
    except HfConfigError as exc:
        raise ConfigError(exc.problems) from None
    own_architecture = model.get("name", None) != "hf"
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    given = {}
    for key in from_hf:
        if key not in model or OmegaConf.is_missing(model, key):
            continue
        value = model[key]
        user_set = key in explicit if explicit is not None else value != defaults.get(key)
        if own_architecture or user_set:
            given[key] = value
    problems = disagreements(given, from_hf, path)
    if problems:
        raise ConfigError(problems)
    resolved = tree.copy()
    for key, value in from_hf.items():
        if key not in given:
            OmegaConf.update(resolved, f"model.{key}", value, force_add=True)
    if not own_architecture:
        OmegaConf.update(resolved, "model.name", Path(path).name or "hf", force_add=True)
    return resolved


def dump_config(root: RootConfig) -> str:
    """YAML of a typed config (what the run directory stores and the ranks read back)."""
    return OmegaConf.to_yaml(OmegaConf.structured(root))
