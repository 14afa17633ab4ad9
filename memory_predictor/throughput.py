"""Step time of one layout: compute, pipeline bubble, exposed communication, optimizer.

    step = m * T_max + (p - 1) * T_avg / v     pipeline (1F1B or interleaved), T = one micro-batch
                                               through one stage: compute + exposed TP and CP comm
         + 2 (m v + p - 1) t_p2p               pipeline sends (forward activations, backward grads)
         + exposed DP                          grad reduce-scatter / all-reduce and param all-gather
                                               beyond what hides under the last (first) micro-batch
         + optimizer                           Adam over the local shard, HBM-bound

Compute time uses the FLOPs the GPUs execute: the one formula (memory_predictor/flops.py,
Megatron's ``num_floating_point_operations``) plus recomputation, with causal attention
scores halved (flash attention skips the masked half). Reported TFLOP/s and MFU use the
trainer's *model* FLOPs, so a prediction and a training log are directly comparable.

Placement follows megatron-core's rank order (TP fastest, then CP, DP, PP): a group whose
ranks fit in one node talks over NVLink; otherwise over the network, where the node's
adapters are shared by the ``gpus_per_node / ranks_of_the_group_in_a_node`` groups that
cross nodes at the same time. Every constant is in memory_predictor/constants.py; the
efficiencies (``constants.Efficiency``) are fitted to published measurements by
benchmarks/predictor_calibration.py, and ``eff=`` takes another set (the fit uses it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memory_predictor import constants as C
from memory_predictor.memory import stage_params, state_bytes
from memory_predictor.spec import Hardware, Layout, ModelSpec, Options, TrainSpec
from memory_predictor.flops import FlopsShape, hardware_flops_per_step, model_flops_per_step


@dataclass(frozen=True, slots=True)
class StepTime:
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float  # model FLOPs (as the trainer logs them)
    mfu: float | None  # fraction of peak; None without a peak
    compute_s: float  # pure compute of all micro-batches on the slowest stage
    bubble_s: float
    tp_comm_s: float  # exposed
    cp_comm_s: float  # exposed
    pp_comm_s: float
    dp_comm_s: float  # exposed
    optimizer_s: float
    micro_batches: int
    compute_efficiency: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def flops_shape(model: ModelSpec, seq_length: int) -> FlopsShape:
    return FlopsShape(num_layers=model.num_layers, hidden_size=model.hidden_size,
                      ffn_hidden_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
                      num_query_groups=model.num_query_groups, padded_vocab_size=model.padded_vocab,
                      seq_length=seq_length, kv_channels=model.kv_channels)


def group_bandwidth(hw: Hardware, stride: int, size: int,
                    eff: C.Efficiency = C.EFFICIENCY) -> tuple[float, float]:
    """(bus bandwidth bytes/s, latency s) of a group of ``size`` ranks ``stride`` apart."""
    per_node = max(1, hw.gpus_per_node // stride) if stride < hw.gpus_per_node else 1
    if size <= per_node and stride * size <= hw.gpus_per_node:
        return hw.nvlink_bytes_per_s * eff.nvlink, eff.nvlink_latency_s
    share = min(per_node, size) / hw.gpus_per_node  # this group's share of the node's adapters
    network = hw.network_bytes_per_s_per_node * eff.network * share
    return min(network, hw.nvlink_bytes_per_s), eff.network_latency_s


def compute_efficiency(model: ModelSpec, train: TrainSpec, layout: Layout, hw: Hardware,
                       eff: C.Efficiency = C.EFFICIENCY) -> float:
    """Achievable fraction of peak, lower for small per-rank GEMMs: eff.compute x g / (g + half).

    Both constants are fitted to published runs (constants.EFFICIENCY), so the half point also
    carries the per-token work that does not shrink with the model (memory-bound kernels,
    launches): small models come out slower than their GEMMs alone would make them.
    """
    if hw.gpu == "cpu" and "cpu" not in eff.compute:
        return 1.0  # the CPU profile's nominal peak is already an achieved rate (until a calibration fits one)
    gemm = 2.0 * train.micro_batch_size * train.seq_length / layout.cp * model.hidden_size * model.ffn_hidden_size / layout.tp
    return eff.compute_for(hw.gpu) * gemm / (gemm + eff.half_for(hw.gpu))


def predict_step(model: ModelSpec, train: TrainSpec, layout: Layout, opts: Options, hw: Hardware,
                 eff: C.Efficiency = C.EFFICIENCY) -> StepTime:
    t, p, v, c, d = layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp
    s, b, B = train.seq_length, train.micro_batch_size, train.global_batch_size
    m = B // (d * b)
    world = layout.world
    shape = flops_shape(model, s)
    e = opts.act_bytes

    # ---- compute per micro-batch per stage (executed FLOPs, causal attention halved)
    logits_seq = 6.0 * s * model.hidden_size * model.padded_vocab
    scores_seq = 12.0 * model.num_layers * s * s * model.num_attention_heads * model.head_dim
    recompute_scores = {"none": 0.0, "selective": 1 / 3, "full": 1 / 3}[layout.recompute]
    layers_seq = hardware_flops_per_step(shape, 1, layout.recompute) - logits_seq
    executed_layers_seq = layers_seq - scores_seq * (1 + recompute_scores) / 2
    efficiency = compute_efficiency(model, train, layout, hw, eff)
    rate = hw.peak_tflops * 1e12 * efficiency
    per_stage = b * executed_layers_seq / (p * t * c) / rate
    logits_time = b * logits_seq / (t * c) / rate
    layers_stage = model.num_layers // p

    # ---- tensor parallel: exposed collectives per layer per micro-batch
    tp_mb = 0.0
    if t > 1:
        bw, lat = group_bandwidth(hw, 1, t, eff)
        volume = e * b * s / c * model.hidden_size  # gathered activation
        per_collective = lat + (t - 1) / t * volume / bw
        exposed = (C.TP_COLLECTIVES_PER_LAYER * eff.tp_overlap_exposed if opts.tp_comm_overlap
                   else C.TP_COLLECTIVES_EXPOSED)
        if layout.recompute == "full":
            exposed += 4 * (eff.tp_overlap_exposed if opts.tp_comm_overlap else 1.0)
        tp_mb = layers_stage * exposed * per_collective

    # ---- context parallel: ring exchange of K and V, hidden under attention compute
    cp_mb = 0.0
    if c > 1:
        bw, lat = group_bandwidth(hw, t, c, eff)
        kv_heads = max(model.num_query_groups / t, 1.0)
        kv = e * b * s / c * 2 * kv_heads * model.head_dim
        comm = 3 * (c - 1) * (lat + kv / bw)  # forward KV, backward KV + dKV
        attention = b * scores_seq / model.num_layers * (1 + recompute_scores) / 2 / (t * c) / rate
        cp_mb = layers_stage * max(0.0, comm - attention)

    t_first = per_stage + tp_mb + cp_mb
    t_last = t_first + logits_time
    t_max = max(t_first, t_last)
    t_avg = (t_first * (p - 1) + t_last) / p
    pipeline = m * t_max + (p - 1) * t_avg / v
    compute = m * (per_stage + logits_time)  # the last stage (it also computes the logits)
    bubble = (p - 1) * t_avg / v

    # ---- pipeline point-to-point
    pp_s = 0.0
    if p > 1:
        bw, lat = group_bandwidth(hw, t * c * d, p, eff)
        sp = t if layout.sp else 1
        msg = e * b * s / c * model.hidden_size / sp
        pp_s = 2 * (m * v + p - 1) * (lat + msg / bw)

    # ---- data parallel (over DP x CP): grads reduce, params gather, with overlap windows
    dp_s = 0.0
    g = d * c
    stage_param_counts = [sum(stage_params(model, layout, r)) for r in {0, p - 1}]
    params_rank = max(stage_param_counts)
    if g > 1:
        bw, lat = group_bandwidth(hw, t, g, eff)
        sb = state_bytes(layout, opts)
        grad_bytes = params_rank * sb.grad
        ring = (g - 1) / g
        if layout.distributed_optimizer:
            reduce_s = lat + ring * grad_bytes / bw
            gather_s = lat + ring * params_rank * sb.param / bw
        else:
            reduce_s, gather_s = lat + 2 * ring * grad_bytes / bw, 0.0
        bucket = min(1.0, max(C.DDP_BUCKET_PARAMS, 1_000_000 * g) / max(params_rank, 1))
        window = t_max * eff.dp_overlap
        if opts.overlap_grad_reduce:
            reduce_s = max(reduce_s * bucket, reduce_s - window * 2 / 3)
        if opts.overlap_param_gather and layout.distributed_optimizer:
            gather_s = max(gather_s * bucket, gather_s - window / 3)
        dp_s = reduce_s + gather_s

    # ---- optimizer: Adam over the local shard, memory-bound
    shard = params_rank / (g if layout.distributed_optimizer else 1)
    optimizer_s = shard * C.OPTIMIZER_BYTES_PER_PARAM / (hw.hbm_bytes_per_s * eff.hbm)

    step = pipeline + pp_s + dp_s + optimizer_s
    tokens_per_s = B * s / step
    model_tflops = model_flops_per_step(shape, B) / step / world / 1e12
    mfu = model_tflops / hw.peak_tflops if hw.peak_tflops and hw.gpu != "cpu" else None
    return StepTime(step_time_s=step, tokens_per_s=tokens_per_s, tflops_per_gpu=model_tflops, mfu=mfu,
                    compute_s=compute, bubble_s=bubble, tp_comm_s=m * tp_mb, cp_comm_s=m * cp_mb,
                    pp_comm_s=pp_s, dp_comm_s=dp_s, optimizer_s=optimizer_s, micro_batches=m,
                    compute_efficiency=efficiency)


__all__ = ["StepTime", "predict_step", "flops_shape", "group_bandwidth", "compute_efficiency"]
