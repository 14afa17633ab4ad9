"""Training samples, addressed by a global sample index so every layout sees the same batches.

Step ``s`` (0-based) trains on samples ``[s * G, (s + 1) * G)`` with ``G`` the global batch size;
data-parallel rank ``r`` of ``dp`` takes the ``r``-th contiguous slice and cuts it into
micro-batches. Tensor- and pipeline-parallel peers read the same samples themselves (cheap
here) instead of receiving a broadcast.

A sample (:data:`Sample`) holds ``tokens``, ``labels``, ``loss_mask`` and ``position_ids`` of one
sequence, and ``segment_ids`` when several documents are packed into it (attention then stays
inside each document: see :func:`attention_mask`). Sources:

* ``synthetic``: arithmetic progressions modulo the vocabulary with a random start and a small
  random stride per sample. A model learns quickly to continue them, so the loss falls within
  a few steps; samples depend only on (seed, index).
* ``indexed``: megatron-core's ``GPTDataset`` over ``.bin/.idx`` files written by
  ``python -m trainer.tokenize``, blended by the configured weights (megatron's
  ``BlendedDataset``); validation uses every source's held-out split separately.
* ``sft``: chat conversations with loss on assistant tokens only (trainer.sft).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from configs.derived import split_documents
from configs.errors import ConfigError, Problem
from configs.schema import DataConfig, TrainingConfig
from configs.validate import blend_name, parse_split
from trainer.indexed import read_idx
from trainer.samples import Sample
from trainer.tokenize import BYTE_EOD

MAX_STRIDE = 8
TRAIN, VALID = 0, 1


class TokenSource(Protocol):
    def sample(self, index: int) -> Sample: ...

    def consumption(self, samples: int) -> dict[str, dict[str, int]]:
        """Per source label: ``samples`` and ``tokens`` (loss-bearing) among the first ``samples`` samples."""
        ...


def lm_sample(text: np.ndarray) -> Sample:
    """A plain language-model sample from ``seq_length + 1`` tokens: every label counts."""
    tokens = np.asarray(text[:-1], dtype=np.int64)
    return {"tokens": tokens, "labels": np.asarray(text[1:], dtype=np.int64),
            "loss_mask": np.ones(len(tokens), dtype=np.float32), "position_ids": np.arange(len(tokens), dtype=np.int64)}


class SyntheticSource:
    """``(start + k * stride) mod vocab`` for k = 0..seq_length; start, stride from (seed, index)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, name: str = "synthetic") -> None:
        self.vocab_size, self.seq_length, self.seed, self.name = vocab_size, seq_length, seed, name

    def sample(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, index])
        start = int(rng.integers(self.vocab_size))
        stride = int(rng.integers(1, MAX_STRIDE))
        return lm_sample((start + stride * np.arange(self.seq_length + 1, dtype=np.int64)) % self.vocab_size)

    def consumption(self, samples: int) -> dict[str, dict[str, int]]:
        return {self.name: {"samples": samples, "tokens": samples * self.seq_length}}


class _ByteTokenizer:
    """What GPTDataset reads from a tokenizer; EOD only matters for the masks we leave off."""

    eod = BYTE_EOD
    vocab_size = BYTE_EOD + 1
    unique_identifiers = {"class": "ByteTokenizer"}


def check_indexed_paths(data: DataConfig, field: str = "training.data.blend") -> None:
    """Every source exists and gets at least one document in every split with a share: megatron's
    builder builds them all, and loops forever on an empty one."""
    missing = [b.path for b in data.blend if not (Path(b.path + ".bin").is_file() and Path(b.path + ".idx").is_file())]
    if missing:
        raise ConfigError([Problem(field, missing, "no <prefix>.bin/.idx pair there; write them with "
                                   "`python -m trainer.tokenize --input ... --output-prefix PREFIX`")])
    shares = parse_split(data.split)
    for i, entry in enumerate(data.blend):
        documents, _ = read_idx(entry.path)
        for k, (begin, end) in enumerate(split_documents(shares, documents) if shares else []):
            if shares and shares[k] > 0 and end <= begin:
                raise ConfigError([Problem(f"{field}[{i}].path", entry.path, f"has {documents} document(s): the "
                                           f"{('training', 'validation', 'test')[k]} share of training.data.split="
                                           f"{data.split!r} gets none; use more documents or a larger share")])


class IndexedSource:
    """megatron-core GPTDatasets blended by the configured weights (one split of every source)."""

    def __init__(self, data: DataConfig, seq_length: int, num_samples: int, split: int = TRAIN) -> None:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset

        _require_dataset_helpers()
        check_indexed_paths(data)
        self.seq_length = seq_length
        self.names = [blend_name(b.path, b.name) for b in data.blend]
        weights = [float(b.weight) for b in data.blend]
        config = _gpt_config(data, seq_length, [b.path for b in data.blend], weights)
        sizes = [0, 0, 0]
        sizes[split] = num_samples
        # collective: rank 0 writes the index cache first, the others then read it
        built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        dataset = built[split]
        if dataset is None:
            raise ConfigError([Problem("training.data.split", data.split, "leaves no documents for "
                                       f"{'training' if split == TRAIN else 'validation'}; give that split a share, "
                                       "e.g. 98,2,0")])
        self._dataset = dataset
        index = getattr(dataset, "dataset_index", None)  # a BlendedDataset (2+ sources) knows each sample's source
        self._source_of = None if index is None else np.asarray(index)

    def __len__(self) -> int:
        return len(self._dataset)

    def sample(self, index: int) -> Sample:
        item = self._dataset[index]
        tokens, labels = item["tokens"], item["labels"]
        return lm_sample(torch.cat([tokens, labels[-1:]]).numpy().astype(np.int64))

    def consumption(self, samples: int) -> dict[str, dict[str, int]]:
        if self._source_of is None:
            counts = np.array([samples])
        else:
            counts = np.bincount(self._source_of[:samples], minlength=len(self.names))
        return {name: {"samples": int(n), "tokens": int(n) * self.seq_length} for name, n in zip(self.names, counts)}


def _gpt_config(data: DataConfig, seq_length: int, paths: list[str], weights: Optional[list[float]]) -> Any:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=data.seed,
        sequence_length=seq_length,
        blend=(paths, weights),
        split=data.split,
        path_to_cache=data.cache_dir,
        tokenizer=_ByteTokenizer(),  # type: ignore[arg-type]
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )


def _require_dataset_helpers() -> None:
    """GPTDataset's index building needs megatron's compiled helper; wheels ship it prebuilt."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"megatron-core's compiled dataset helper is missing ({exc}). Reinstall the megatron-core "
            "wheel for this Python/platform; in a source checkout build it with "
            "`make -C megatron/core/datasets` (needs pybind11 and a C++ compiler)") from None


def build_source(training: TrainingConfig, vocab_size: int, total_steps: int) -> TokenSource:
    data = training.data
    if data.source == "indexed":
        return IndexedSource(data, training.seq_length, total_steps * training.global_batch_size)
    if data.source == "sft":
        from trainer.sft import build_sft_source

        return build_sft_source(training, vocab_size, split=TRAIN)
    return SyntheticSource(vocab_size, training.seq_length, data.seed)


def build_validation(training: TrainingConfig, vocab_size: int) -> dict[str, TokenSource]:
    """One validation source per blend entry (its held-out split), each of ``eval_iters`` global batches."""
    data = training.data
    needed = training.eval_iters * training.global_batch_size
    if data.source == "synthetic":  # a disjoint seed: samples the model never trained on
        return {"synthetic": SyntheticSource(vocab_size, training.seq_length, data.seed + 7919)}
    split = parse_split(data.split)
    if split is None or split[VALID] == 0:
        return {}
    sources: dict[str, TokenSource] = {}
    for entry in data.blend:
        single = DataConfig(source=data.source, blend=[entry], split=data.split, tokenizer=data.tokenizer,
                            pack_sequences=data.pack_sequences, cache_dir=data.cache_dir, seed=data.seed)
        one = replace(training, data=single)
        name = blend_name(entry.path, entry.name)
        if data.source == "sft":
            from trainer.sft import build_sft_source

            sources[name] = build_sft_source(one, vocab_size, split=VALID)
        else:
            sources[name] = IndexedSource(single, training.seq_length, needed, split=VALID)
    return sources


def microbatches(source: TokenSource, training: TrainingConfig, step: int, dp_rank: int,
                 dp_size: int, *, first_sample: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of step ``step`` (0-based), in order.

    ``first_sample`` overrides where the global batch starts (validation reads its own range)."""
    per_rank = training.global_batch_size // dp_size
    base = step * training.global_batch_size if first_sample is None else first_sample
    first = base + dp_rank * per_rank
    mbs = training.micro_batch_size
    for start in range(first, first + per_rank, mbs):
        yield collate([source.sample(i) for i in range(start, start + mbs)])


def collate(samples: list[Sample]) -> dict[str, torch.Tensor]:
    batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in
             ("tokens", "labels", "loss_mask", "position_ids")}
    if any("segment_ids" in s for s in samples):  # packed documents: the forward step turns these into a
        # block-diagonal mask (local layers) or THD cu_seqlens (Transformer Engine)
        batch["segment_ids"] = torch.from_numpy(np.stack([s.get("segment_ids", np.zeros(len(s["tokens"]), dtype=np.int64))
                                                          for s in samples]))
    return batch


def attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` bool, True where attention is NOT allowed: causal, and never across documents."""
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal)[:, None]
