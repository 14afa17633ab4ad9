"""Every number the predictor assumes, named, with where it comes from.

Bytes are bytes (``GIB = 2**30`` only converts for display). A constant marked *calibrated*
was fitted to a measurement named next to it; *assumed* means no measurement of ours backs
it yet (this build was made without a GPU) and docs/memory_predictor.md says how to refit it.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
GB = 10**9

# --------------------------------------------------------------------------- memory

#: Fraction of GPU memory a predicted peak may use and still be called "fits" (the safety rule).
#: The predicted peak already includes CUDA context, NCCL buffers and an allocator margin, so
#: this fraction only covers estimator error. Fujii et al. 2024 ("Accelerating Large Language
#: Model Training with 4D Parallelism and Memory Consumption Estimator", 454 runs on A100/H100)
#: found no OOM below 80% for an estimate *without* overheads; ours adds ~5% of explicit
#: overheads on an 80 GiB GPU, hence 0.85. Configurable: --usable-fraction,
#: parallelism.usable_memory_fraction. Assumed (not yet checked against our own GPU runs).
DEFAULT_USABLE_FRACTION = 0.85

#: CUDA context + cuBLAS/cuDNN handles, outside PyTorch's allocator. The reference notes
#: 0.3-0.5 GB with lazy module loading (CUDA >= 11.7); we take the upper end. Assumed.
CUDA_CONTEXT_BYTES = 512 * 1024**2

#: NCCL buffers per communicator that carries traffic, outside PyTorch's allocator. Public
#: A100 reports give 0.5-0.7 GB per communicator (shared/reference/memory-model.md); our P5
#: environment sets NCCL_BUFFSIZE=8 MiB (2x the default), so we take 0.5 GB. Assumed.
NCCL_BYTES_PER_COMMUNICATOR = 500 * 10**6

#: Reserved-minus-allocated gap of PyTorch's caching allocator, as a fraction of the
#: allocator-managed peak. "Several GB at scale" in public reports; 5% of ~60 GB is 3 GB.
#: Assumed; refit from max_memory_reserved / max_memory_allocated of real runs.
ALLOCATOR_MARGIN_FRACTION = 0.05

#: Host memory of one CPU (gloo) training process besides the model: Python, torch and
#: megatron-core. Calibrated: the tiny model (4 layers, h=64, ~0.1 M parameters) on this
#: project's CPU trainer peaked at 433-442 MB max RSS per rank (1 and 2 processes,
#: `python -m launcher config=tiny_local training.train_steps=10`, 2026-11-21).
CPU_PROCESS_BASE_BYTES = 435 * 10**6

# --------------------------------------------------------------------------- throughput

#: Fraction of the dense BF16 peak that a transformer layer's executed FLOPs reach (GEMMs,
#: flash attention, the memory-bound norm/RoPE/SwiGLU kernels and launch overheads together).
#: Calibrated on the one fully specified public BF16 H100 anchor: Llama 3 (Dubey et al. 2024,
#: "The Llama 3 Herd of Models", Table 4: 405B on 8192 H100, TP8 CP1 PP16 DP64, seq 8192,
#: 16M tokens per batch, 430 TFLOP/s = 43% MFU) -> 0.54. Checked against the Megatron-LM
#: README (GPT 2B-462B on H100 with all overlaps: "MFU increases from 41% to 47-48% with
#: model size"): within 0.8-1.4x, over-predicting small models. benchmarks/predictor_calibration.py.
COMPUTE_EFFICIENCY = 0.54

#: FLOPs of one per-rank GEMM at which the achieved efficiency is half of COMPUTE_EFFICIENCY
#: (small GEMMs under-fill the GPU). Public cuBLAS BF16 curves on H100 reach about half the
#: large-GEMM rate near M=N=K=1024 (2 GFLOP). Assumed.
GEMM_HALF_EFFICIENCY_FLOPS = 2.0e9

#: Tensor-parallel collectives per layer and micro-batch with sequence parallelism:
#: forward 2 all-gathers + 2 reduce-scatters; backward 2 all-gathers of output grads,
#: 2 reduce-scatters of input grads and 2 re-gathers of the saved (sharded) inputs.
TP_COLLECTIVES_PER_LAYER = 10
#: Of those, the two backward input re-gathers run asynchronously under the data-gradient
#: GEMM in megatron's linear layers, so 8 are exposed without --tp-comm-overlap.
TP_COLLECTIVES_EXPOSED = 8
#: With Transformer Engine userbuffers (parallelism.tp_comm_overlap) most TP traffic hides
#: under GEMMs; the fraction left exposed. Assumed (NVIDIA reports "most" hidden).
TP_OVERLAP_EXPOSED_FRACTION = 0.25

#: Fraction of the backward (grad reduce) or forward (param gather) window of the last/first
#: micro-batch that DP communication can hide under (SM and memory contention). Assumed.
DP_OVERLAP_EFFICIENCY = 0.8
#: megatron-core DDP bucket: max(40M, 1M x dp) parameters; the last bucket is never hidden.
DDP_BUCKET_PARAMS = 40_000_000

#: Per-call latency of a collective / point-to-point (seconds): NVLink inside a node and
#: EFA/InfiniBand between nodes (nccl-tests small-message latency, order of magnitude). Assumed.
NVLINK_LATENCY_S = 10e-6
NETWORK_LATENCY_S = 30e-6

#: Fraction of the network line rate NCCL collectives reach between nodes. Assumed; the
#: AWS EFA nccl-tests on P5 are the measurement to refit it from.
NETWORK_EFFICIENCY = 0.75

#: Optimizer step and gradient-norm: bytes read/written per parameter of the local shard
#: (fp32 grad 4, fp32 main param 4+4, Adam m and v 8+8, bf16 param write 2). HBM-bound.
OPTIMIZER_BYTES_PER_PARAM = 30
HBM_EFFICIENCY = 0.8

# --------------------------------------------------------------------------- time to train

#: Lost per Slurm job segment: start-up (container, NCCL init, data) + checkpoint load.
#: Assumed: minutes for a 70B run on FSx for Lustre.
RESTART_OVERHEAD_S = 600.0
#: Stall per checkpoint save with asynchronous distributed checkpoints (the copy to host
#: memory is synchronous). Assumed.
CHECKPOINT_STALL_S = 30.0


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
