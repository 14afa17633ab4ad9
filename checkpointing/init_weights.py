"""``checkpoint.init_from``: weights-only start from a Hugging Face model or a committed checkpoint of ours.

* a Hugging Face directory (``config.json`` + ``model.safetensors`` or shards with
  ``model.safetensors.index.json``): every rank reads only the slices it owns, with ``pread``
  (checkpointing.safetensors_io), converted with checkpointing.hf_mapping -- never the whole model;
* a step directory of ours (``manifest.json``), a checkpoint directory (its newest committed step)
  or a run directory (the newest committed step of its checkpoint directory): megatron's
  dist_checkpointing loads the model tensors only, resharded to this run's TP/PP/VPP.

Optimizer, LR schedule, step and data position start fresh. The optimizer's fp32 main parameters
are refreshed from the loaded weights (``reload_model_params``), or the first step would train
the random initialisation. Before any tensor is read the source is checked against the model
config: architecture fields (config.json or the manifest), missing or unexpected tensors,
shapes and vocabulary size -- each a ConfigError naming the tensor or the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from checkpointing.hf_mapping import Dims, RankSlice, canonical, dims_from_model, hf_names, hf_shape, megatron_slice
from checkpointing.manifest import MANIFEST_NAME, ManifestError, read_manifest
from checkpointing.safetensors_io import INDEX_NAME, SINGLE_NAME, SafetensorsDir, SafetensorsError
from checkpointing.store import CheckpointStore, parse_step_name
from configs.derived import padded_vocab_size
from configs.errors import ConfigError, Problem
from configs.hf_config import HfConfigError, disagreements, model_fields, read_hf_config
from configs.schema import ModelConfig

FIELD = "checkpoint.init_from"
# tensors some HF checkpoints carry that are derived, not learned
_IGNORED = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class InitSource:
    kind: str  # "hf" | "checkpoint"
    path: str  # the HF directory, or the committed step directory
    description: str


def resolve(path: str) -> InitSource:
    """What ``checkpoint.init_from`` points at; ConfigError when it is none of the accepted kinds."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError([Problem(FIELD, path, "is not a directory on this node (it must be visible from every "
                                   "node: e.g. on FSx)")])
    if (root / "config.json").is_file() and ((root / SINGLE_NAME).is_file() or (root / INDEX_NAME).is_file()):
        return InitSource("hf", str(root), f"Hugging Face model {root}")
    run_dir = (root / "config.yaml").is_file()  # a run directory (its manifest.json lists library versions)
    if not run_dir and (root / MANIFEST_NAME).is_file():
        return InitSource("checkpoint", str(root), f"checkpoint step {root}")
    ckpt_dir = Path(_run_checkpoint_dir(root)) if run_dir else root
    store = CheckpointStore(str(ckpt_dir))
    if store.committed_steps() or (ckpt_dir.is_dir() and any(parse_step_name(p.name) is not None
                                                             for p in ckpt_dir.iterdir())):
        valid = store.newest_valid(checksums=False, say=lambda _line: None)
        if valid is None:
            raise ConfigError([Problem(FIELD, path, f"{ckpt_dir} has step directories but none is committed and "
                                       "intact (manifest and files): point at another checkpoint")])
        return InitSource("checkpoint", valid.path, f"checkpoint {valid.path} (newest committed step of {ckpt_dir})")
    if run_dir:
        raise ConfigError([Problem(FIELD, path, f"this run has no committed checkpoint (in {ckpt_dir}) yet; "
                                   "init_from a run needs it to have saved a step")])
    raise ConfigError([Problem(FIELD, path, "is neither a Hugging Face model directory (config.json + "
                               "*.safetensors) nor a checkpoint, step or run directory of ours")])


def _run_checkpoint_dir(run_dir: Path) -> str:
    from configs.loading import load_run_config

    try:
        cfg = load_run_config(run_dir / "config.yaml")
    except (ConfigError, OSError) as exc:
        raise ConfigError([Problem(FIELD, str(run_dir), f"cannot read that run's config.yaml: {exc}")]) from None
    return cfg.checkpoint.resolved_dir(str(run_dir)) or str(run_dir / "checkpoints")


# ------------------------------------------------------------------------------------ Hugging Face


def check_hf_source(hf_dir: str, model: ModelConfig) -> tuple[Dims, SafetensorsDir]:
    """The HF directory matches the model config: architecture, tensor names, shapes, vocabulary."""
    try:
        from_hf = model_fields(read_hf_config(hf_dir), hf_dir)
    except HfConfigError as exc:
        raise ConfigError([Problem(FIELD, p.value, p.fix) for p in exc.problems]) from None
    mine = {key: getattr(model, key) for key in from_hf if hasattr(model, key)}
    mine.pop("max_position_embeddings", None)  # a longer or shorter context does not change any tensor
    mine.pop("hf_architecture", None)
    problems = disagreements(mine, {k: v for k, v in from_hf.items() if k in mine}, hf_dir)
    if problems:
        raise ConfigError([Problem(p.field, p.value, f"{p.fix} (checkpoint.init_from={hf_dir})") for p in problems])
    try:
        reader = SafetensorsDir(hf_dir)
    except SafetensorsError as exc:
        raise ConfigError([Problem(FIELD, hf_dir, str(exc))]) from None
    dims = dims_from_model(model, padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by))
    expected = set(hf_names(dims))
    present = {n for n in reader.names() if not n.endswith(_IGNORED)}
    if dims.tied:
        present.discard("lm_head.weight")  # some tied checkpoints store the copy
    missing = sorted(expected - present)
    unexpected = sorted(present - expected)
    out: list[Problem] = []
    if missing:
        out.append(Problem(FIELD, hf_dir, f"tensor {missing[0]} is missing" + (f" (+{len(missing) - 1} more)"
                                                                              if len(missing) > 1 else "")))
    if unexpected:
        out.append(Problem(FIELD, hf_dir, f"unexpected tensor {unexpected[0]}" + (f" (+{len(unexpected) - 1} more)"
                                                                                  if len(unexpected) > 1 else "")
                           + ": the model config does not have it (another architecture or layer count?)"))
    for name in sorted(expected & present):
        if reader.shape(name) != hf_shape(name, dims):
            out.append(Problem(FIELD, hf_dir, f"tensor {name} has shape {list(reader.shape(name))}, the model config "
                               f"needs {list(hf_shape(name, dims))}"))
    if dims.vocab > dims.padded_vocab:
        out.append(Problem("model.vocab_size", dims.vocab, f"exceeds the padded vocabulary {dims.padded_vocab}"))
    if out:
        raise ConfigError(out)
    return dims, reader


def hf_slices(names: list[tuple[str, tuple[int, ...]]], dims: Dims, where: RankSlice, reader: SafetensorsDir,
              dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(global megatron name, this rank's slice) for each (name, local shape), one tensor at a time."""
    def read(name: str, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        return reader.read(name, rows=rows, cols=cols, dtype=dtype)

    for name, shape in names:
        tensor = megatron_slice(name, dims, where, read)
        if tuple(tensor.shape) != tuple(shape):
            raise ConfigError([Problem(FIELD, reader.directory, f"{canonical(name)}: this rank's slice has shape "
                                       f"{list(tensor.shape)}, the model's parameter {list(shape)}")])
        yield name, tensor


def load_hf_weights(state: Any, hf_dir: str, say: Callable[[str], None]) -> int:
    """Collective-free: every rank fills its own parameters from its slices. Returns bytes read here."""
    from megatron.core import parallel_state

    from trainer.model import gpt_module
    from trainer.param_init import global_name

    dims, reader = check_hf_source(hf_dir, state.cfg.model)
    where = RankSlice(parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_tensor_model_parallel_world_size())
    loaded = 0
    with torch.no_grad():
        for chunk in state.model:
            gpt = gpt_module(chunk)
            numbers = [layer.layer_number for layer in gpt.decoder.layers]
            params = {global_name(local, numbers, dims.tied): param for local, param in gpt.named_parameters()}
            wanted = [(name, tuple(p.shape)) for name, p in params.items()]
            for name, tensor in hf_slices(wanted, dims, where, reader):
                params[name].copy_(tensor)
                loaded += tensor.numel() * tensor.element_size()
    state.optimizer.reload_model_params()
    return loaded


# ------------------------------------------------------------------------------------ our checkpoints


def load_checkpoint_weights(state: Any, step_dir: str, say: Callable[[str], None]) -> None:
    """Collective: the model tensors of a committed step, resharded to this layout; nothing else."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from checkpointing.signature import model_mismatches, model_signature
    from trainer.model import gpt_module

    try:
        manifest = read_manifest(step_dir)
    except ManifestError as exc:
        raise ConfigError([Problem(FIELD, step_dir, f"not a committed checkpoint step: {exc}")]) from None
    mismatches = model_mismatches(manifest.model, model_signature(state.cfg.model))
    if mismatches:
        raise ConfigError([Problem("model.vocab_size" if key == "padded_vocab_size" else f"model.{key}", current,
                                   f"the checkpoint in {FIELD}={step_dir} has {key}={saved}: its tensors do not fit "
                                   "this model") for key, saved, current in mismatches])
    chunks = [gpt_module(chunk) for chunk in state.model]
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    sd = {f"model{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}
    loaded = dist_checkpointing.load(sd, step_dir, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"], strict=False)
    state.optimizer.reload_model_params()


def initialize_from(state: Any, path: str, say: Callable[[str], None]) -> InitSource:
    """Collective: weights from ``checkpoint.init_from``; everything else starts fresh."""
    source = resolve(path)
    if source.kind == "hf":
        read = load_hf_weights(state, source.path, say)
        say(f"checkpoint: initialised weights from {source.description} (rank 0 read {read / 2**20:.1f} MiB: its "
            "own slices); optimizer, LR schedule and data start fresh")
    else:
        load_checkpoint_weights(state, source.path, say)
        say(f"checkpoint: initialised weights from {source.description}; optimizer, LR schedule and data start fresh")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return source


class InitFromCallback:
    """``init_from`` without checkpointing (checkpoint.enabled=false): initialise, then nothing else."""

    def __init__(self, path: str, rank: int) -> None:
        self.path, self.rank = path, rank

    def _say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def on_train_start(self, state: Any) -> None:
        initialize_from(state, self.path, self._say)

    def on_step_end(self, state: Any, report: Any) -> None:
        pass

    def on_validation(self, state: Any, report: Any) -> None:
        pass

    def on_train_end(self, state: Any, *, finished: bool, error: Optional[BaseException] = None) -> None:
        pass

    def after_shutdown(self, state: Any, *, finished: bool) -> None:
        pass


def describe_source(path: str) -> str:
    """For the launcher: what init_from points at, or why it cannot be used (never raises)."""
    try:
        return resolve(path).description
    except ConfigError as exc:
        return str(exc.problems[0]) if exc.problems else str(exc)
    except OSError as exc:
        return f"{path}: {os.strerror(exc.errno or 0)}"
