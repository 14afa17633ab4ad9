"""Hugging Face safetensors with bounded memory: read row/column slices, write shards tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header (``name -> {dtype, shape,
data_offsets}``, plus ``__metadata__``) and the raw little-endian tensor bytes. Reading uses
``os.pread`` of exactly the rows a rank owns -- no memory map, so a rank's resident memory grows
by its slices only (a mapped 5 GB shard would count every touched page). A column slice (the
row-parallel ``o_proj``/``down_proj`` under tensor parallelism) is read in row blocks of at most
``block_bytes``. Writing streams tensors into a file whose header is planned first, so an
exporter holds one layer at a time, never a whole shard.

A model directory is ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES: dict[str, torch.dtype] = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                                   "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_BLOCK_BYTES = 64 << 20


class SafetensorsError(Exception):
    """A missing, truncated or inconsistent safetensors file or index (names the file and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in ``file``
    nbytes: int


def _read_header(path: str) -> tuple[dict[str, Any], int]:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise SafetensorsError(f"{path}: shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > 100 << 20:
                raise SafetensorsError(f"{path}: implausible header length {length}; not a safetensors file")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise SafetensorsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SafetensorsError(f"{path}: header is not JSON ({exc})") from None
    return header, 8 + length


def tensor_infos(path: str) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, with its absolute offsets (checked against the file size)."""
    header, data_start = _read_header(path)
    size = os.path.getsize(path)
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, not one of "
                                   f"{', '.join(_DTYPES)}")
        begin, end = (int(x) for x in entry["data_offsets"])
        shape = tuple(int(x) for x in entry["shape"])
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * _itemsize(dtype) or data_start + end > size:
            raise SafetensorsError(f"{path}: tensor {name} {list(shape)} does not fit its byte range (truncated "
                                   "or corrupt file)")
        infos[name] = TensorInfo(path, dtype, shape, data_start + begin, end - begin)
    return infos


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsDir:
    """The tensors of a Hugging Face model directory, read slice by slice."""

    def __init__(self, directory: str, block_bytes: int = _BLOCK_BYTES) -> None:
        self.directory = directory
        self.block_bytes = block_bytes
        root = Path(directory)
        index = root / INDEX_NAME
        files: list[str]
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SafetensorsError(f"{index}: not a safetensors index ({exc!r})") from None
            files = sorted(set(weight_map.values()))
        elif (root / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise SafetensorsError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME}")
        self.infos: dict[str, TensorInfo] = {}
        for name in files:
            path = root / name
            if not path.is_file():
                raise SafetensorsError(f"{path}: listed in {INDEX_NAME} but missing")
            self.infos.update(tensor_infos(str(path)))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.infos))
            if missing:
                raise SafetensorsError(f"{directory}: {INDEX_NAME} lists {missing[0]} (+{len(missing) - 1} more) but "
                                       "no shard holds it")

    def names(self) -> list[str]:
        return sorted(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise SafetensorsError(f"{self.directory}: no tensor {name}") from None

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``tensor[rows, cols]`` (dim 0, dim 1; 1-D tensors take ``rows`` only), optionally cast."""
        info = self.info(name)
        first = info.shape[0] if info.shape else 1
        inner = info.shape[1:]
        row_elems = 1
        for dim in inner:
            row_elems *= dim
        r0, r1, step = (rows or slice(None)).indices(first)
        if step != 1:
            raise ValueError("row slices must be contiguous")
        item = _itemsize(info.dtype)
        row_bytes = row_elems * item
        out_dtype = dtype or info.dtype
        if cols is None or not inner:
            return self._rows(info, r0, r1, row_bytes, inner).to(out_dtype)
        c0, c1, cstep = cols.indices(inner[0])
        if cstep != 1:
            raise ValueError("column slices must be contiguous")
        out = torch.empty((r1 - r0, c1 - c0, *inner[1:]), dtype=out_dtype)
        block = max(1, self.block_bytes // max(row_bytes, 1))
        for start in range(r0, r1, block):
            stop = min(r1, start + block)
            out[start - r0:stop - r0] = self._rows(info, start, stop, row_bytes, inner)[:, c0:c1]
        return out

    def _rows(self, info: TensorInfo, r0: int, r1: int, row_bytes: int, inner: tuple[int, ...]) -> torch.Tensor:
        length = (r1 - r0) * row_bytes
        buffer = bytearray(length)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            view, done = memoryview(buffer), 0
            while done < length:
                got = os.preadv(fd, [view[done:]], info.start + r0 * row_bytes + done)
                if got <= 0:
                    raise SafetensorsError(f"{info.file}: unexpected end of file")
                done += got
        finally:
            os.close(fd)
        if length == 0:
            return torch.empty((0, *inner), dtype=info.dtype)
        flat = torch.frombuffer(buffer, dtype=info.dtype)
        return flat.reshape((r1 - r0, *inner)) if info.shape else flat.reshape(())


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * _itemsize(self.dtype)


def plan_shards(tensors: Iterable[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Tensors in order, cut into shards of at most ``max_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [s for s in shards if s]


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """One shard: the header is written first from the plan, then each tensor in plan order."""

    def __init__(self, path: str, planned: list[PlannedTensor], metadata: Optional[dict[str, str]] = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for tensor in planned:
            header[tensor.name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
        self.path = path
        self.expected: Iterator[PlannedTensor] = iter(planned)
        self.handle: BinaryIO = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self._next(name)
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise SafetensorsError(f"{self.path}: {name} is {list(tensor.shape)} {tensor.dtype}, planned "
                                   f"{list(planned.shape)} {planned.dtype}")
        self._write_data(tensor)

    def write_blocks(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        """One tensor given as consecutive row blocks (dim 0), so a large one is never whole in memory."""
        planned = self._next(name)
        total = planned.shape[0] if planned.shape else 1
        rows = 0
        for block in blocks:
            if not block.dim() or tuple(block.shape[1:]) != planned.shape[1:] or block.dtype != planned.dtype \
                    or rows + block.shape[0] > total:
                raise SafetensorsError(f"{self.path}: a block of {name} is {list(block.shape)} {block.dtype} after "
                                       f"{rows} rows, planned {list(planned.shape)} {planned.dtype}")
            rows += block.shape[0]
            self._write_data(block)
            del block  # before the next one is made
        if rows != total:
            raise SafetensorsError(f"{self.path}: {name} got {rows} rows, planned {list(planned.shape)}")

    def _next(self, name: str) -> PlannedTensor:
        planned = next(self.expected, None)
        if planned is None or planned.name != name:
            raise SafetensorsError(f"{self.path}: expected {planned.name if planned else 'no more tensors'}, got {name}")
        return planned

    def _write_data(self, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            self.handle.write(data.view(torch.uint8).numpy().data)

    def discard(self) -> None:
        """Close after a failure without the completeness check (the caller removes the file)."""
        self.handle.close()

    def close(self) -> None:
        leftover = next(self.expected, None)
        if leftover is not None:
            self.handle.close()
            raise SafetensorsError(f"{self.path}: {leftover.name} was planned but never written")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
