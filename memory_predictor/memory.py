"""Per-GPU memory of one pipeline stage: model states, activations in flight, overheads.

Model states follow megatron-core's mixed-precision optimizer (bytes per parameter):

================================  =============  ==========================
precision, gradients              plain          distributed (over DP x CP)
================================  =============  ==========================
bf16 params, fp32 grads (ours)    18             6 + 12 / (d c)
bf16/fp16 params, 16-bit grads    20             4 + 16 / (d c)
fp32 params, fp32 grads           16             8 + 8 / (d c)
================================  =============  ==========================

With 16-bit gradients, 4 of those bytes (the fp32 copy of the main-grad shard) exist only
during the optimizer step: megatron-core's ``_copy_model_grads_to_main_grads`` sets
``shard_main_param.grad = shard_model_grad.float()`` and the step releases it, when the
activations are gone. At the activation peak such a rank holds 4 + 12 / (d c); NVIDIA's
published NeMo log of Llama 3.1 8B (dgxc-benchmarking v25.04, 8 H100, d c = 8, bf16 gradient
reduction) shows 44.27e9 bytes allocated at step end = 5.51 bytes per parameter = 4 + 12/8.

In-flight micro-batches (megatron-core ``get_pp_rank_microbatches``): with 1F1B, pipeline
rank r holds min(p - r, m) micro-batches of its L/p layers; interleaved with v chunks, it
holds min(2 (p - r - 1) + (v - 1) p + 1, m v) chunk-micro-batches of L/(p v) layers, which
for the first stage is L (1 + (p - 1)/(p v)) layers' worth. Without pipelining, one.
The first stage is therefore the activation peak; the last stage adds the output layer and
the fp32 logits, and is the peak for large vocabularies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from memory_predictor import constants as C
from memory_predictor.activations import LayerActivations, layer_activations
from memory_predictor.spec import Hardware, Layout, ModelSpec, Options, TrainSpec


@dataclass(frozen=True, slots=True)
class StageMemory:
    """Predicted peak memory of one rank of one pipeline stage (bytes)."""

    stage: str  # first | middle | last | only
    pp_rank: int
    params: int  # transformer-layer parameters
    grads: int
    optimizer: int  # fp32 main params + Adam m and v (sharded with the distributed optimizer)
    embedding_output: int  # params + grads + optimizer of the embedding / output layer here
    activations: int  # kept for backward, all micro-batches in flight
    logits_loss: int  # last stage: fp32 softmax kept for backward + the 16-bit logits temporary
    working: int  # transient buffers of the layer being computed (SP gather, grads, wgrad)
    comm_buffers: int  # pipeline send/receive buffers
    step_temporary: int  # fp32 copy of 16-bit grads at the optimizer step (when the activations are gone)
    allocator_margin: int  # caching-allocator reserved - allocated
    cuda_context: int  # CUDA context on GPUs; the Python/torch runtime of a CPU (gloo) process
    nccl: int
    # description, not bytes
    param_count: int  # parameters on this rank (layers + embedding/output)
    layers: int  # transformer layers on this rank
    in_flight: int  # (chunk-)micro-batches whose activations are kept at the peak
    layers_per_chunk: int
    nccl_communicators: int

    BYTE_FIELDS = ("params", "grads", "optimizer", "embedding_output", "activations", "logits_loss",
                   "working", "comm_buffers", "step_temporary", "allocator_margin", "cuda_context", "nccl")

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated should show: the larger of the forward/backward
        peak and the optimizer-step peak, over the persistent model states."""
        states = self.params + self.grads + self.optimizer + self.embedding_output
        forward_backward = self.activations + self.logits_loss + self.working + self.comm_buffers
        return states + max(forward_backward, self.step_temporary)

    @property
    def reserved(self) -> int:
        """What torch.cuda.max_memory_reserved should show."""
        return self.allocated + self.allocator_margin

    @property
    def total(self) -> int:
        """Device memory in use: reserved + CUDA context + NCCL buffers."""
        return self.reserved + self.cuda_context + self.nccl

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(allocated=self.allocated, reserved=self.reserved, total=self.total)
        return out


@dataclass(frozen=True, slots=True)
class MemoryReport:
    first: StageMemory
    middle: StageMemory | None
    last: StageMemory
    peak: StageMemory
    memory_bytes: int
    usable_bytes: int
    layer: LayerActivations

    @property
    def peak_bytes(self) -> int:
        return self.peak.total

    @property
    def fits(self) -> bool:
        return self.usable_bytes <= 0 or self.peak.total <= self.usable_bytes

    @property
    def fraction(self) -> float:
        return self.peak.total / self.memory_bytes if self.memory_bytes else 0.0


@dataclass(frozen=True, slots=True)
class StateBytes:
    """Bytes per parameter of each model-state part on one rank."""

    param: float
    grad: float
    optimizer: float  # fp32 main params (16-bit params) + Adam m and v, kept all the time
    step_temporary: float  # fp32 main grads made from 16-bit grads at the optimizer step only


def state_bytes(layout: Layout, opts: Options) -> StateBytes:
    pb = opts.param_bytes
    gb = 4 if (opts.fp32_grad_accumulation or opts.precision == "fp32") else 2
    main_params = 4 if pb == 2 else 0
    main_grads = 4 if (gb == 2 and pb == 2) else 0
    shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    return StateBytes(param=pb, grad=gb, optimizer=(main_params + 8) / shards, step_temporary=main_grads / shards)


def layer_params(model: ModelSpec, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norm weights are replicated)."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    a, k = model.num_attention_heads, model.num_query_groups
    sharded = (a + 2 * k) * d * h + a * d * h + 3 * h * f
    if model.qkv_bias:
        sharded += (a + 2 * k) * d
    return sharded // tp + 2 * h


def stage_params(model: ModelSpec, layout: Layout, pp_rank: int) -> tuple[int, int]:
    """(transformer-layer params, embedding/output/final-norm params) on one rank of a stage."""
    p, t = layout.pp, layout.tp
    layers = model.num_layers // p * layer_params(model, t)
    table = model.padded_vocab * model.hidden_size // t
    extra = 0
    if pp_rank == 0:
        extra += table  # word embeddings
    if pp_rank == p - 1:
        extra += model.hidden_size  # final norm
        if not model.tie_embeddings or p > 1:
            extra += table  # output layer (a copy of the embeddings when tied across stages)
    return layers, extra


def in_flight(layout: Layout, micro_batches: int, pp_rank: int) -> int:
    """Chunk-micro-batches whose activations a pipeline rank holds at its peak."""
    p, v = layout.pp, layout.vpp
    if p == 1:
        return 1
    if v == 1:
        return min(p - pp_rank, micro_batches)
    return min(2 * (p - pp_rank - 1) + (v - 1) * p + 1, micro_batches * v)


def nccl_communicators(layout: Layout, pp_rank: int) -> int:
    """Communicators this rank uses in a step (NCCL creates them lazily, on first use)."""
    n = 1 if layout.world > 1 else 0  # default group: loss and metric all-reduces
    n += (layout.tp > 1) + (layout.cp > 1) + (layout.dp * layout.cp > 1)
    if layout.pp > 1:  # one 2-rank communicator per pipeline neighbour (PyTorch's p2p)
        n += 1 if pp_rank in (0, layout.pp - 1) else 2
    if layout.tp * layout.pp > 1 and layout.tp > 1 and layout.pp > 1:
        n += 1  # model-parallel group: gradient norm
    return n


def stage_memory(model: ModelSpec, train: TrainSpec, layout: Layout, opts: Options, pp_rank: int,
                 layer: LayerActivations | None = None, stage: str | None = None,
                 overheads: C.Overheads = C.OVERHEADS) -> StageMemory:
    """The breakdown of one rank of pipeline stage ``pp_rank``."""
    p, v = layout.pp, layout.vpp
    layer = layer or layer_activations(model, train.seq_length, train.micro_batch_size, layout, opts)
    sb = state_bytes(layout, opts)
    layer_p, extra_p = stage_params(model, layout, pp_rank)
    per_param = sb.param + sb.grad + sb.optimizer
    micro_batches = train.global_batch_size // (layout.dp * train.micro_batch_size)
    chunk_layers = model.num_layers // (p * v)
    held = in_flight(layout, micro_batches, pp_rank)
    activations = held * layer.kept(chunk_layers)

    e = opts.act_bytes
    sp = layout.tp if layout.sp else 1
    tokens = train.seq_length // layout.cp * train.micro_batch_size
    hidden_bytes = e * tokens * model.hidden_size / sp
    working = layer.working
    logits = 0
    if pp_rank == p - 1:
        activations += int(2 * hidden_bytes)  # final-norm input and output-layer input, one micro-batch
        vocab_local = model.padded_vocab / layout.tp
        logits = int(4 * tokens * vocab_local + (e * tokens * vocab_local if e < 4 else 0))
        if not opts.gradient_accumulation_fusion:
            working = max(working, int(opts.param_bytes * vocab_local * model.hidden_size))
    if pp_rank == 0 and layout.sp:
        working = max(working, int(e * tokens * model.hidden_size))  # embedding output before scatter
    comm = int(2 * hidden_bytes) if p > 1 else 0
    step_temporary = int((layer_p + extra_p) * sb.step_temporary)
    allocated = (int(layer_p * per_param) + int(extra_p * per_param)
                 + max(activations + logits + working + comm, step_temporary))
    comms = nccl_communicators(layout, pp_rank)
    return StageMemory(
        stage=stage or ("only" if p == 1 else "first" if pp_rank == 0 else "last" if pp_rank == p - 1 else "middle"),
        pp_rank=pp_rank,
        params=int(layer_p * sb.param), grads=int(layer_p * sb.grad), optimizer=int(layer_p * sb.optimizer),
        embedding_output=int(extra_p * per_param),
        activations=int(activations), logits_loss=logits, working=int(working), comm_buffers=comm,
        step_temporary=step_temporary,
        allocator_margin=int(allocated * overheads.allocator_margin_fraction),
        cuda_context=overheads.cuda_context_bytes, nccl=comms * overheads.nccl_bytes_per_communicator,
        param_count=layer_p + extra_p, layers=model.num_layers // p, in_flight=held,
        layers_per_chunk=chunk_layers, nccl_communicators=comms,
    )


def on_host(stage: StageMemory, overheads: C.Overheads = C.OVERHEADS) -> StageMemory:
    """A CPU (gloo) process: no CUDA context, NCCL or caching allocator; the runtime's base instead."""
    return replace(stage, cuda_context=overheads.host_process_bytes, nccl=0, allocator_margin=0)


def predict_memory(model: ModelSpec, train: TrainSpec, layout: Layout, opts: Options, hw: Hardware,
                   overheads: C.Overheads = C.OVERHEADS) -> MemoryReport:
    """Breakdowns of the first, a middle and the last stage, and the peak rank.

    Middle ranks hold fewer micro-batches than the first and no embedding, so the peak rank
    is always the first or the last stage.
    """
    layer = layer_activations(model, train.seq_length, train.micro_batch_size, layout, opts)
    p = layout.pp
    first = stage_memory(model, train, layout, opts, 0, layer, overheads=overheads)
    last = first if p == 1 else stage_memory(model, train, layout, opts, p - 1, layer, overheads=overheads)
    middle = stage_memory(model, train, layout, opts, p // 2, layer, overheads=overheads) if p > 2 else None
    if hw.gpu == "cpu":
        first, last = on_host(first, overheads), on_host(last, overheads)
        middle = on_host(middle, overheads) if middle is not None else None
    peak = max((first, last), key=lambda s: s.total)
    memory = hw.memory_bytes if hw.check_memory else 0
    usable = int(math.floor(memory * opts.usable_fraction)) if memory else 0
    return MemoryReport(first=first, middle=middle, last=last, peak=peak, memory_bytes=memory,
                        usable_bytes=usable, layer=layer)
