"""Turn composed OmegaConf trees (from Hydra or a saved run) into typed, validated configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.schema import RootConfig
from configs.errors import ConfigError, Problem
from configs.validate import validate


def to_root(cfg: DictConfig | dict[str, Any]) -> RootConfig:
    """Merge onto the schema (type checks), convert to dataclasses, validate."""
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
    return to_root(loaded)


def dump_config(root: RootConfig) -> str:
    """YAML of a typed config (what the run directory stores and the ranks read back)."""
    return OmegaConf.to_yaml(OmegaConf.structured(root))
