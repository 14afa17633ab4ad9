"""Every number the predictor assumes, named, with where it comes from.

Bytes are bytes (``GIB = 2**30`` only converts for display). A constant marked *fitted* was
fitted to the published measurements in benchmarks/data/published_measurements.csv by
``python benchmarks/predictor_calibration.py --fit`` (rows and residuals: docs/memory_predictor.md,
"Calibration"); *assumed* means no measurement backs it yet; *calibrated* means one of our own
measurements does (named next to it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

GIB = 1024**3
GB = 10**9

# --------------------------------------------------------------------------- memory

#: Fraction of GPU memory a predicted peak may use and still be called "fits" (the safety rule).
#: The predicted peak already includes CUDA context, NCCL buffers and an allocator margin, so
#: this fraction only covers estimator error. Fitted 0.85 -> 0.94: the smallest value (rounded up
#: to 0.01) that accepts every published-running BF16 megatron layout of
#: benchmarks/data/published_measurements.csv the predictor can represent; the tightest is NVIDIA's
#: Llama 3.1 405B TP8 PP9 VP7 CP2 DP4 on 576 H100 (dgxc-benchmarking v25.03), predicted at 93.2% of
#: 80 GiB. No published megatron layout that ran out of memory was found, so nothing bounds it from
#: above; Fujii et al. 2024 (454 runs on A100/H100) saw no OOM below 80% for an estimate *without*
#: the overheads ours includes. Configurable: --usable-fraction, parallelism.usable_memory_fraction.
DEFAULT_USABLE_FRACTION = 0.94


@dataclass(frozen=True, slots=True, kw_only=True)
class Overheads:
    """Memory outside the model's tensors: what a GPU process needs besides what it allocates."""

    #: Reserved-minus-allocated gap of PyTorch's caching allocator, as a fraction of the
    #: allocator-managed peak.
    allocator_margin_fraction: float
    #: CUDA context + cuBLAS/cuDNN handles, outside PyTorch's allocator.
    cuda_context_bytes: int
    #: NCCL buffers per communicator that carries traffic, outside PyTorch's allocator.
    nccl_bytes_per_communicator: int
    #: Host memory of one CPU (gloo) training process besides the model (Python, torch,
    #: megatron-core): what a CPU run's max RSS shows on top of the model's bytes.
    host_process_bytes: int = 435 * 10**6


#: Allocator margin 5%: fitted (0.051, rounded) to the one published max_memory_reserved of a
#: megatron layout with the allocated bytes also published: NVIDIA's NeMo log of Llama 3.1 8B on
#: 8 H100 (TP1 CP2 DP4, dgxc-benchmarking v25.04): 65.97 GiB reserved; predicted allocated 62.8 GiB
#: (model states at step end: 41.13 GiB predicted, 41.23 GiB logged). One row: it also absorbs the
#: activation model's error for that layout.
#: CUDA context 512 MiB: 0.3-0.5 GB with lazy module loading (CUDA >= 11.7), the upper end.
#: Assumed: outside max_memory_reserved, so no published number in the table measures it.
#: NCCL 0.5 GB per communicator: public A100 reports give 0.5-0.7 GB per communicator
#: (shared/reference/memory-model.md); our P5 environment sets NCCL_BUFFSIZE=8 MiB. Assumed, for
#: the same reason.
OVERHEADS = Overheads(allocator_margin_fraction=0.05, cuda_context_bytes=512 * 1024**2,
                      nccl_bytes_per_communicator=500 * 10**6)

#: Host memory of one CPU (gloo) training process besides the model: Python, torch and
#: megatron-core (``Overheads.host_process_bytes``). Calibrated: the tiny model (4 layers, h=64,
#: ~0.1 M parameters) on this project's CPU trainer peaked at 433-442 MB max RSS per rank (1 and 2
#: processes, `python -m launcher config=tiny_local training.train_steps=10`, 2026-11-21).
CPU_PROCESS_BASE_BYTES = OVERHEADS.host_process_bytes

# --------------------------------------------------------------------------- throughput


#: Per-call latency of a collective / point-to-point (seconds): NVLink inside a node and
#: EFA/InfiniBand between nodes (nccl-tests small-message latency, order of magnitude). Assumed
#: (``Efficiency.nvlink_latency_s`` / ``network_latency_s``; a cluster calibration refits them).
NVLINK_LATENCY_S = 10e-6
NETWORK_LATENCY_S = 30e-6


@dataclass(frozen=True, slots=True, kw_only=True)
class Efficiency:
    """The achieved fractions of peak rates that the step-time model multiplies in."""

    #: Fraction of the dense BF16 peak that a transformer layer's GEMMs and attention reach
    #: when the GEMMs are large, by GPU family (``gpu_family``).
    compute: Mapping[str, float]
    #: FLOPs of one per-rank GEMM at which the achieved efficiency is half of ``compute``
    #: (small GEMMs under-fill the GPU).
    gemm_half_flops: float
    #: Fraction of the network line rate NCCL collectives reach between nodes.
    network: float
    #: Fraction of the backward (grad reduce) or forward (param gather) window of the last/first
    #: micro-batch that DP communication can hide under (SM and memory contention).
    dp_overlap: float
    #: With Transformer Engine userbuffers (tp_comm_overlap) the fraction of TP traffic left exposed.
    tp_overlap_exposed: float
    #: Fraction of the HBM bandwidth the optimizer step reaches.
    hbm: float = 0.8
    #: Families without an entry use this one's value.
    default_family: str = field(default="h100")
    #: ``gemm_half_flops`` of one family, where it differs (a cluster calibration fits its own;
    #: on CPU the half point is the per-operation overhead of eager torch).
    gemm_half_flops_family: Mapping[str, float] = field(default_factory=dict)
    #: Fraction of the NVLink bus bandwidth collectives reach inside a node (1: the nccl-tests class
    #: numbers of ``DEVICE_BANDWIDTHS`` already are achieved rates; a cluster calibration refits it,
    #: and for CPU processes over gloo it is the achieved rate of the loopback transport).
    nvlink: float = 1.0
    #: Per-call latency of a collective inside a node (NVLink; shared memory for CPU processes).
    nvlink_latency_s: float = NVLINK_LATENCY_S
    #: Per-call latency of a collective between nodes (EFA / InfiniBand).
    network_latency_s: float = NETWORK_LATENCY_S

    def compute_for(self, gpu: str) -> float:
        return self.compute.get(gpu_family(gpu), self.compute[self.default_family])

    def half_for(self, gpu: str) -> float:
        return self.gemm_half_flops_family.get(gpu_family(gpu), self.gemm_half_flops)


def gpu_family(gpu: str) -> str:
    """``h100-80gb`` -> ``h100``; a ``custom`` GPU is predicted with H100 numbers."""
    return gpu.split("-")[0] if gpu not in ("custom", "cpu") else ("h100" if gpu == "custom" else "cpu")


#: Fitted (``python benchmarks/predictor_calibration.py --fit``; least squares on log errors of
#: tokens/s per GPU, each source/model group weighing 1):
#:
#: * ``compute["h100"]`` 0.54 -> 0.68 and ``gemm_half_flops`` 2e9 -> 6.2e10: the 19 training rows of
#:   the primary set (BF16 Megatron-Core on H100: NVIDIA dgxc-benchmarking v25.04 Llama 3.1
#:   8B/70B/405B, Megatron-LM README GPT 1.7B/16B/70B/177B/462B). Held out: the dgxc v25.02/03
#:   rows (another 405B layout, an older container) and GPT 7.1B/32B/119B/314B. The large half
#:   point stands for every per-token cost that does not shrink with the model (memory-bound
#:   kernels, launch overheads): it makes small models slower, not only small GEMMs.
#: * ``compute["a100"]`` 0.54 -> 0.88: the Megatron-LM 2021 A100 table (GPT 1.7B-1T, fp16, full
#:   recompute; TP/PP split, micro batch and heads assumed there, so weakly supported).
#:
#: Still assumed (the table cannot separate them): ``network`` 0.75 (the only rows sensitive to
#: it, the Megatron-LM README's DP 48 runs, leave the micro batch and overlap settings out, and
#: fitting them drives it to its bound), ``dp_overlap`` 0.8, ``tp_overlap_exposed`` 0.25, ``hbm`` 0.8.
EFFICIENCY = Efficiency(compute={"h100": 0.68, "a100": 0.88}, gemm_half_flops=6.2e10, network=0.75,
                        dp_overlap=0.8, tp_overlap_exposed=0.25)

#: Tensor-parallel collectives per layer and micro-batch with sequence parallelism:
#: forward 2 all-gathers + 2 reduce-scatters; backward 2 all-gathers of output grads,
#: 2 reduce-scatters of input grads and 2 re-gathers of the saved (sharded) inputs.
TP_COLLECTIVES_PER_LAYER = 10
#: Of those, the two backward input re-gathers run asynchronously under the data-gradient
#: GEMM in megatron's linear layers, so 8 are exposed without --tp-comm-overlap.
TP_COLLECTIVES_EXPOSED = 8

#: megatron-core DDP bucket: max(40M, 1M x dp) parameters; the last bucket is never hidden.
DDP_BUCKET_PARAMS = 40_000_000

#: Optimizer step and gradient-norm: bytes read/written per parameter of the local shard
#: (fp32 grad 4, fp32 main param 4+4, Adam m and v 8+8, bf16 param write 2). HBM-bound.
OPTIMIZER_BYTES_PER_PARAM = 30

# --------------------------------------------------------------------------- time to train

#: Lost per Slurm job segment: start-up (container, NCCL init, data) + checkpoint load.
#: Assumed: minutes for a 70B run on FSx for Lustre.
RESTART_OVERHEAD_S = 600.0
#: Stall per checkpoint save with asynchronous distributed checkpoints (the copy to host
#: memory is synchronous). Assumed for a 70B run on P5; this project measured 0.13 s of
#: blocking for a 1.26 GB state on one CPU process (docs/benchmarks.md, 1.3x a memcpy).
CHECKPOINT_STALL_S = 30.0

# --------------------------------------------------------------------------- failures

#: Job interruptions of Llama 3 405B pre-training (Dubey et al. 2024, "The Llama 3 Herd of
#: Models", arXiv:2407.21783, section 3.3.4 "Reliability and Operational Challenges"): 466 job
#: interruptions during a 54-day snapshot of pre-training on 16,384 H100 GPUs; 47 planned
#: (maintenance, operator actions), 419 unexpected (78% confirmed or suspected hardware:
#: GPUs 30.1%, HBM3 17.2%, ...). The snapshot's GPU count is the cluster's full training scale
#: (Table 4: 16,384 GPUs for the later stages).
LLAMA3_INTERRUPTIONS = 466
LLAMA3_UNEXPECTED_INTERRUPTIONS = 419
LLAMA3_SNAPSHOT_DAYS = 54
LLAMA3_GPUS = 16384
#: Default failure rate of a plan: Llama 3's *unexpected* interruptions per GPU-hour,
#: 419 / (16384 x 54 x 24) = 1.97e-5 (one every ~3 h on 16K GPUs, every ~8 days on 256). The 47
#: planned ones are left out: they are scheduled, so they lose no work since the last checkpoint.
FAILURES_PER_GPU_HOUR = LLAMA3_UNEXPECTED_INTERRUPTIONS / (LLAMA3_GPUS * LLAMA3_SNAPSHOT_DAYS * 24.0)
#: Time to notice a failure, as this project's hang watchdog does (configs/resilience_config.py):
#: no progress for max(step_factor x the median step time, floor_s) = max(10 x step, 300 s). A
#: crashed rank ends the worker group sooner; a silent hang takes this long, so it is the bound.
DETECTION_STEP_FACTOR = 10.0
DETECTION_FLOOR_S = 300.0
#: The same two costs for this project's CPU (gloo) runs of the tiny model, measured: a restart's
#: "down 0.4 s + reload 5.1 s" (docs/resilience.md, the goodput ledger's restart line) and 0.13 s
#: of blocking per asynchronous save of a 1.26 GB state (docs/benchmarks.md; an upper bound for a
#: tiny model's state).
CPU_RESTART_S = 6.0
CPU_CHECKPOINT_STALL_S = 0.13


#: Bandwidths per GPU type (memory and peak FLOP/s come from cluster.gpus, the one catalogue).
#: HBM: vendor datasheets. NVLink bus bandwidth: nccl-tests all-gather / reduce-scatter on
#: 8-GPU NVSwitch nodes without NVLS (our P5 env sets NCCL_NVLS_ENABLE=0): ~360 GB/s on
#: H100/H200 (NVLink4, 450 GB/s per direction), ~230 GB/s on A100 (NVLink3, 300 GB/s per
#: direction). Network: EFA line rate of the AWS instance the GPU comes in (p5/p5e/p5en
#: 3200 Gbps, p4d/p4de 400 Gbps; shared/reference/hyperpod-slurm.md), in bytes/s per node.
#: name: (HBM bytes/s, NVLink busbw bytes/s per GPU, network bytes/s per node, instance)
DEVICE_BANDWIDTHS: dict[str, tuple[float, float, float, str]] = {
    "a100-40gb": (1.555e12, 230e9, 400e9 / 8, "p4d.24xlarge"),
    "a100-80gb": (2.039e12, 230e9, 400e9 / 8, "p4de.24xlarge"),
    "h100-80gb": (3.35e12, 360e9, 3200e9 / 8, "p5.48xlarge"),
    "h100-94gb": (3.9e12, 360e9, 3200e9 / 8, "H100 NVL (3200 Gbps assumed)"),
    "h200-141gb": (4.8e12, 360e9, 3200e9 / 8, "p5e/p5en.48xlarge"),
}

#: A CPU (gloo) "device" for local and test runs, so that the sweep can put a prediction next
#: to a measurement. Nominal achieved rate: calibrated on this project's 2-core test machine,
#: where the tiny model logged tflops_per_gpu=0.005 with one process (0.002 each with two: a
#: model this small is bound by per-operation overhead, which FLOPs cannot predict). Memory is
#: host RAM and is not checked; bandwidths are loopback/shared-memory orders of magnitude.
CPU_NOMINAL_TFLOPS = 0.005
CPU_BANDWIDTHS = (10e9, 5e9, 5e9, "CPU processes over gloo")
