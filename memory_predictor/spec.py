"""The predictor's inputs: small frozen dataclasses, checked once where they are built.

``ModelSpec`` (architecture), ``TrainSpec`` (sequence and batch), ``Layout`` (the 4D split and
its per-layout options), ``Options`` (numerics and kernels that do not change with the layout)
and ``Hardware`` (device and cluster shape). Expert parallelism is not modelled yet:
``Layout.ep`` exists so that adding MoE does not change any signature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from configs.hardware import GPU_TYPES
from memory_predictor import constants as C
from memory_predictor.errors import Problem, raise_if

RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp16", "fp32")
GPU_NAMES = tuple(n for n in GPU_TYPES if n != "cpu")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A Llama-style decoder: RMSNorm, SwiGLU (3 FFN matrices), RoPE, GQA; QKV biases (Qwen2) optional."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # KV heads
    vocab_size: int
    make_vocab_size_divisible_by: int = 128
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2/2.5: biases on Q, K, V (parameters only: elementwise adds are not GEMM FLOPs)
    kv_channels: int | None = None  # head size; hidden/heads when None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab(self) -> int:
        """As the trainer pads it (configs.derived.padded_vocab_size): next multiple of the divisor."""
        d = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / d) * d)

    def problems(self, prefix: str = "model") -> list[Problem]:
        out = [Problem(f"{prefix}.{name}", value, "must be a positive integer")
               for name, value in (("num_layers", self.num_layers), ("hidden_size", self.hidden_size),
                                   ("ffn_hidden_size", self.ffn_hidden_size),
                                   ("num_attention_heads", self.num_attention_heads),
                                   ("num_query_groups", self.num_query_groups), ("vocab_size", self.vocab_size),
                                   ("make_vocab_size_divisible_by", self.make_vocab_size_divisible_by))
               if not isinstance(value, int) or isinstance(value, bool) or value <= 0]
        if out:
            return out
        if self.num_attention_heads % self.num_query_groups:
            out.append(Problem(f"{prefix}.num_query_groups", self.num_query_groups,
                               f"must divide num_attention_heads={self.num_attention_heads}"))
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            out.append(Problem(f"{prefix}.hidden_size", self.hidden_size,
                               f"must be divisible by num_attention_heads={self.num_attention_heads} "
                               "(or give head_dim)"))
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainSpec:
    seq_length: int
    micro_batch_size: int
    global_batch_size: int

    def problems(self) -> list[Problem]:
        return [Problem(f"training.{name}", value, "must be a positive integer")
                for name, value in (("seq_length", self.seq_length), ("micro_batch_size", self.micro_batch_size),
                                    ("global_batch_size", self.global_batch_size)) if value <= 0]


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """One rank's place in the 4D grid and the per-layout choices the search varies."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline chunks per rank; 1 = plain 1F1B
    cp: int = 1
    dp: int = 1
    ep: int = 1  # expert parallelism: reserved (dense models only for now)
    sequence_parallel: bool = True  # only meaningful when tp > 1
    recompute: str = "none"  # none | selective | full
    recompute_num_layers: int = 1  # full recompute, uniform method: layers per checkpoint
    distributed_optimizer: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp * self.ep

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def short(self) -> str:
        vpp = f" vpp={self.vpp}" if self.vpp > 1 else ""
        return (f"tp={self.tp} pp={self.pp}{vpp} cp={self.cp} dp={self.dp} sp={str(self.sp).lower()} "
                f"recompute={self.recompute} dist_opt={str(self.distributed_optimizer).lower()}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """Numerics and kernels. Defaults are this project's trainer on GPUs with Transformer Engine
    (memory_predictor.kernels.choose_kernels, which trainer/model.py builds with)."""

    precision: str = "bf16"  # bf16 | fp16 | fp32 (params and activations)
    fp32_grad_accumulation: bool = True  # DDP grad_reduce_in_fp32 (main grads in fp32)
    flash_attention: bool = True  # TE fused attention on GPUs; False = megatron's unfused softmax path
    fused_norm: bool = True  # TE's fused RMSNorm on GPUs; False = torch RMSNorm (CPU trainer)
    fused_swiglu: bool = True  # bias_activation_fusion (saves 6 s'bf per layer, not 10)
    gradient_accumulation_fusion: bool = True  # wgrad straight into main_grad (no bf16 temporary)
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    tp_comm_overlap: bool = False
    usable_fraction: float = C.DEFAULT_USABLE_FRACTION

    @classmethod
    def cpu_trainer(cls, **kw: object) -> "Options":
        """The kernels of this project's trainer on CPU (gloo): all eager, no Transformer Engine."""
        return cls(flash_attention=False, fused_norm=False, fused_swiglu=False, tp_comm_overlap=False,
                   gradient_accumulation_fusion=False, **kw)  # type: ignore[arg-type]

    @classmethod
    def from_kernels(cls, kernels: Mapping[str, Any], *, precision: str = "bf16", overlap_grad_reduce: bool = True,
                     overlap_param_gather: bool = True, tp_comm_overlap: bool = False,
                     usable_fraction: float = C.DEFAULT_USABLE_FRACTION) -> "Options":
        """The options of a run built with these kernels (``memory_predictor.kernels.Kernels.as_dict()``,
        also what a run directory's ``kernels.json`` holds)."""
        te = bool(kernels.get("transformer_engine"))
        return cls(precision=precision, overlap_grad_reduce=overlap_grad_reduce,
                   overlap_param_gather=overlap_param_gather, usable_fraction=usable_fraction,
                   tp_comm_overlap=tp_comm_overlap and te, flash_attention=bool(kernels.get("flash_attention")),
                   fused_norm=te, fused_swiglu=bool(kernels.get("fused_swiglu")),
                   gradient_accumulation_fusion=bool(kernels.get("gradient_accumulation_fusion")))

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def param_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Hardware:
    """The device (memory, peak, bandwidths) and the cluster shape."""

    gpu: str  # a cluster.gpus name, "cpu", or "custom" (memory given in GiB)
    memory_bytes: int
    peak_tflops: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float
    network_bytes_per_s_per_node: float
    nodes: int = 1
    gpus_per_node: int = 8
    note: str = ""
    check_memory: bool = True  # False for CPU processes: host RAM is not what we model

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def hardware(gpu: str | None = None, *, memory_gib: float | None = None, nodes: int = 1, gpus_per_node: int = 8,
             peak_tflops: float | None = None) -> Hardware:
    """A Hardware for a catalogue GPU, the CPU profile, or any GPU given by its memory in GiB.

    ``memory_gib`` alone assumes H100 bandwidths and peak (say so where it is shown).
    """
    problems: list[Problem] = []
    if gpu is not None and gpu not in GPU_TYPES:
        problems.append(Problem("gpu", gpu, f"unknown GPU type; use one of: {', '.join(GPU_NAMES)} "
                                "(or --gpu-memory-gib N)"))
    if memory_gib is not None and not memory_gib > 0:
        problems.append(Problem("gpu_memory_gib", memory_gib, "must be a positive number of GiB"))
    if nodes <= 0:
        problems.append(Problem("nodes", nodes, "must be a positive integer"))
    if gpus_per_node <= 0:
        problems.append(Problem("gpus_per_node", gpus_per_node, "must be a positive integer"))
    if peak_tflops is not None and not peak_tflops > 0:
        problems.append(Problem("peak_tflops", peak_tflops, "must be > 0"))
    raise_if(problems)
    if gpu == "cpu":
        hbm, nvlink, net, note = C.CPU_BANDWIDTHS
        memory = int(memory_gib * C.GIB) if memory_gib else 0
        return Hardware(gpu="cpu", memory_bytes=memory, peak_tflops=peak_tflops or C.CPU_NOMINAL_TFLOPS,
                        hbm_bytes_per_s=hbm, nvlink_bytes_per_s=nvlink, network_bytes_per_s_per_node=net,
                        nodes=nodes, gpus_per_node=gpus_per_node, note=note, check_memory=memory > 0)
    name = gpu or "h100-80gb"
    hbm, nvlink, net, note = C.DEVICE_BANDWIDTHS[name]
    catalogue = GPU_TYPES[name]
    memory = int(memory_gib * C.GIB) if memory_gib is not None else catalogue.memory_bytes
    if gpu is None:
        name, note = "custom", f"{memory_gib:g} GiB; H100 peak and bandwidths assumed"
    return Hardware(gpu=name, memory_bytes=memory, peak_tflops=peak_tflops or float(catalogue.peak_bf16_tflops or 0),
                    hbm_bytes_per_s=hbm, nvlink_bytes_per_s=nvlink, network_bytes_per_s_per_node=net,
                    nodes=nodes, gpus_per_node=gpus_per_node, note=note)


@dataclass(frozen=True, slots=True)
class Problems:
    """Helper for collecting problems while checking a layout against a model and cluster."""

    items: list[Problem] = field(default_factory=list)

    def add(self, name: str, value: object, fix: str) -> None:
        self.items.append(Problem(name, value, fix))


def layout_problems(model: ModelSpec, train: TrainSpec, layout: Layout, hw: Hardware,
                    *, cpu_trainer: bool = False) -> list[Problem]:
    """Why this layout cannot run this model on this cluster (empty when it can).

    The rules are the trainer's and megatron-core 0.16's (where each is enforced in brackets):

    * TP inside a node, dividing the heads [TransformerConfig], a multiple or divisor of the KV
      heads [TransformerConfig], dividing the FFN size and the padded vocabulary [the parallel
      linear layers' ``divide``]; with sequence parallelism, dividing each rank's s / CP tokens
      [``_split_along_first_dim`` in tensor_parallel/mappings.py];
    * PP x VPP dividing the layers [TransformerBlock]; full recompute with 1 <= layers per
      checkpoint <= layers per pipeline rank [TransformerConfig];
    * CP splitting the sequence in 2 x CP load-balanced chunks;
    * the world = TP x PP x CP x DP; micro-batches dividing the per-rank batch; for the
      interleaved schedule the number of micro-batches a multiple of PP
      [pipeline_parallel/schedules.py: with ``microbatch_group_size_per_vp_stage`` = PP, its
      default, M must be >= PP and M mod PP must be 0 or >= PP, i.e. 0].
    """
    p = Problems()
    m, t = model, train
    for name, value in (("tp", layout.tp), ("pp", layout.pp), ("vpp", layout.vpp), ("cp", layout.cp),
                        ("dp", layout.dp), ("recompute_num_layers", layout.recompute_num_layers)):
        if value <= 0:
            p.add(name, value, "must be a positive integer")
    if layout.recompute not in RECOMPUTE:
        p.add("recompute", layout.recompute, f"choose one of: {', '.join(RECOMPUTE)}")
    if p.items:
        return p.items
    if layout.ep != 1:
        p.add("ep", layout.ep, "expert parallelism is not modelled yet (dense models only); use 1")
    if m.num_attention_heads % layout.tp:
        p.add("tp", layout.tp, f"must divide num_attention_heads={m.num_attention_heads}; "
              f"use one of {_divisors(m.num_attention_heads, hw.gpus_per_node)}")
    if m.num_query_groups % layout.tp and layout.tp % m.num_query_groups:
        p.add("tp", layout.tp, f"num_query_groups={m.num_query_groups} (KV heads) must be a multiple or divisor of tp")
    if m.padded_vocab % layout.tp:
        p.add("tp", layout.tp, f"must divide the padded vocabulary {m.padded_vocab}")
    if m.ffn_hidden_size % layout.tp:
        p.add("tp", layout.tp, f"must divide ffn_hidden_size={m.ffn_hidden_size} (megatron splits the MLP over TP)")
    if layout.sp and (t.seq_length // layout.cp) % layout.tp:
        p.add("tp", layout.tp, f"sequence parallelism splits each rank's seq_length / cp = {t.seq_length // layout.cp} "
              f"tokens over tp: use a seq_length that is a multiple of cp x tp = {layout.cp * layout.tp}")
    if layout.tp > hw.gpus_per_node:
        p.add("tp", layout.tp, f"tensor parallelism stays inside a node (gpus_per_node={hw.gpus_per_node})")
    if layout.vpp > 1 and layout.pp == 1:
        p.add("vpp", layout.vpp, "the interleaved schedule needs pp > 1; use vpp=1")
    if m.num_layers % (layout.pp * layout.vpp):
        p.add("pp", layout.pp, f"pp x vpp = {layout.pp * layout.vpp} must divide num_layers={m.num_layers}")
    elif layout.recompute == "full" and layout.recompute_num_layers > m.num_layers // layout.pp:
        p.add("recompute_num_layers", layout.recompute_num_layers,
              f"must be between 1 and the layers per pipeline rank ({m.num_layers // layout.pp})")
    if layout.cp > 1 and t.seq_length % (2 * layout.cp):
        p.add("cp", layout.cp, f"seq_length={t.seq_length} must be divisible by 2 x cp = {2 * layout.cp}")
    if cpu_trainer and layout.cp > 1:
        p.add("cp", layout.cp, "context parallelism needs Transformer Engine on GPUs; on CPU use cp=1")
    if layout.world != hw.world:
        p.add("dp", layout.dp, f"tp x pp x cp x dp = {layout.world} must equal nodes x gpus_per_node = {hw.world}")
    per_rank = layout.dp * t.micro_batch_size
    if t.global_batch_size % per_rank:
        p.add("gbs", t.global_batch_size, f"must be divisible by mbs x dp = {t.micro_batch_size} x {layout.dp}")
    elif not interleaving_accepts(t.global_batch_size // per_rank, layout.pp, layout.vpp):
        p.add("gbs", t.global_batch_size, f"gives {t.global_batch_size // per_rank} micro-batches per step; megatron's "
              f"interleaved schedule (vpp={layout.vpp}) needs a multiple of pp={layout.pp}: use a gbs that is a "
              f"multiple of mbs x dp x pp = {per_rank * layout.pp}")
    return p.items


def interleaving_accepts(micro_batches: int, pp: int, vpp: int) -> bool:
    """megatron-core's interleaved schedule runs micro-batches in groups of PP (its default
    ``microbatch_group_size_per_vp_stage``) and refuses a partial group: M % PP == 0."""
    return vpp == 1 or micro_batches % pp == 0


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, max(cap, 1) + 1) if n % d == 0]
