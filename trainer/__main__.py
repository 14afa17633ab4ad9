"""Rank entrypoint: ``torchrun ... -m trainer --config <run_dir>/config.yaml``.

Spawn-safe: everything runs under ``if __name__ == "__main__"`` because megatron's
checkpoint workers start processes that re-import ``__main__``.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # megatron must not be imported before cpu_compat.activate()
    from configs.schema import RootConfig
    from trainer.callbacks import TrainingCallback
    from trainer.distributed import Layout


PLUGINS_ENV = "HYPERLAUNCH_PLUGINS"  # extra callbacks: "package.module:factory[,...]", factory(cfg, layout)
EXIT_STORAGE_UNAVAILABLE = 75  # EX_TEMPFAIL: the checkpoint storage could not be read; run again later


def plugins(cfg: RootConfig, layout: Layout) -> list[TrainingCallback]:
    """The loop's plugins, composed here: checkpointing first (it may resume), then monitoring, then
    any named in ``$HYPERLAUNCH_PLUGINS`` (profilers, fault injection in tests: code that is not ours
    to ship stays out of the product and plugs in through the same contract)."""
    from checkpointing.training import make_callback as checkpoint_callback
    from monitoring.training import make_callback as monitoring_callback

    made = [checkpoint_callback(cfg, layout), monitoring_callback(cfg, layout)]
    for spec in filter(None, (item.strip() for item in os.environ.get(PLUGINS_ENV, "").split(","))):
        made += _extra_plugin(spec)(cfg, layout)
    return [cb for cb in made if cb is not None]


def _extra_plugin(spec: str):  # noqa: ANN202 - a callback factory
    import importlib

    from configs.errors import ConfigError, Problem

    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr or "callbacks")
    except (ImportError, AttributeError) as exc:
        raise ConfigError([Problem(f"${PLUGINS_ENV}", spec, f"cannot load it ({exc}); use package.module:factory, "
                                   "importable on the nodes (PYTHONPATH includes the code directory)")]) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the config.yaml the launcher wrote into the run directory")
    args = parser.parse_args(argv)
    faulthandler.enable()
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints where a hung rank is
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    from trainer import cpu_compat, megatron_noise

    megatron_noise.silence()
    if cpu_compat.activate():  # before megatron is imported: it binds torch.cuda functions at import
        megatron_noise.silence_cpu_only()

    from configs.loading import load_run_config
    from configs.errors import ConfigError

    try:
        cfg = load_run_config(args.config)
    except FileNotFoundError:
        print(f"error: config file not found: {args.config}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2

    from checkpointing.export_final import ExportFailed
    from checkpointing.preflight import RUN_DIR_ENV, StorageUnavailable, preflight
    from trainer.loop import train

    # the launcher writes config.yaml into the run directory (the default checkpoint location)
    os.environ.setdefault(RUN_DIR_ENV, str(Path(args.config).resolve().parent))
    try:
        preflight(cfg, rank=int(os.environ.get("RANK", "0")))  # bad checkpoint settings fail before the model is built
        train(cfg, make_callbacks=plugins)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StorageUnavailable as exc:  # checkpoints may exist but cannot be read: stop, never start over
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORAGE_UNAVAILABLE
    except ExportFailed as exc:  # training finished and its checkpoint is committed; the export is not
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
