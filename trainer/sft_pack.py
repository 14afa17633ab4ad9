"""Pure index arithmetic for SFT data: splits, per-epoch shuffles, packing, blending, sample layout.

Everything is a function of (seed, sizes), never of the run length, so a longer run, a resumed run
and every rank see the same samples.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from trainer.samples import Sample

PACK_WINDOW = 64  # open bins a conversation may still go into (first fit); older bins are closed


def split_conversations(count: int, shares: tuple[float, float, float], seed: int) -> list[np.ndarray]:
    """Conversation ids of the train, valid and test splits: a seeded permutation cut by the shares.

    Disjoint by construction; sorted so reads stay roughly sequential."""
    order = np.random.default_rng([seed, 0x5F7]).permutation(count)
    bounds = np.round(np.cumsum((0.0, *shares)) * count).astype(np.int64)
    bounds[-1] = count
    return [np.sort(order[bounds[i]:bounds[i + 1]]) for i in range(3)]


def pack(lengths: np.ndarray, seq_length: int, window: int = PACK_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """First-fit in order over the last ``window`` open bins.

    Returns ``(order, offsets)``: positions into ``lengths`` grouped by bin (bins in the order they
    were opened, conversations in arrival order inside a bin) and ``offsets`` [bins + 1]."""
    room = np.full(window, -1, dtype=np.int64)  # free tokens of the open bins, oldest first (-1: no bin)
    slot = np.full(window, -1, dtype=np.int64)  # which bin each of them is
    bins: list[list[int]] = []
    for i, length in enumerate(lengths.tolist()):
        fits = room >= length
        j = int(fits.argmax())
        if fits[j]:
            bins[slot[j]].append(i)
            room[j] -= length
        else:  # open a bin; the oldest open one is closed
            room[:-1], slot[:-1] = room[1:].copy(), slot[1:].copy()
            room[-1], slot[-1] = seq_length - length, len(bins)
            bins.append([i])
    order = np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(lengths))
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in bins], out=offsets[1:])
    return order, offsets


@dataclass(frozen=True)
class Epoch:
    conversations: np.ndarray  # conversation ids, grouped by sample
    offsets: np.ndarray  # [samples + 1] into ``conversations``
    loss_tokens: np.ndarray  # [samples + 1] cumulative loss-bearing tokens


class EpochIndex:
    """Samples of one split of one source, epoch after epoch, each epoch freshly shuffled.

    Epochs are built when first needed; sample ``k`` is the same whatever was asked before."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, loss: np.ndarray, seq_length: int, packed: bool,
                 seed: int, label: str, split: int) -> None:
        if len(ids) == 0:
            raise ValueError("EpochIndex needs at least one conversation")
        self.ids, self.lengths, self.loss = ids, lengths, loss
        self.seq_length, self.packed = seq_length, packed
        self._key = [seed, zlib.crc32(label.encode()), split]
        self._epochs: list[Epoch] = []
        self._starts = [0]  # first sample of every built epoch, plus the end of the last

    def epoch(self, e: int) -> Epoch:
        while len(self._epochs) <= e:
            self._epochs.append(self._build(len(self._epochs)))
            self._starts.append(self._starts[-1] + len(self._epochs[-1].offsets) - 1)
        return self._epochs[e]

    def _build(self, e: int) -> Epoch:
        shuffled = self.ids[np.random.default_rng([*self._key, e]).permutation(len(self.ids))]
        if self.packed:
            order, offsets = pack(self.lengths[shuffled], self.seq_length)
            shuffled = shuffled[order]
        else:
            offsets = np.arange(len(shuffled) + 1, dtype=np.int64)
        per_conversation = np.concatenate([[0], np.cumsum(self.loss[shuffled])])
        return Epoch(shuffled, offsets, per_conversation[offsets])

    def locate(self, k: int) -> tuple[int, int]:
        """The epoch holding sample ``k`` and ``k``'s index inside it."""
        while self._starts[-1] <= k:
            self.epoch(len(self._epochs))
        e = bisect.bisect_right(self._starts, k) - 1
        return e, k - self._starts[e]

    def conversations(self, k: int) -> np.ndarray:
        e, i = self.locate(k)
        epoch = self._epochs[e]
        return epoch.conversations[epoch.offsets[i]:epoch.offsets[i + 1]]

    def loss_tokens(self, samples: int) -> int:
        """Loss-bearing tokens in samples ``[0, samples)``."""
        if samples <= 0:
            return 0
        e, i = self.locate(samples - 1)
        return sum(int(self._epochs[p].loss_tokens[-1]) for p in range(e)) + int(self._epochs[e].loss_tokens[i + 1])


class Blend:
    """Global sample ``i`` -> (source, that source's sample): megatron's greedy weighted interleave.

    Source ``j`` is picked where ``w_j * max(i, 1) - count_j`` is largest, so every prefix of the
    index holds the sources in proportion to the weights; the index is grown by doubling."""

    def __init__(self, weights: list[float]) -> None:
        total = float(sum(weights))
        self.weights = np.asarray([w / total for w in weights], dtype=np.float64)
        self.source = np.zeros(0, dtype=np.int16)
        self.sample = np.zeros(0, dtype=np.int64)

    def _grow(self, size: int) -> None:
        if size <= len(self.source):
            return
        size = max(size, 2 * len(self.source), 1024)
        if len(self.weights) == 1:
            self.source, self.sample = np.zeros(size, dtype=np.int16), np.arange(size, dtype=np.int64)
            return
        from megatron.core.datasets.helpers_cpp import build_blending_indices

        source, sample = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int64)
        build_blending_indices(source, sample, self.weights, len(self.weights), size, False)
        self.source, self.sample = source, sample

    def locate(self, index: int) -> tuple[int, int]:
        self._grow(index + 1)
        return int(self.source[index]), int(self.sample[index])

    def counts(self, samples: int) -> np.ndarray:
        self._grow(samples)
        return np.bincount(self.source[:samples], minlength=len(self.weights))


def assemble(pieces: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int,
             segments: bool) -> Sample:
    """One sample from conversations' (token ids, assistant mask), packed in order, padded to ``seq_length``.

    Labels are the next token of the same conversation; a label counts when it is an assistant
    token. A conversation's last position (its label would be the next conversation's first token)
    and the padding never count. With ``segments``: ``segment_ids`` number the conversations, the
    padding gets its own, and positions restart in each."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.arange(seq_length, dtype=np.int64)
    segment_ids = np.full(seq_length, len(pieces), dtype=np.int64)
    at = 0
    for n, (ids, mask) in enumerate(pieces):
        end = at + len(ids)
        tokens[at:end] = ids
        labels[at:end - 1] = ids[1:]
        loss_mask[at:end - 1] = mask[1:]
        position_ids[at:end] = np.arange(len(ids))
        segment_ids[at:end] = n
        at = end
    sample: Sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if segments:
        position_ids[at:] = np.arange(seq_length - at)
        sample["segment_ids"] = segment_ids
    return sample


def too_long(lengths: np.ndarray, seq_length: int, limit: Optional[int] = 3) -> np.ndarray:
    """Ids of the conversations longer than ``seq_length``, longest first (at most ``limit``)."""
    over = np.flatnonzero(lengths > seq_length)
    return over[np.argsort(-lengths[over], kind="stable")][:limit]
