"""Supervised fine-tuning data: chat conversations, loss on assistant tokens only.

``training.data.blend`` entries are prepared prefixes (``python -m trainer.tokenize --sft``) or
``.jsonl`` files, which are prepared once into ``training.data.cache_dir`` (default
``<run dir>/data_cache``) under a key of the file's path, size and mtime and the tokenizer's
fingerprint, and reused while those stay the same. Global rank 0 prepares; the other ranks wait
for its result on a gloo group with a long timeout (a collective on the default group would time
out on a large file).

Rules (see trainer.sft_pack): conversations are split train/valid/test by a permutation seeded
with ``training.data.seed`` and cut by ``training.data.split``; each epoch is a fresh shuffle;
with ``pack_sequences`` conversations are packed first-fit into ``seq_length`` tokens, otherwise
one per sample; sources are interleaved by weight (megatron's greedy rule). A conversation longer
than ``seq_length`` is an error naming its file and line: truncating would train on replies cut
short or on nothing at all, silently (``tokenize --sft --max-length`` drops them explicitly).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from configs.errors import ConfigError, Problem
from configs.schema import BlendSource, DataConfig, TrainingConfig
from configs.validate import blend_name, parse_split
from trainer.sft_pack import Blend, EpochIndex, Sample, assemble, split_conversations, too_long
from trainer.sft_prepare import FORMAT, ChatTokenizer, SFTDataError, prepare_sft, read_meta, tokenizer_fingerprint

RUN_DIR_ENV = "HYPERLAUNCH_RUN_DIR"
SPLIT_NAMES = ("training", "validation", "test")
PREPARE_TIMEOUT = timedelta(hours=12)  # how long the other ranks wait for rank 0 to tokenize a .jsonl
PARALLEL_BYTES = 64 * 2**20  # larger .jsonl files are tokenized by several processes (the other ranks are idle)
MAX_WORKERS = 16


class Corpus:
    """One split of one prepared prefix, as a sequence of samples."""

    def __init__(self, prefix: str, meta: dict[str, Any], ids: np.ndarray, seq_length: int, packed: bool,
                 seed: int, label: str, split: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.tokens, self.masks = IndexedDataset(prefix), IndexedDataset(prefix + ".mask")
        lengths = np.array(self.tokens.sequence_lengths, dtype=np.int64)
        loss = np.load(prefix + ".docs.npy", mmap_mode="r")[:, 2]
        self.index = EpochIndex(ids, lengths, np.asarray(loss), seq_length, packed, seed, label, split)
        self.seq_length, self.packed, self.pad_id = seq_length, packed, int(meta["pad_id"])

    def sample(self, k: int) -> Sample:
        pieces = [(np.asarray(self.tokens[int(c)], dtype=np.int64), np.asarray(self.masks[int(c)]))
                  for c in self.index.conversations(k)]
        return assemble(pieces, self.seq_length, self.pad_id, segments=self.packed)


class SFTSource:
    """Weighted blend of SFT corpora, addressed by global sample index (a ``trainer.data.TokenSource``)."""

    def __init__(self, corpora: list[Corpus], names: list[str], weights: list[float]) -> None:
        self.corpora, self.names, self.blend = corpora, names, Blend(weights)

    def sample(self, index: int) -> Sample:
        source, k = self.blend.locate(index)
        return self.corpora[source].sample(k)

    def consumption(self, samples: int) -> dict[str, dict[str, int]]:
        counts = self.blend.counts(samples)
        return {name: {"samples": int(n), "tokens": corpus.index.loss_tokens(int(n))}
                for name, corpus, n in zip(self.names, self.corpora, counts)}


def build_sft_source(training: TrainingConfig, vocab_size: int, split: int = 0) -> SFTSource:
    """The ``split`` (0 train, 1 valid, 2 test) of every blend source. Collective when the blend has
    ``.jsonl`` entries and torch.distributed is initialised (every rank must call it)."""
    from trainer import megatron_noise

    megatron_noise.silence()
    data = training.data
    shares = parse_split(data.split)
    if shares is None:
        raise ConfigError([Problem("training.data.split", data.split, "use train,valid,test shares, e.g. 98,2,0")])
    fingerprint = _tokenizer_fingerprint(data)
    problems: list[Problem] = []
    corpora: list[Corpus] = []
    for i, entry in enumerate(data.blend):
        field, label = f"training.data.blend[{i}].path", blend_name(entry.path, entry.name)
        try:
            prefix = _prepared_prefix(entry, data, fingerprint)
            meta = _checked_meta(prefix, fingerprint, vocab_size, training.seq_length, data.tokenizer or "")
        except SFTDataError as exc:
            problems.append(Problem(field, entry.path, str(exc)))
            continue
        ids = split_conversations(int(meta["conversations"]), shares, data.seed)[split]
        if len(ids) == 0:
            problems.append(Problem("training.data.split", data.split, f"leaves none of the {meta['conversations']} "
                                    f"conversations of {label!r} for {SPLIT_NAMES[split]}; give that split a larger "
                                    "share (or add data)"))
            continue
        corpora.append(Corpus(prefix, meta, ids, training.seq_length, data.pack_sequences, data.seed, label, split))
    if problems:
        raise ConfigError(problems)
    return SFTSource(corpora, [blend_name(b.path, b.name) for b in data.blend], [b.weight for b in data.blend])


def _tokenizer_fingerprint(data: DataConfig) -> str:
    if not data.tokenizer or not Path(data.tokenizer).is_dir():
        raise ConfigError([Problem("training.data.tokenizer", data.tokenizer, "not a directory; point it at the "
                                   "Hugging Face tokenizer (the model directory) the SFT data is tokenized with")])
    try:
        return tokenizer_fingerprint(data.tokenizer)
    except SFTDataError as exc:
        raise ConfigError([Problem("training.data.tokenizer", data.tokenizer, str(exc))]) from None


def _checked_meta(prefix: str, fingerprint: str, vocab_size: int, seq_length: int,
                  tokenizer: str) -> dict[str, Any]:
    meta = read_meta(prefix)
    if meta is None or meta.get("format") != FORMAT:
        raise SFTDataError(f"{prefix}.sft.json is missing or not {FORMAT}; prepare it with `python -m trainer.tokenize "
                           f"--sft --input chat.jsonl --tokenizer {tokenizer} --output-prefix {prefix}`")
    if meta["tokenizer_fingerprint"] != fingerprint:
        raise SFTDataError(f"was tokenized with {meta['tokenizer']} (fingerprint {meta['tokenizer_fingerprint']}), "
                           f"which differs from training.data.tokenizer={tokenizer} ({fingerprint}); use that "
                           "tokenizer or prepare the data again with this one")
    if int(meta["max_token_id"]) >= vocab_size:
        raise SFTDataError(f"holds token id {meta['max_token_id']} but the model's vocabulary has {vocab_size} "
                           "entries; use the model's own tokenizer (or a model with a larger vocabulary)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # keep it alive while reading: its arrays view its memory map
    lengths = np.array(dataset.sequence_lengths, dtype=np.int64)
    del dataset
    worst = too_long(lengths, seq_length)
    if len(worst):
        docs = np.load(prefix + ".docs.npy", mmap_mode="r")
        inputs = meta["inputs"]
        where = ", ".join(f"{inputs[int(docs[c, 0])]['path']} line {int(docs[c, 1])} ({int(lengths[c])} tokens)"
                          for c in worst)
        count = int((lengths > seq_length).sum())
        raise SFTDataError(f"{count} conversation{'s' * (count > 1)} longer than training.seq_length={seq_length} "
                           f"tokens: {where}{' ...' if count > len(worst) else ''}; raise training.seq_length to "
                           f"{int(lengths[worst[0]])} or drop them: python -m trainer.tokenize --sft --max-length "
                           f"{seq_length} --input ... --tokenizer {tokenizer} --output-prefix PREFIX, then use PREFIX")
    return meta


def _prepared_prefix(entry: BlendSource, data: DataConfig, fingerprint: str) -> str:
    path = str(entry.path)
    if not path.endswith(".jsonl"):
        if Path(path).is_file():
            raise SFTDataError("is a file but not .jsonl; give a .jsonl of {\"messages\": [...]} lines or a prefix "
                               "written by `python -m trainer.tokenize --sft`")
        if Path(path + ".bin").is_file() and read_meta(path) is None:
            raise SFTDataError("is plain indexed (pre-training) data without assistant masks; prepare chat data "
                               "with `python -m trainer.tokenize --sft`")
        if read_meta(path) is None:
            raise SFTDataError(f"no {path}.sft.json (nor a .jsonl file); write it with `python -m trainer.tokenize "
                               "--sft --input chat.jsonl --tokenizer DIR --output-prefix PREFIX`")
        return path
    source = Path(path)
    if not source.is_file():
        raise SFTDataError("file not found")
    tokenizer = data.tokenizer or ""
    stat = source.stat()
    key = hashlib.sha256(json.dumps([FORMAT, str(source.resolve()), stat.st_size, stat.st_mtime_ns,
                                     fingerprint]).encode()).hexdigest()[:16]
    prefix = str(_cache_dir(data) / "sft" / f"{source.name.removesuffix('.jsonl')}-{key}")
    _on_rank0_then_share(lambda: _prepare_missing(source, prefix, tokenizer))
    return prefix


def _prepare_missing(source: Path, prefix: str, tokenizer: str) -> None:
    # concurrent writers (two jobs sharing a cache) write identical files under their own temporary
    # names and rename them into place, so the race is harmless
    if read_meta(prefix) is None:
        size = source.stat().st_size
        workers = 1 if size < PARALLEL_BYTES else max(1, min(MAX_WORKERS, (os.cpu_count() or 2) // 2))
        print(f"preparing SFT data {source} ({size / 2**20:.1f} MiB, {workers} tokenizer processes) into {prefix}; "
              "prepare large sets ahead with `python -m trainer.tokenize --sft`", flush=True)
        prepare_sft([source], prefix, ChatTokenizer(tokenizer), workers=workers)


def _cache_dir(data: DataConfig) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir)
    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        raise ConfigError([Problem("training.data.cache_dir", None, f"no run directory (${RUN_DIR_ENV}) to put "
                                   "prepared .jsonl data in; set training.data.cache_dir")])
    return Path(run_dir) / "data_cache"


def _on_rank0_then_share(work: Callable[[], None]) -> None:
    """Run ``work`` on global rank 0; every rank raises rank 0's SFTDataError (or learns that it failed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        work()
        return
    group = _wait_group()  # every rank creates it before rank 0 starts: creation has the default timeout
    outcome: list[Optional[str]] = [None]
    failure: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            work()
        except SFTDataError as exc:
            outcome[0] = str(exc)
        except Exception as exc:  # rank 0 re-raises the real error; the others must not wait forever
            failure, outcome[0] = exc, f"preparing SFT data failed on rank 0 ({type(exc).__name__}: {exc})"
    dist.broadcast_object_list(outcome, src=0, group=group)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise SFTDataError(outcome[0])


@functools.cache
def _wait_group() -> Any:
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
