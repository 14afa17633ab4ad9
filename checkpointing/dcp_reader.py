"""Read the model tensors of one committed step offline: no process group, no megatron, bounded memory.

A step directory holds megatron-core ``torch_dist`` files: torch DCP's ``.metadata`` (every key's
global shape and the chunks each rank stored) and ``__<rank>_<n>.distcp`` files. Model keys are
global and do not depend on the layout that saved them. Transformer layers are stacked: one key
per parameter type (``decoder.layers.self_attention.linear_qkv.weight``) with the global layer
index as axis 0, stored as one chunk per (layer, tensor-parallel piece). The norms carry the
Transformer Engine names (``...linear_qkv.layer_norm_weight`` is the input norm,
``...linear_fc1.layer_norm_weight`` the pre-MLP norm) whichever spec saved them.

:meth:`StepReader.read_box` asks DCP for one box of a global tensor (a layer, some rows); DCP
then loads only the stored chunks that overlap it, one at a time, so memory is the box plus one
stored chunk, never the stacked tensor. ``torch.distributed.checkpoint``'s own
``_load_state_dict_from_keys`` cannot read megatron's files (their ``planner_data`` is None).

The ``.metadata`` file is a pickle, as in every DCP checkpoint: read trusted checkpoints only.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from checkpointing.manifest import Manifest, ManifestError
from checkpointing.store import CheckpointStore, parse_step_name

LAYER_PREFIX = "decoder.layers."
_METADATA_NAME = ".metadata"
_SKIPPED_PREFIXES = ("optimizer.", "rng_state")


class CheckpointReadError(Exception):
    """The directory is not a readable committed step, or a tensor is missing or damaged (names both)."""


@dataclass(frozen=True)
class StoredTensor:
    """One model tensor as the checkpoint holds it (global shape, whatever layout saved it)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: int  # stored pieces

    @property
    def layer_stacked(self) -> bool:
        return self.key.startswith(LAYER_PREFIX)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class _BoxPlanner(DefaultLoadPlanner):
    """Loads the box ``[offsets, offsets + dest.shape)`` of one saved global tensor into ``dest``."""

    def __init__(self, key: str, offsets: Sequence[int], dest: torch.Tensor) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.key, self.offsets, self.dest = key, tuple(offsets), dest
        self.covered = 0  # elements the plan reads: must be the whole box

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:  # pragma: no cover - DCP sets it up before planning
            raise CheckpointReadError("DCP gave the planner no metadata")
        md = self.metadata.state_dict_metadata[self.key]
        if not isinstance(md, TensorStorageMetadata):  # pragma: no cover - checked by the caller
            raise CheckpointReadError(f"{self.key} is not a tensor")
        box = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.dest.size())
        items: list[ReadItem] = create_read_items_for_chunk_list(self.key, md, [box])
        self.covered = sum(math.prod(item.lengths) for item in items)
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.dest  # read items address the destination relative to the box


class _KnownMetadataReader(FileSystemReader):
    """A FileSystemReader that does not unpickle ``.metadata`` again for every read."""

    def __init__(self, path: str, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata


class StepReader:
    """The model tensors of one committed step directory (``<checkpoint dir>/step_00000040``)."""

    def __init__(self, step_dir: str, *, verify_checksums: bool = False) -> None:
        self.path = os.path.abspath(step_dir)
        self.manifest = committed_manifest(self.path, verify_checksums=verify_checksums)
        try:
            with open(os.path.join(self.path, _METADATA_NAME), "rb") as handle:
                metadata = pickle.load(handle)
        except FileNotFoundError:
            raise CheckpointReadError(f"{self.path}: no {_METADATA_NAME}: not a torch_dist checkpoint") from None
        except Exception as exc:  # a damaged pickle raises anything
            raise CheckpointReadError(f"{self.path}/{_METADATA_NAME} is unreadable ({type(exc).__name__}: {exc}); "
                                      "the step is damaged: export another step (--step)") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointReadError(f"{self.path}/{_METADATA_NAME} is not DCP metadata")
        self._metadata = metadata
        self.tensors: dict[str, StoredTensor] = {
            key: StoredTensor(key, tuple(md.size), md.properties.dtype, len(md.chunks))
            for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) and _is_model_key(key)
        }

    @property
    def step(self) -> int:
        return self.manifest.step

    def tensor(self, key: str) -> StoredTensor:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointReadError(f"{self.path}: no model tensor {key!r} (it holds: "
                                      f"{', '.join(sorted(self.tensors)) or 'none'})") from None

    def read_box(self, key: str, offsets: Sequence[int], shape: Sequence[int],
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``tensor[offsets[0]:offsets[0]+shape[0], ...]`` of the global tensor ``key``."""
        stored = self.tensor(key)
        if len(offsets) != len(stored.shape) or len(shape) != len(stored.shape) or any(
                o < 0 or n < 0 or o + n > dim for o, n, dim in zip(offsets, shape, stored.shape)):
            raise CheckpointReadError(f"{key}: box at {list(offsets)} of size {list(shape)} is outside its "
                                      f"stored shape {list(stored.shape)}")
        dest = torch.empty(tuple(shape), dtype=stored.dtype)
        if dest.numel() == 0:
            return dest if dtype is None else dest.to(dtype)
        planner = _BoxPlanner(key, offsets, dest)
        try:
            with warnings.catch_warnings():  # "torch.distributed is disabled ...": single process on purpose
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp_load({key: dest}, storage_reader=_KnownMetadataReader(self.path, self._metadata),
                         planner=planner, no_dist=True)
        except Exception as exc:  # a truncated or damaged .distcp file
            raise CheckpointReadError(f"{self.path}: cannot read {key} at {list(offsets)}: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                                      "the step is damaged: export another step (--step)") from None
        if planner.covered != dest.numel():
            raise CheckpointReadError(f"{self.path}: {key} at {list(offsets)} size {list(shape)} is only partly "
                                      f"stored ({planner.covered} of {dest.numel()} elements)")
        return dest if dtype is None or dtype == dest.dtype else dest.to(dtype)

    def read(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A whole tensor (for small ones: norms, biases; the stacked keys have :meth:`read_layer`)."""
        shape = self.tensor(key).shape
        return self.read_box(key, (0,) * len(shape), shape, dtype)

    def read_layer(self, key: str, layer: int, rows: Optional[tuple[int, int]] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Layer ``layer`` (global index) of a layer-stacked key, optionally only rows ``[start, stop)``."""
        shape = self.tensor(key).shape
        if not self.tensor(key).layer_stacked or not shape:
            raise CheckpointReadError(f"{key} is not a layer-stacked tensor")
        if not 0 <= layer < shape[0]:
            raise CheckpointReadError(f"{key}: layer {layer} out of range (the checkpoint has {shape[0]})")
        start, stop = rows if rows is not None else (0, shape[1] if len(shape) > 1 else 1)
        if len(shape) == 1:
            return self.read_box(key, (layer,), (1,), dtype)[0]
        box = self.read_box(key, (layer, start) + (0,) * (len(shape) - 2), (1, stop - start) + shape[2:], dtype)
        return box[0]

    def row_blocks(self, key: str, stop: int, max_bytes: int) -> list[tuple[int, int]]:
        """Rows ``[0, stop)`` of a tensor as ``[start, end)`` blocks that never straddle a stored chunk
        (each chunk is loaded once) and hold at most ``max_bytes`` (at least one row)."""
        stored = self.tensor(key)
        md = self._metadata.state_dict_metadata[key]
        if not isinstance(md, TensorStorageMetadata):  # pragma: no cover - tensors() holds tensors only
            raise CheckpointReadError(f"{key} is not a tensor")
        row_bytes = max(1, math.prod(stored.shape[1:]) * stored.dtype.itemsize)
        per_block = max(1, max_bytes // row_bytes)
        bounds = sorted({0, stop} | {c.offsets[0] for c in md.chunks if 0 < c.offsets[0] < stop})
        return [(begin, min(begin + per_block, end)) for begin, end in zip(bounds, bounds[1:])
                for begin in range(begin, end, per_block)]

    def read_rows(self, key: str, start: int, stop: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of a (non-stacked) tensor, e.g. a block of the embedding."""
        shape = self.tensor(key).shape
        return self.read_box(key, (start,) + (0,) * (len(shape) - 1), (stop - start,) + shape[1:], dtype)


def _is_model_key(key: str) -> bool:
    return not key.startswith(_SKIPPED_PREFIXES) and "_extra_state" not in key


def committed_manifest(step_dir: str, *, verify_checksums: bool = False) -> Manifest:
    """The manifest of a committed step (named ``step_NNNNNNNN``, files present with their sizes)."""
    path = os.path.abspath(step_dir)
    step = parse_step_name(os.path.basename(path))
    if not os.path.isdir(path):
        raise CheckpointReadError(f"{step_dir}: no such directory")
    if step is None:
        raise CheckpointReadError(f"{step_dir}: not a committed step directory (step_NNNNNNNN); temporary "
                                  "(.tmp) steps never committed")
    try:
        return CheckpointStore(os.path.dirname(path)).validate(step, checksums=verify_checksums).manifest
    except ManifestError as exc:
        raise CheckpointReadError(f"{step_dir}: not a usable committed step: {exc}") from None
