"""The commit record of one checkpoint step: every file with its size and CRC-32.

A step directory is a checkpoint only if its ``manifest.json`` parses, names its own step
and lists files that all exist with the recorded sizes (and, when verified, checksums).
CRC-32 because it is what S3 checks natively (per part and per object), so one checksum
follows the bytes from the writer to S3 and back; it guards against torn and corrupted
files, not against an adversary.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional

MANIFEST_NAME = "manifest.json"
FORMAT = "hyperlaunch-checkpoint/1"
_READ_CHUNK = 8 << 20


class ManifestError(Exception):
    """A missing or inconsistent manifest: the directory is not a checkpoint."""


class ManifestUnreadable(ManifestError):
    """The manifest exists but reading it failed (EIO, ESTALE, EACCES): nothing is known about the step."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    crc32: str  # 8 hex digits


@dataclass(frozen=True)
class Manifest:
    step: int
    files: dict[str, FileEntry]  # path relative to the step directory -> entry
    consumed_samples: int
    model: dict[str, Any]  # architecture signature (see checkpointing.state.model_signature)
    layout: dict[str, Any]  # the parallel layout that saved it
    training: dict[str, Any] = field(default_factory=dict)  # settings resume relies on
    created_unix: float = 0.0
    format: str = FORMAT
    optimizer_format: str = "fully_reshardable"  # megatron's distributed-optimizer sharding type
    # self-description for tools that read a step without its run (export_hf, init_from):
    model_config: dict[str, Any] = field(default_factory=dict)  # the full configs.schema.ModelConfig
    tokenizer: Optional[str] = None  # the Hugging Face tokenizer directory the run used, if any
    # data provenance: per blend source, samples and tokens consumed up to this step
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def to_json(self) -> str:
        body = asdict(self)
        body["files"] = {name: asdict(entry) for name, entry in sorted(self.files.items())}
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ManifestError(f"unknown manifest format {raw.get('format')!r}")
            files = {str(name): FileEntry(size=int(e["size"]), crc32=str(e["crc32"]))
                     for name, e in raw["files"].items()}
            return cls(step=int(raw["step"]), files=files, consumed_samples=int(raw["consumed_samples"]),
                       model=dict(raw["model"]), layout=dict(raw["layout"]), training=dict(raw.get("training", {})),
                       created_unix=float(raw.get("created_unix", 0.0)), format=raw["format"],
                       optimizer_format=str(raw.get("optimizer_format", "fully_reshardable")),
                       model_config=dict(raw.get("model_config") or {}), tokenizer=raw.get("tokenizer"),
                       data=dict(raw.get("data") or {}))
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"malformed manifest: {exc!r}") from None


def crc_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


class HashingWriter:
    """A binary file that keeps the CRC-32 and size of what went through ``write``.

    Enough file API for torch.save and DCP's ``_write_item`` (write, tell, flush, fileno).
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.crc = 0
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return self._raw.write(view)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def entry(self) -> FileEntry:
        return FileEntry(size=self.size, crc32=crc_hex(self.crc))


def file_entry(path: str | os.PathLike[str]) -> FileEntry:
    """Size and CRC-32 of a file, read in chunks (zlib releases the GIL on large buffers)."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return FileEntry(size=size, crc32=crc_hex(crc))


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(step_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write ``manifest.json`` durably: temp file, fsync, rename, fsync the directory."""
    final = Path(step_dir) / MANIFEST_NAME
    tmp = final.with_name(MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_dir(step_dir)


def read_manifest(step_dir: str | os.PathLike[str]) -> Manifest:
    path = Path(step_dir) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError("no manifest.json (the save did not commit)") from None
    except OSError as exc:
        raise ManifestUnreadable(f"cannot read manifest.json: {exc}") from None
    return Manifest.from_json(text)


def check_files(step_dir: str | os.PathLike[str], manifest: Manifest, *, checksums: bool,
                names: Optional[list[str]] = None) -> list[str]:
    """Problems with the listed files (all, or ``names``); empty when they match the manifest."""
    problems: list[str] = []
    for name in sorted(manifest.files) if names is None else names:
        expected = manifest.files[name]
        path = Path(step_dir) / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if size != expected.size:
            problems.append(f"{name}: {size} bytes, manifest says {expected.size}")
            continue
        if checksums:
            actual = file_entry(path)
            if actual.crc32 != expected.crc32:
                problems.append(f"{name}: crc32 {actual.crc32}, manifest says {expected.crc32}")
    return problems


# --------------------------------------------------------------------------- CRC-32 combination
# zlib's crc32_combine (not exposed by Python's zlib): CRC of A+B from CRC(A), CRC(B), len(B).
# Lets the uploader check that parts read in parallel add up to the committed file's CRC.

def _gf2_times(mat: list[int], vec: int) -> int:
    total, i = 0, 0
    while vec:
        if vec & 1:
            total ^= mat[i]
        vec >>= 1
        i += 1
    return total


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    if len2 <= 0:
        return crc1
    op = [0xEDB88320] + [1 << n for n in range(31)]  # the CRC-32 operator for one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # ... for one zero byte (2^3 bits)
    while len2:  # apply the operator for 2^k zero bytes for every bit k set in len2
        if len2 & 1:
            crc1 = _gf2_times(op, crc1)
        len2 >>= 1
        if len2:
            op = _gf2_square(op)
    return (crc1 ^ crc2) & 0xFFFFFFFF
