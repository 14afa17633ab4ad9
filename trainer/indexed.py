"""megatron's indexed dataset files (``PREFIX.bin`` + ``PREFIX.idx``), read without megatron or torch.

The launcher reads every source's index before submitting (documents and tokens per source), so
this module imports numpy only.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_IDX_MAGIC = b"MMIDIDX\x00\x00"


def read_idx(prefix: str) -> tuple[int, int]:
    """(documents, tokens) of a megatron indexed dataset, from ``prefix.idx`` alone."""
    path = Path(prefix + ".idx")
    with open(path, "rb") as handle:
        if handle.read(9) != _IDX_MAGIC:
            raise ValueError(f"{path} is not a megatron .idx file")
        (version,) = struct.unpack("<Q", handle.read(8))
        if version != 1:
            raise ValueError(f"{path}: index version {version}, expected 1")
        handle.read(1)  # dtype code
        (sequences,) = struct.unpack("<Q", handle.read(8))
        (documents,) = struct.unpack("<Q", handle.read(8))
        lengths = np.frombuffer(handle.read(4 * sequences), dtype=np.int32)
    return max(documents - 1, 0), int(lengths.sum(dtype=np.int64))
