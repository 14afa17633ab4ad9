"""Values derived from a config (pure functions: no I/O, no torch)."""

from __future__ import annotations

import math
import re

from configs.schema import RootConfig

_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$|^(\d+)$")


def parse_time_limit(value: str) -> int | None:
    """Slurm time limit ``[D-]HH:MM:SS`` or minutes -> seconds; None when malformed."""
    m = _TIME.match(value.strip())
    if not m:
        return None
    if m.group(5) is not None:
        return int(m.group(5)) * 60
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups()[:4])
    if minutes >= 60 or seconds >= 60:
        return None
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def padded_vocab_size(vocab: int, divisible_by: int) -> int:
    return int(math.ceil(vocab / divisible_by) * divisible_by)


def derived_dp(cfg: RootConfig) -> int | None:
    """Data-parallel size implied by the world size, or the explicit one."""
    p = cfg.parallelism
    if p.dp is not None:
        return p.dp
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    model_parallel = p.tp * p.pp * p.cp
    if model_parallel <= 0 or world % model_parallel:
        return None
    return world // model_parallel


def train_steps(cfg: RootConfig) -> int:
    t = cfg.training
    if t.train_steps is not None:
        return t.train_steps
    tokens = t.train_tokens or 0  # validate() guarantees one of the two is set
    return max(1, tokens // (t.global_batch_size * t.seq_length))


def split_documents(shares: tuple[float, float, float], documents: int) -> list[tuple[int, int]]:
    """Document index ranges [begin, end) of the train, valid and test splits, as megatron's builder cuts them."""
    bounds, edge = [], 0.0
    for share in shares:
        lo, hi = edge, edge + share
        bounds.append((int(round(lo * documents)), int(round(hi * documents))))
        edge = hi
    return bounds
