"""Compose configs the way `python -m launcher` does, for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from configs.loading import explicit_model_fields, to_root
from configs.schema import RootConfig, register_configs

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
register_configs()


def compose_root(*overrides: str) -> RootConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return to_root(compose("launcher", overrides=list(overrides)), explicit=explicit_model_fields(list(overrides)))


def compose_raw(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("launcher", overrides=list(overrides))
