"""Tokenize text into megatron's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``).

    python -m trainer.tokenize --input a.jsonl b.txt --output-prefix data/corpus
    python -m trainer.tokenize --input a.jsonl --output-prefix data/corpus --tokenizer /models/llama3
    python -m trainer.tokenize --sft --input chat.jsonl --tokenizer /models/llama3 --output-prefix data/chat

Documents: one per line of a ``.jsonl`` (or JSON-lines ``.json``) file, taken from the
``--json-key`` field (default ``text``); one per plain-text file otherwise. Every document ends
with the end-of-document token.

Tokenizers: bytes by default (UTF-8 bytes 0..255, EOD = 256, vocabulary 257: the ``tiny``
model), or a Hugging Face tokenizer from a local directory (EOD = its ``eos_token_id``; needs
the ``transformers`` package, nothing is downloaded).

``--sft``: chat data for supervised fine-tuning (trainer.sft_prepare). Each line is
``{"messages": [{"role": ..., "content": ...}, ...]}``, formatted with the tokenizer's chat
template, which must mark assistant replies with ``{% generation %}``; writes ``PREFIX.bin/.idx``
(tokens), ``PREFIX.mask.bin/.idx`` (assistant mask), ``PREFIX.docs.npy`` and ``PREFIX.sft.json``.
``--max-length N`` drops conversations longer than N tokens (the trainer refuses them otherwise);
``--workers N`` tokenizes in N processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

BYTE_EOD = 256
PROGRESS_MIN_BYTES = 8 * 1024 * 1024
JSON_LINES_SUFFIXES = (".jsonl", ".json")  # megatron's preprocess_data also calls JSON lines .json


class TokenizeError(Exception):
    """A problem with the inputs or options; printed without a traceback (exit status 2)."""


class Tokenizer(Protocol):
    name: str
    eod: int
    vocab_size: int

    def encode(self, text: str) -> list[int] | np.ndarray: ...


class ByteTokenizer:
    name = "bytes"
    eod = BYTE_EOD
    vocab_size = BYTE_EOD + 1

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class HuggingFaceTokenizer:
    def __init__(self, path: str) -> None:
        if not Path(path).exists():
            raise TokenizeError(f"tokenizer directory not found: {path}")
        try:
            from transformers import AutoTokenizer  # type: ignore[import-not-found]
        except ImportError:
            raise TokenizeError("--tokenizer needs the `transformers` package (pip install transformers); "
                                "leave --tokenizer out to use the byte tokenizer") from None
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self._tok.eos_token_id is None:
            raise TokenizeError(f"tokenizer {path} has no eos token to end documents with")
        self.name, self.eod, self.vocab_size = path, int(self._tok.eos_token_id), len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Summary:
    documents: int
    tokens: int
    skipped_empty: int


def documents(path: Path, json_key: str) -> Iterator[tuple[str, int]]:
    """(text, bytes consumed) per document; raises TokenizeError naming the file and line."""
    if path.suffix not in JSON_LINES_SUFFIXES:
        data = path.read_bytes()
        yield _decode(data, path, None), len(data)
        return
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                yield "", len(raw)
                continue
            try:
                record = json.loads(_decode(raw, path, number))
            except json.JSONDecodeError as exc:
                raise TokenizeError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or json_key not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise TokenizeError(f"{path} line {number}: no {json_key!r} field (found: {keys}); "
                                    "pick the field with --json-key")
            text = record[json_key]
            if not isinstance(text, str):
                raise TokenizeError(f"{path} line {number}: field {json_key!r} is {type(text).__name__}, not a string")
            yield text, len(raw)


def _decode(data: bytes, path: Path, line: int | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"{path} line {line}" if line is not None else f"{path} byte {exc.start}"
        raise TokenizeError(f"{where}: not UTF-8 text") from None


def tokenize_files(inputs: list[Path], output_prefix: str, tokenizer: Tokenizer, json_key: str = "text",
                   show_progress: bool | None = None) -> Summary:
    """Write ``output_prefix``.bin/.idx; on error nothing is left behind."""
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise TokenizeError(f"input file not found: {', '.join(missing)}")
    from trainer import megatron_noise

    megatron_noise.silence()
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
    from rich.console import Console
    from rich.progress import Progress
    bin_path, idx_path = Path(get_bin_path(output_prefix)), Path(get_idx_path(output_prefix))
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    total_bytes = sum(p.stat().st_size for p in inputs)
    if show_progress is None:
        show_progress = total_bytes >= PROGRESS_MIN_BYTES
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(str(bin_path), dtype=dtype)
    docs = tokens = empty = 0
    try:
        with Progress(console=Console(stderr=True), disable=not show_progress, transient=True) as progress:
            task = progress.add_task("tokenizing", total=total_bytes)
            for path in inputs:
                progress.update(task, description=f"tokenizing {path.name}")
                for text, consumed in documents(path, json_key):
                    progress.advance(task, consumed)
                    if not text:
                        empty += 1
                        continue
                    ids = np.append(np.asarray(tokenizer.encode(text), dtype=np.int64), tokenizer.eod)
                    builder.add_item(torch.from_numpy(ids))
                    builder.end_document()
                    docs, tokens = docs + 1, tokens + len(ids)
        builder.finalize(str(idx_path))
    except BaseException:
        builder.data_file.close()
        bin_path.unlink(missing_ok=True)
        idx_path.unlink(missing_ok=True)
        raise
    if docs == 0:
        bin_path.unlink(missing_ok=True)
        idx_path.unlink(missing_ok=True)
        raise TokenizeError("no non-empty documents in the inputs; nothing written")
    return Summary(documents=docs, tokens=tokens, skipped_empty=empty)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tokenize", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, type=Path, help=".jsonl files and/or plain-text files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default=None, help="local Hugging Face tokenizer directory (default: bytes)")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl lines")
    parser.add_argument("--sft", action="store_true", help="chat .jsonl ({\"messages\": [...]}) with assistant masks")
    parser.add_argument("--max-length", type=int, default=None, help="--sft: drop conversations longer than this")
    parser.add_argument("--workers", type=int, default=1, help="--sft: tokenizer processes")
    args = parser.parse_args(argv)
    if args.sft:
        return _main_sft(args)
    try:
        tokenizer: Tokenizer = HuggingFaceTokenizer(args.tokenizer) if args.tokenizer else ByteTokenizer()
        summary = tokenize_files(args.input, args.output_prefix, tokenizer, args.json_key)
    except TokenizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {summary.documents} documents, {summary.tokens} tokens "
          f"(tokenizer {tokenizer.name}, eod={tokenizer.eod}, vocab={tokenizer.vocab_size}"
          f"{f', skipped {summary.skipped_empty} empty' if summary.skipped_empty else ''})")
    return 0


def _main_sft(args: argparse.Namespace) -> int:
    from trainer.sft_prepare import ChatTokenizer, SFTDataError, prepare_sft

    problems = []
    if not args.tokenizer:
        problems.append("--sft needs --tokenizer DIR: the Hugging Face tokenizer with the model's chat template")
    if args.max_length is not None and args.max_length < 2:
        problems.append(f"--max-length {args.max_length}: must be at least 2 tokens (use training.seq_length)")
    if args.workers < 1:
        problems.append(f"--workers {args.workers}: must be at least 1")
    missing = [str(p) for p in args.input if not p.is_file()]
    if missing:
        problems.append(f"input file not found: {', '.join(missing)}")
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 2
    try:
        big = sum(p.stat().st_size for p in args.input) >= PROGRESS_MIN_BYTES
        meta = prepare_sft(args.input, args.output_prefix, ChatTokenizer(args.tokenizer),
                           max_length=args.max_length, workers=args.workers, show_progress=big)
    except SFTDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dropped = meta["dropped_too_long"]
    print(f"wrote {args.output_prefix}.bin/.idx, .mask.bin/.idx, .docs.npy, .sft.json: {meta['conversations']} "
          f"conversations, {meta['tokens']} tokens, {meta['loss_tokens']} loss-bearing (tokenizer {args.tokenizer}, "
          f"vocab={meta['vocab_size']}{f', dropped {dropped} longer than {args.max_length}' if dropped else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
