"""Resume: pick the newest committed step every rank can trust, fetch it from S3 if needed, load it.

Rank 0 walks the committed steps newest first (size check against the manifest); every rank
then verifies the CRC-32 of its share of the files (file ``i`` on rank ``i mod world``) and the
ranks agree over the checkpoint group. A step that fails is skipped with a log line and the
next older one is tried. With no usable step on the shared filesystem, rank 0 downloads the
newest replicated step from S3 first. Storage that cannot be read (the directory cannot be
listed, S3 does not answer after retries) is not "no checkpoint": every rank raises
StorageUnavailable and the run stops, so it never restarts from step 0 while a checkpoint may
exist. Loading goes through megatron's dist_checkpointing, so a different TP/PP/DP layout
reshards on the way in.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from configs.checkpoint_config import CheckpointConfig
from checkpointing.manifest import ManifestError, check_files
from checkpointing.preflight import check_compatible
from checkpointing.signature import describe, layout_signature
from checkpointing.state import init_optimizer_state, restore, sharded_state_dict
from checkpointing.store import RESUME_STOPPED, CheckpointStore, StorageUnavailable, ValidStep, step_name
from configs.errors import ConfigError, Problem
from trainer.callbacks import TrainState


def choose_step(store: CheckpointStore, cfg: CheckpointConfig, state: TrainState, group: Any,
                say: Callable[[str], None]) -> Optional[ValidStep]:
    """Collective: the step to resume from (the same on every rank), or None to start fresh."""
    rank, world = dist.get_rank(), dist.get_world_size()
    below: Optional[int] = None
    fetched_from_s3 = tried_s3 = False
    while True:
        choice: list[Any] = [None, None]  # (ValidStep | None, error: problems | ("unavailable", text) | text | None)
        if rank == 0:
            try:
                valid = store.newest_valid(checksums=False, below=below, say=say)
                if valid is None and cfg.replicated and not tried_s3:  # also when local steps failed their CRCs
                    from checkpointing.fetch import fetch_newest

                    tried_s3 = True
                    valid = fetch_newest(store, cfg.s3, say)
                    fetched_from_s3 = valid is not None
                if valid is not None:
                    problems: list[Problem] = []
                    check_compatible((valid.path, valid.manifest), state.cfg,
                                     lambda f, v, fix: problems.append(Problem(f, v, fix)))
                    if problems:
                        raise ConfigError(problems)
                choice = [valid, None]
            except ConfigError as exc:
                choice = [None, exc.problems]
            except StorageUnavailable as exc:
                choice = [None, ("unavailable", f"{exc}. {RESUME_STOPPED}")]
            except Exception as exc:
                choice = [None, f"cannot look for a checkpoint to resume in {store.root}: {exc!r}"]
        dist.broadcast_object_list(choice, src=0, group=group)
        valid, error = choice
        if isinstance(error, list):
            raise ConfigError(error)
        if isinstance(error, tuple):
            raise StorageUnavailable(error[1])
        if error:
            raise RuntimeError(error)
        if valid is None:
            return None
        if not cfg.verify_on_resume or fetched_from_s3:  # a fetch already verified every file
            return valid
        names = sorted(valid.manifest.files)[rank::world]
        try:
            mine = check_files(valid.path, valid.manifest, checksums=True, names=names)
        except ManifestError as exc:
            mine = [str(exc)]
        reports: list[Any] = [None] * world
        dist.all_gather_object(reports, mine, group=group)
        problems = [p for report in reports for p in report]
        if not problems:
            return valid
        if rank == 0:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            say(f"checkpoint: skipping {valid.path}: {'; '.join(str(p) for p in problems[:3])}{more}")
        below = valid.step


def load(state: TrainState, valid: ValidStep, say: Callable[[str], None]) -> None:
    """Collective: restore the model, optimizer, schedule, step (and RNG on the same layout)."""
    current = layout_signature(state.cfg, state.layout.world_size, state.layout.dp_size)
    same_layout = valid.manifest.layout == current
    init_optimizer_state(state.optimizer)
    sd = sharded_state_dict(state, loading=True, with_rng=same_layout,
                            optimizer_format=valid.manifest.optimizer_format)
    loaded = dist_checkpointing.load(sd, valid.path, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    restore(state, loaded, same_layout=same_layout)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if state.layout.rank == 0:
        change = "" if same_layout else (f"; resharded from {describe(valid.manifest.layout)} "
                                         f"(RNG states start fresh on a new layout)")
        say(f"checkpoint: resumed from {valid.path} ({step_name(valid.step)}, "
            f"consumed_samples={valid.manifest.consumed_samples}){change}")
