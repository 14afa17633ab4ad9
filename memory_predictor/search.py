"""Enumerate every valid 4D layout of a cluster, drop what does not fit, rank by throughput.

Enumerated (``layout_problems`` holds the validity rules):

* TP: divisors of GPUs per node dividing the heads, the padded vocabulary, and a multiple or
  divisor of the KV heads (tensor parallelism never leaves a node);
* CP: 1, and powers of two with 2 x CP dividing the sequence. *Pruning rule* (not a validity
  rule): at least ``MIN_TOKENS_PER_CP_RANK`` tokens per rank; below that the ring exchange
  cannot hide under attention and no layout with it can rank high. ``evaluate`` takes any CP;
* PP: divisors of the layers, with every VPP that divides the layers per stage;
* DP: the rest; micro batches: divisors of the per-rank batch up to ``max_mbs``
  (the interleaved schedule needs a multiple of PP micro-batches, as megatron-core does);
* recompute none / selective / full, distributed optimizer on / off (off is only a
  different layout when DP x CP > 1); SP always on with TP > 1 (same communication volume
  as TP alone, less memory).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from memory_predictor import constants as C
from memory_predictor.activations import LayerActivations, layer_activations
from memory_predictor.memory import MemoryReport, StageMemory, on_host, predict_memory, stage_memory
from memory_predictor.spec import RECOMPUTE, Hardware, Layout, ModelSpec, Options, TrainSpec, interleaving_accepts, \
    layout_problems
from memory_predictor.throughput import StepTime, predict_step

MIN_TOKENS_PER_CP_RANK = 1024
DEFAULT_MAX_MBS = 8


@dataclass(frozen=True, slots=True)
class Candidate:
    layout: Layout
    train: TrainSpec  # with this candidate's micro-batch size
    peak_bytes: int
    peak_stage: str
    fits: bool
    step: StepTime | None  # None for layouts that do not fit (not timed)

    @property
    def micro_batch_size(self) -> int:
        return self.train.micro_batch_size

    def key(self) -> tuple[int, int, int, int, int]:
        """The 4D split alone (what a benchmark sweep runs once)."""
        lay = self.layout
        return (lay.tp, lay.pp, lay.vpp, lay.cp, lay.dp)


@dataclass(frozen=True, slots=True)
class SearchResult:
    ranked: tuple[Candidate, ...]  # layouts that fit, best (highest tokens/s) first
    evaluated: int
    rejected_memory: int
    usable_bytes: int

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    def distinct(self, k: int) -> list[Candidate]:
        """The best candidate of each of the top-k distinct 4D splits."""
        seen: set[tuple[int, int, int, int, int]] = set()
        out: list[Candidate] = []
        for cand in self.ranked:
            if cand.key() not in seen:
                seen.add(cand.key())
                out.append(cand)
                if len(out) == k:
                    break
        return out


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def enumerate_layouts(model: ModelSpec, seq_length: int, global_batch: int, hw: Hardware, *,
                      recompute: Sequence[str] = RECOMPUTE, distributed_optimizer: Sequence[bool] = (True, False),
                      max_mbs: int = DEFAULT_MAX_MBS, micro_batches: Sequence[int] | None = None,
                      cpu_trainer: bool = False) -> Iterator[tuple[Layout, TrainSpec]]:
    """Every valid (layout, micro-batch) of this model on this cluster."""
    world, L = hw.world, model.num_layers
    probe = TrainSpec(seq_length=seq_length, micro_batch_size=1, global_batch_size=global_batch)
    for tp in _divisors(hw.gpus_per_node):
        # only the TP rules here: the batch and world rules depend on the PP and CP chosen below
        if world % tp or any(p.field == "tp" for p in layout_problems(model, probe, Layout(tp=tp, dp=world // tp), hw)):
            continue
        cps = [1] if cpu_trainer else [c for c in _powers_of_two(world // tp)
                                      if c == 1 or (seq_length % (2 * c) == 0 and (seq_length // c) % tp == 0
                                                    and seq_length // c >= MIN_TOKENS_PER_CP_RANK)]
        for cp in cps:
            if (world // tp) % cp:
                continue
            for pp in _divisors(L):
                if (world // (tp * cp)) % pp:
                    continue
                dp = world // (tp * cp * pp)
                if global_batch % dp:
                    continue
                per_rank = global_batch // dp
                mbs_list = micro_batches or [b for b in _divisors(per_rank) if b <= max_mbs]
                for vpp in ([1] if pp == 1 else _divisors(L // pp)):
                    for mbs in mbs_list:
                        if per_rank % mbs or not interleaving_accepts(per_rank // mbs, pp, vpp):
                            continue
                        train = TrainSpec(seq_length=seq_length, micro_batch_size=mbs, global_batch_size=global_batch)
                        for rc in recompute:
                            for dist in distributed_optimizer:
                                if not dist and dp * cp == 1 and True in distributed_optimizer:
                                    continue  # identical to the distributed optimizer here
                                yield Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, sequence_parallel=tp > 1,
                                             recompute=rc, distributed_optimizer=dist), train


def peak_stage(model: ModelSpec, train: TrainSpec, layout: Layout, opts: Options, layer: LayerActivations,
                overheads: C.Overheads, *, on_cpu: bool) -> StageMemory:
    """The larger of the first and last stage (what ``predict_memory`` calls the peak), cheaply."""
    first = stage_memory(model, train, layout, opts, 0, layer, overheads=overheads)
    last = stage_memory(model, train, layout, opts, layout.pp - 1, layer, overheads=overheads) if layout.pp > 1 else first
    if on_cpu:
        first, last = on_host(first, overheads), on_host(last, overheads)
    return last if last.total > first.total else first


def _powers_of_two(limit: int) -> list[int]:
    out, c = [], 1
    while c <= limit:
        out.append(c)
        c *= 2
    return out


def search(model: ModelSpec, seq_length: int, global_batch: int, hw: Hardware, opts: Options, *,
           recompute: Sequence[str] = RECOMPUTE, distributed_optimizer: Sequence[bool] = (True, False),
           max_mbs: int = DEFAULT_MAX_MBS, micro_batches: Sequence[int] | None = None,
           cpu_trainer: bool = False, eff: C.Efficiency = C.EFFICIENCY,
           overheads: C.Overheads = C.OVERHEADS) -> SearchResult:
    """Rank every layout that fits by predicted tokens/s (ties: less memory first)."""
    layers: dict[tuple[object, ...], LayerActivations] = {}
    usable = int(hw.memory_bytes * opts.usable_fraction) if hw.check_memory else 0
    ranked: list[Candidate] = []
    evaluated = rejected = 0
    for layout, train in enumerate_layouts(model, seq_length, global_batch, hw, recompute=recompute,
                                           distributed_optimizer=distributed_optimizer, max_mbs=max_mbs,
                                           micro_batches=micro_batches, cpu_trainer=cpu_trainer):
        evaluated += 1
        key = (layout.tp, layout.cp, layout.recompute, train.micro_batch_size)
        layer = layers.get(key)
        if layer is None:
            layer = layers[key] = layer_activations(model, seq_length, train.micro_batch_size, layout, opts)
        peak = peak_stage(model, train, layout, opts, layer, overheads, on_cpu=hw.gpu == "cpu")
        if usable and peak.total > usable:
            rejected += 1
            continue
        step = predict_step(model, train, layout, opts, hw, eff)
        ranked.append(Candidate(layout=layout, train=train, peak_bytes=peak.total, peak_stage=peak.stage,
                                fits=True, step=step))
    ranked.sort(key=lambda c: (-c.step.tokens_per_s if c.step else 0.0, c.peak_bytes))
    return SearchResult(ranked=tuple(ranked), evaluated=evaluated, rejected_memory=rejected, usable_bytes=usable)


def evaluate(model: ModelSpec, train: TrainSpec, layout: Layout, opts: Options, hw: Hardware, *,
             eff: C.Efficiency = C.EFFICIENCY, overheads: C.Overheads = C.OVERHEADS) -> tuple[MemoryReport, StepTime]:
    """Memory breakdown and step time of one layout (validity is the caller's check)."""
    return (predict_memory(model, train, layout, opts, hw, overheads),
            predict_step(model, train, layout, opts, hw, eff))


def heatmap_rows(model: ModelSpec, result: SearchResult, opts: Options, hw: Hardware, *, rows: int = 12,
                 micro_batches: Sequence[int] = (1, 2, 4, 8),
                 overheads: C.Overheads = C.OVERHEADS) -> list[tuple[str, list[float | None]]]:
    """(layout label, peak memory fraction per micro-batch size) for the top distinct layouts.

    None where that micro-batch size does not divide the per-rank batch.
    """
    out: list[tuple[str, list[float | None]]] = []
    seen: set[tuple[object, ...]] = set()
    for cand in result.ranked:
        lay = cand.layout
        key = (lay.tp, lay.pp, lay.vpp, lay.cp, lay.dp, lay.recompute, lay.distributed_optimizer)
        if key in seen:
            continue
        seen.add(key)
        fractions: list[float | None] = []
        for mbs in micro_batches:
            train = replace(cand.train, micro_batch_size=mbs)
            per_rank = train.global_batch_size // lay.dp
            if per_rank % mbs or not interleaving_accepts(per_rank // mbs, lay.pp, lay.vpp):
                fractions.append(None)
                continue
            report = predict_memory(model, train, lay, opts, hw, overheads)
            fractions.append(report.peak_bytes / hw.memory_bytes if hw.memory_bytes else None)
        vpp = f" vpp{lay.vpp}" if lay.vpp > 1 else ""
        dist = "" if lay.distributed_optimizer else " plain-opt"
        out.append((f"tp{lay.tp} pp{lay.pp}{vpp} cp{lay.cp} dp{lay.dp} {lay.recompute}{dist}", fractions))
        if len(out) == rows:
            break
    return out
