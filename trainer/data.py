"""Training samples, addressed by a global sample index so every layout sees the same batches.

Step ``s`` (0-based) trains on samples ``[s * G, (s + 1) * G)`` with ``G`` the global batch size;
data-parallel rank ``r`` of ``dp`` takes the ``r``-th contiguous slice and cuts it into
micro-batches. Tensor- and pipeline-parallel peers read the same samples themselves (cheap
here) instead of receiving a broadcast.

Two sources:

* ``synthetic``: arithmetic progressions modulo the vocabulary with a random start and a small
  random stride per sample. A model learns quickly to continue them, so the loss falls within
  a few steps; samples depend only on (seed, index).
* ``indexed``: megatron-core's ``GPTDataset`` over ``.bin/.idx`` files written by
  ``python -m trainer.tokenize`` (documents concatenated with EOD, shuffled by ``data.seed``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from configs.schema import DataConfig, TrainingConfig
from configs.errors import ConfigError, Problem
from trainer.tokenize import BYTE_EOD

MAX_STRIDE = 8


class TokenSource(Protocol):
    def sample(self, index: int) -> np.ndarray:
        """``seq_length + 1`` token ids (inputs are ``[:-1]``, labels ``[1:]``)."""
        ...


class SyntheticSource:
    """``(start + k * stride) mod vocab`` for k = 0..seq_length; start, stride from (seed, index)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int) -> None:
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed

    def sample(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        start = int(rng.integers(self.vocab_size))
        stride = int(rng.integers(1, MAX_STRIDE))
        return (start + stride * np.arange(self.seq_length + 1, dtype=np.int64)) % self.vocab_size


class _ByteTokenizer:
    """What GPTDataset reads from a tokenizer; EOD only matters for the masks we leave off."""

    eod = BYTE_EOD
    vocab_size = BYTE_EOD + 1
    unique_identifiers = {"class": "ByteTokenizer"}


class IndexedSource:
    """megatron-core GPTDataset (train split) over the configured path prefixes, blended equally."""

    def __init__(self, data: DataConfig, seq_length: int, num_samples: int) -> None:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        _require_dataset_helpers()
        missing = [p for p in data.paths if not (Path(p + ".bin").is_file() and Path(p + ".idx").is_file())]
        if missing:
            raise ConfigError([Problem("training.data.paths", missing,
                                       "no <prefix>.bin/.idx pair there; write them with "
                                       "`python -m trainer.tokenize --input ... --output-prefix PREFIX`")])
        config = GPTDatasetConfig(
            random_seed=data.seed,
            sequence_length=seq_length,
            blend=(list(data.paths), None),
            split=data.split,
            path_to_cache=data.cache_dir,
            tokenizer=_ByteTokenizer(),  # type: ignore[arg-type]
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        # collective: rank 0 writes the index cache first, the others then read it
        builder = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config)
        train, _, _ = builder.build()
        if train is None:
            raise ConfigError([Problem("training.data.split", data.split,
                                       "leaves no training documents; give the first split a weight, e.g. 99,1,0")])
        self._dataset = train

    def sample(self, index: int) -> np.ndarray:
        item = self._dataset[index]
        tokens, labels = item["tokens"], item["labels"]
        return torch.cat([tokens, labels[-1:]]).numpy().astype(np.int64)


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
    if training.data.source == "indexed":
        return IndexedSource(training.data, training.seq_length, total_steps * training.global_batch_size)
    return SyntheticSource(vocab_size, training.seq_length, training.data.seed)


def microbatches(source: TokenSource, training: TrainingConfig, step: int, dp_rank: int,
                 dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of step ``step`` (0-based), in order."""
    per_rank = training.global_batch_size // dp_size
    first = step * training.global_batch_size + dp_rank * per_rank
    mbs = training.micro_batch_size
    positions = torch.arange(training.seq_length, dtype=torch.long).unsqueeze(0).expand(mbs, -1)
    for start in range(first, first + per_rank, mbs):
        text = torch.from_numpy(np.stack([source.sample(i) for i in range(start, start + mbs)]))
        yield {"tokens": text[:, :-1].contiguous(), "labels": text[:, 1:].contiguous(),
               "position_ids": positions}
