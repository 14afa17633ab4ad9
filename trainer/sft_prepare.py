"""Chat conversations -> token ids and assistant masks, written once as megatron indexed datasets.

A prepared prefix is six files, written under temporary names and renamed into place with
``PREFIX.sft.json`` last (its presence means the set is complete):

* ``PREFIX.bin/.idx``: the token ids, one document per conversation (megatron's format);
* ``PREFIX.mask.bin/.idx``: uint8, 1 where the token is part of an assistant reply (same shape);
* ``PREFIX.docs.npy``: int64 ``[conversations, 3]``: input file number, line number, loss-bearing
  tokens (assistant tokens that are some token's label: the mask without its first entry);
* ``PREFIX.sft.json``: tokenizer (path, fingerprint, vocabulary, pad id), counts, input files and a
  fingerprint of the written tokens and masks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

FORMAT = "hyperlaunch-sft/1"
SUFFIXES = (".bin", ".idx", ".mask.bin", ".mask.idx", ".docs.npy")
META_SUFFIX = ".sft.json"
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
BATCH_LINES = 256


class SFTDataError(Exception):
    """Bad SFT input or tokenizer; the message names the file and line and the fix."""


def tokenizer_fingerprint(path: str) -> str:
    """sha256 over the tokenizer's files (name and content): equal for a copy, different after any edit."""
    digest = hashlib.sha256()
    present = [name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]
    if not present:
        raise SFTDataError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); point "
                           "training.data.tokenizer / --tokenizer at a Hugging Face model or tokenizer directory")
    for name in present:
        digest.update(name.encode() + b"\0" + (Path(path) / name).read_bytes() + b"\0")
    return digest.hexdigest()[:32]


class ChatTokenizer:
    """A Hugging Face tokenizer whose chat template marks assistant replies with ``{% generation %}``."""

    def __init__(self, path: str) -> None:
        if not Path(path).is_dir():
            raise SFTDataError(f"tokenizer directory not found: {path}")
        self.fingerprint = tokenizer_fingerprint(path)
        from transformers import AutoTokenizer  # type: ignore[import-not-found]

        self.path, self.hf = path, AutoTokenizer.from_pretrained(path, local_files_only=True)
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one formats conversations
            template = template.get("default")
        if not isinstance(template, str) or not template.strip():
            raise SFTDataError(f"tokenizer {path} has no chat template (chat_template.jinja or tokenizer_config.json "
                               "'chat_template'); use the instruct model's tokenizer or add a template")
        if not GENERATION_TAG.search(template):
            raise SFTDataError(f"the chat template of {path} has no {{% generation %}} markers, so Hugging Face "
                               "cannot tell assistant tokens apart (the loss mask would be all zeros); wrap the "
                               "assistant content (and its end-of-turn token) in "
                               "{% generation %}...{% endgeneration %}")
        quoted = {role for role in KNOWN_ROLES if f"'{role}'" in template or f'"{role}"' in template}
        self.roles = tuple(r for r in KNOWN_ROLES if r in quoted) or KNOWN_ROLES
        pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.vocab_size = len(self.hf)

    def encode(self, messages: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and assistant mask (uint8) of one conversation; ``where`` names it in errors."""
        if not isinstance(messages, list) or not messages:
            raise SFTDataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise SFTDataError(f"{where}: message {i} must be an object with a string 'content'")
            if message.get("role") not in self.roles:
                raise SFTDataError(f"{where}: message {i} has role {message.get('role')!r}; the chat template "
                                   f"knows {', '.join(self.roles)}")
        try:
            out: Any = self.hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        except Exception as exc:  # jinja's raise_exception and template errors: the template's own words
            raise SFTDataError(f"{where}: the chat template refused this conversation: {exc}") from None
        ids = np.asarray(out["input_ids"], dtype=np.int64)
        mask = np.asarray(out["assistant_masks"], dtype=np.uint8)
        if not mask.any():
            why = ("it has no assistant turn (nothing to train on); remove it"
                   if all(m["role"] != "assistant" for m in messages) else
                   "the template marked no assistant tokens; check its {% generation %} block")
            raise SFTDataError(f"{where}: the loss mask is all zeros: {why}")
        if mask.all():
            raise SFTDataError(f"{where}: the loss mask is all ones (every token counts as assistant); the template's "
                               "{% generation %} block must wrap only the assistant replies")
        return ids, mask


def read_conversation(raw: bytes, where: str) -> Any:
    """The ``messages`` of one JSONL line (None for a blank line)."""
    if not raw.strip():
        return None
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SFTDataError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise SFTDataError(f"{where}: not valid JSON ({exc.msg}); each line must be one "
                           "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]} object") from None
    if not isinstance(record, dict) or "messages" not in record:
        found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise SFTDataError(f"{where}: no 'messages' field (found: {found}); each line must be "
                           "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")
    return record["messages"]


@dataclass(frozen=True)
class Encoded:
    file: int
    line: int
    ids: np.ndarray
    mask: np.ndarray


_WORKER_TOKENIZER: Optional[ChatTokenizer] = None  # one per worker process (multiprocessing initializer)


def _init_worker(path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = ChatTokenizer(path)


def _encode_batch(batch: tuple[int, str, list[tuple[int, bytes]]]) -> tuple[list[Encoded], int]:
    """The conversations of a batch of lines, and the bytes those lines took (for progress)."""
    file, name, lines = batch
    tok = _WORKER_TOKENIZER
    if tok is None:
        raise RuntimeError("worker tokenizer not initialised")
    out = []
    for line, raw in lines:
        messages = read_conversation(raw, f"{name} line {line}")
        if messages is not None:
            out.append(Encoded(file, line, *tok.encode(messages, f"{name} line {line}")))
    return out, sum(len(raw) for _, raw in lines)


def _batches(inputs: list[Path]) -> Iterator[tuple[int, str, list[tuple[int, bytes]]]]:
    for file, path in enumerate(inputs):
        with path.open("rb") as handle:
            batch: list[tuple[int, bytes]] = []
            for line, raw in enumerate(handle, start=1):
                batch.append((line, raw))
                if len(batch) == BATCH_LINES:
                    yield file, str(path), batch
                    batch = []
            if batch:
                yield file, str(path), batch


def _encoded(inputs: list[Path], tokenizer: ChatTokenizer, workers: int) -> Iterator[tuple[list[Encoded], int]]:
    if workers <= 1:
        global _WORKER_TOKENIZER
        _WORKER_TOKENIZER = tokenizer
        yield from map(_encode_batch, _batches(inputs))
        return
    import multiprocessing

    # spawn: a forked HF tokenizer deadlocks its own thread pool
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer.path,)) as pool:
        yield from pool.imap(_encode_batch, _batches(inputs), chunksize=4)


def read_meta(prefix: str) -> Optional[dict[str, Any]]:
    path = Path(prefix + META_SUFFIX)
    if not path.is_file():
        return None
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta


def prepare_sft(inputs: list[Path], output_prefix: str, tokenizer: ChatTokenizer, *, max_length: Optional[int] = None,
                workers: int = 1, show_progress: bool = False) -> dict[str, Any]:
    """Tokenize chat JSONL files into a prepared prefix; returns its metadata. Nothing is left on error.

    ``max_length`` drops (and counts) conversations longer than that many tokens; without it every
    conversation is kept and the trainer refuses ones longer than ``training.seq_length``."""
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise SFTDataError(f"input file not found: {', '.join(missing)}")
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from trainer import megatron_noise

    megatron_noise.silence()
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tokens = IndexedDatasetBuilder(tmp + ".bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    masks = IndexedDatasetBuilder(tmp + ".mask.bin", dtype=np.uint8)
    digest, docs, per_file = hashlib.sha256(), list[tuple[int, int, int]](), [0] * len(inputs)
    dropped = max_id = total = 0
    try:
        with Progress(console=Console(stderr=True), disable=not show_progress, transient=True) as progress:
            task = progress.add_task("tokenizing conversations", total=sum(p.stat().st_size for p in inputs))
            for batch, consumed in _encoded(inputs, tokenizer, workers):
                progress.advance(task, consumed)
                for item in batch:
                    if max_length is not None and len(item.ids) > max_length:
                        dropped += 1
                        continue
                    tokens.add_item(torch.from_numpy(item.ids))
                    masks.add_item(torch.from_numpy(item.mask))
                    tokens.end_document()
                    masks.end_document()
                    digest.update(item.ids.tobytes() + item.mask.tobytes())
                    docs.append((item.file, item.line, int(item.mask[1:].sum())))
                    per_file[item.file] += 1
                    max_id, total = max(max_id, int(item.ids.max())), total + len(item.ids)
        if not docs:
            raise SFTDataError(f"no conversations in {', '.join(map(str, inputs))}"
                               + (f" ({dropped} longer than --max-length {max_length})" if dropped else "")
                               + "; nothing written")
        tokens.finalize(tmp + ".idx")
        masks.finalize(tmp + ".mask.idx")
        table = np.asarray(docs, dtype=np.int64)
        np.save(tmp + ".docs.npy", table)
        meta = {"format": FORMAT, "tokenizer": tokenizer.path, "tokenizer_fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size, "max_token_id": max_id, "pad_id": tokenizer.pad_id,
                "conversations": len(docs), "tokens": total,
                "loss_tokens": int(table[:, 2].sum()), "max_length": max_length, "dropped_too_long": dropped,
                "inputs": [{"path": str(p), "conversations": n} for p, n in zip(inputs, per_file)],
                "fingerprint": digest.hexdigest()[:32]}
        Path(tmp + META_SUFFIX).write_text(json.dumps(meta, indent=1) + "\n")
        for suffix in (*SUFFIXES, META_SUFFIX):  # durable before it becomes visible
            with open(tmp + suffix, "rb") as written:
                os.fsync(written.fileno())
        Path(output_prefix + META_SUFFIX).unlink(missing_ok=True)  # a reader never sees new files + old metadata
        for suffix in (*SUFFIXES, META_SUFFIX):
            os.replace(tmp + suffix, output_prefix + suffix)
        return meta
    except BaseException:
        for builder in (tokens, masks):
            builder.data_file.close()
        for suffix in (*SUFFIXES, META_SUFFIX):
            Path(tmp + suffix).unlink(missing_ok=True)
        raise

