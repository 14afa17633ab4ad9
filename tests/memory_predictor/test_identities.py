"""Identities the memory model must satisfy (published tables, scaling laws), table-driven."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memory_predictor.activations import layer_activations, layer_items
from memory_predictor.memory import in_flight, layer_params, predict_memory, stage_memory, stage_params, state_bytes
from memory_predictor.models import load_model
from memory_predictor.spec import Layout, Options, TrainSpec, hardware

L8, L70, L405 = (load_model(n) for n in ("llama3.1_8b", "llama3.3_70b", "llama3.1_405b"))
GPU = Options()  # GPU kernels: TE fused norm, flash attention
H100 = hardware("h100-80gb", nodes=128)


# ---------------------------------------------------------------- model states


@pytest.mark.parametrize("precision,fp32_grads,plain,dist_fixed,dist_sharded", [
    ("bf16", True, 18, 6, 12),   # Megatron: bf16 params + fp32 grads -> 18 | 6 + 12/d
    ("fp16", False, 20, 4, 16),  # fp16 params + fp16 grads -> 20 | 4 + 16/d
    ("fp32", True, 16, 8, 8),    # fp32 -> 16 | 8 + 8/d
])
@pytest.mark.parametrize("dp,cp", [(1, 1), (2, 1), (8, 1), (4, 2), (64, 4)])
def test_bytes_per_parameter_table(precision, fp32_grads, plain, dist_fixed, dist_sharded, dp, cp) -> None:
    """Megatron's table counts every byte a rank ever holds, the fp32 main grads of 16-bit
    gradients included (they exist only during the optimizer step: ``step_temporary``)."""
    opts = Options(precision=precision, fp32_grad_accumulation=fp32_grads)
    sb = state_bytes(Layout(dp=dp, cp=cp, distributed_optimizer=False), opts)
    assert sb.param + sb.grad + sb.optimizer + sb.step_temporary == plain
    sb = state_bytes(Layout(dp=dp, cp=cp, distributed_optimizer=True), opts)
    # megatron-core shards the distributed optimizer over DP x CP
    assert sb.param + sb.grad + sb.optimizer + sb.step_temporary == pytest.approx(dist_fixed + dist_sharded / (dp * cp))


def test_fp32_main_grads_of_bf16_grads_are_a_step_temporary() -> None:
    """megatron-core's ``_copy_model_grads_to_main_grads`` makes ``shard_model_grad.float()`` at the
    step, when the activations are gone: NVIDIA's NeMo log of Llama 3.1 8B (8 H100, DP x CP = 8,
    bf16 gradient reduction) shows 44.27e9 bytes at step end = 5.51 bytes/parameter = 4 + 12/8."""
    opts = Options(fp32_grad_accumulation=False)
    layout = Layout(cp=2, dp=4)
    sb = state_bytes(layout, opts)
    assert sb.param + sb.grad + sb.optimizer == pytest.approx(4 + 12 / 8) and sb.step_temporary == 4 / 8
    train = TrainSpec(seq_length=8192, micro_batch_size=1, global_batch_size=128)
    states_at_step_end = sum(stage_params(L8, layout, 0)) * (sb.param + sb.grad + sb.optimizer)
    assert states_at_step_end == pytest.approx(44_271_689_728, rel=0.01)
    peak = stage_memory(L8, train, layout, opts, 0)
    held = peak.activations + peak.logits_loss + peak.working + peak.comm_buffers
    assert held > peak.step_temporary  # the activation peak is the peak
    assert peak.allocated == peak.params + peak.grads + peak.optimizer + peak.embedding_output + held
    tiny = stage_memory(L8, replace(train, seq_length=64), Layout(dp=1, distributed_optimizer=False), opts, 0)
    assert tiny.allocated == (tiny.params + tiny.grads + tiny.optimizer + tiny.embedding_output + tiny.step_temporary)


@pytest.mark.parametrize("model,total", [(L8, 8_030_261_248), (L70, 70_553_706_496), (L405, 405_853_388_800)])
def test_parameter_counts_match_published_totals(model, total) -> None:
    """Summed over pipeline stages and TP ranks (norms replicated), the model's size on the Hub."""
    for tp, pp in ((1, 1), (8, 1), (4, 2), (8, 8) if model.num_layers % 8 == 0 else (2, 2)):
        layout = Layout(tp=tp, pp=pp)
        counted = 0
        for rank in range(pp):
            layers, extra = stage_params(model, layout, rank)
            norms = 2 * model.hidden_size * model.num_layers // pp + (model.hidden_size if rank == pp - 1 else 0)
            counted += (layers + extra - norms) * tp + norms
        assert counted == total


def test_distributed_equals_plain_when_dp_times_cp_is_one() -> None:
    train = TrainSpec(seq_length=8192, micro_batch_size=1, global_batch_size=64)
    for layout in (Layout(tp=8, pp=1, dp=1), Layout(tp=8, pp=4, vpp=5, dp=1)):
        on = predict_memory(L70, train, replace(layout, distributed_optimizer=True), GPU, H100)
        off = predict_memory(L70, train, replace(layout, distributed_optimizer=False), GPU, H100)
        assert on.first == off.first and on.last == off.last


@pytest.mark.parametrize("pp", [1, 4])
def test_dp_changes_only_the_optimizer_term(pp) -> None:
    """More data parallelism (same micro-batches per rank) shards the optimizer and nothing else."""
    base = None
    for dp in (1, 2, 8, 32):
        train = TrainSpec(seq_length=4096, micro_batch_size=1, global_batch_size=16 * dp)
        stage = stage_memory(L70, train, Layout(tp=8, pp=pp, dp=dp), GPU, 0)
        fields = {k: getattr(stage, k) for k in ("params", "grads", "activations", "logits_loss", "working",
                                                 "comm_buffers", "in_flight", "param_count")}
        base = base or fields
        assert fields == base
        _, embedding = stage_params(L70, Layout(tp=8, pp=pp), 0)
        assert stage.optimizer == pytest.approx(stage.params / 2 * 12 / dp, abs=16)  # layers' fp32 states / dp
        assert stage.embedding_output == pytest.approx(embedding * (2 + 4 + 12 / dp), abs=16)


# ---------------------------------------------------------------- activations


def _per_layer(model=L70, s=8192, b=1, opts=GPU, **layout) -> int:
    return layer_activations(model, s, b, Layout(**layout), opts).per_layer


@pytest.mark.parametrize("opts", [GPU, Options(fused_swiglu=True), Options(precision="fp32")])
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_activations_scale_with_micro_batch(opts, recompute) -> None:
    for b in (2, 4, 8):
        assert _per_layer(b=b, opts=opts, tp=8, recompute=recompute) == b * _per_layer(b=1, opts=opts, tp=8,
                                                                                        recompute=recompute)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_activations_scale_one_over_tp_with_sp(tp) -> None:
    assert _per_layer(tp=tp) * tp == _per_layer(tp=1)
    assert _per_layer(tp=tp, recompute="selective") * tp == _per_layer(tp=1, recompute="selective")


def test_tp_without_sp_keeps_the_replicated_terms() -> None:
    """Korthikanti et al.: without SP the norm and GEMM-input terms (4 x e s b h here) do not shrink."""
    e, s, h = 2, 8192, L70.hidden_size
    full, sharded = _per_layer(tp=1), _per_layer(tp=8, sequence_parallel=False)
    replicated = 2 * e * s * h + 2 * e * s * h + 2 * 4 * s  # norm inputs, GEMM inputs, norm statistics
    assert sharded == pytest.approx(replicated + (full - replicated) / 8, abs=8)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_activations_scale_s_over_cp(cp) -> None:
    assert _per_layer(cp=cp) * cp == _per_layer(cp=1)
    assert _per_layer(cp=cp) == _per_layer(s=8192 // cp)


def test_llama_closed_form_and_its_two_additions() -> None:
    """The reference's Llama accounting s'bh(12 + 4k/a) + 6 s'bf (fused SwiGLU), plus what we add.

    Additions: the QKV projection output kept alive by V (a view of it): e s'b d (a + k)/t
    (measured under selective recompute, where megatron checkpoints q, k, v), the flash
    attention LSE (4 s'b a/t) and the RMSNorm statistics (2 x 4 s'b / sp).
    """
    for tp, b in ((1, 1), (8, 1), (4, 2)):
        s, h, f, a, k, d = 8192, L70.hidden_size, L70.ffn_hidden_size, 64, 8, 128
        sbh, sbf = s * b * h / tp, s * b * f / tp
        closed = sbh * (12 + 4 * k / a) + 6 * sbf
        additions = 2 * s * b * d * (a + k) / tp + 4 * s * b * a / tp + 2 * 4 * s * b / tp
        assert _per_layer(b=b, tp=tp, opts=Options(fused_swiglu=True)) == pytest.approx(closed + additions, abs=16)
        # megatron's unfused SwiGLU (the trainer's setting without Transformer Engine) keeps 10 s'bf instead of 6
        assert _per_layer(b=b, tp=tp, opts=Options(fused_swiglu=False)) - _per_layer(
            b=b, tp=tp, opts=Options(fused_swiglu=True)) == pytest.approx(4 * sbf, abs=16)


def test_selective_recompute_drops_the_s_squared_term() -> None:
    unfused = Options(flash_attention=False)
    s, b, a = 4096, 1, 64
    items = layer_items(L70, s, b, Layout(tp=8), unfused)
    assert items["core_attention"] == (4 + 2) * b * (a // 8) * s * s + s * s  # fp32 softmax, bf16 copy, mask
    assert layer_items(L70, s, b, Layout(tp=8, recompute="selective"), unfused)["core_attention"] == 0


def test_full_recompute_keeps_one_input_per_checkpoint() -> None:
    """Reference table: full recompute keeps 2 s b h per layer (bf16), / t with SP."""
    s, b, h = 8192, 1, L70.hidden_size
    for tp, n, layers in ((1, 1, 20), (8, 1, 20), (8, 2, 20), (8, 3, 20)):
        act = layer_activations(L70, s, b, Layout(tp=tp, recompute="full", recompute_num_layers=n), GPU)
        assert act.kept(layers) == -(-layers // n) * 2 * s * b * h // tp


# ---------------------------------------------------------------- pipeline schedule


@pytest.mark.parametrize("p,v", [(2, 2), (4, 5), (8, 5), (4, 10), (16, 5)])
def test_interleaving_factor(p, v) -> None:
    """First stage, m >= p: 1F1B holds L layers' worth; interleaved L (1 + (p-1)/(p v))."""
    L = L70.num_layers
    one_f_one_b = in_flight(Layout(pp=p), 64, 0) * (L // p)
    interleaved = in_flight(Layout(pp=p, vpp=v), 64, 0) * (L // (p * v))
    assert one_f_one_b == L
    assert interleaved == pytest.approx(L * (1 + (p - 1) / (p * v)))


def test_in_flight_by_rank_and_few_micro_batches() -> None:
    assert [in_flight(Layout(pp=4), 64, r) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight(Layout(pp=4), 2, r) for r in range(4)] == [2, 2, 2, 1]  # min(p - r, m)
    assert in_flight(Layout(pp=1), 64, 0) == 1


def test_first_stage_activation_independent_of_pp_for_1f1b() -> None:
    train = TrainSpec(seq_length=8192, micro_batch_size=1, global_batch_size=256)
    acts = {p: stage_memory(L70, train, Layout(tp=8, pp=p, dp=1), GPU, 0).activations for p in (2, 4, 8, 16)}
    assert len(set(acts.values())) == 1


def test_last_stage_holds_logits_in_fp32() -> None:
    train = TrainSpec(seq_length=8192, micro_batch_size=1, global_batch_size=64)
    last = stage_memory(L70, train, Layout(tp=8, pp=4, dp=1), GPU, 3)
    vocab = L70.padded_vocab // 8
    assert last.logits_loss == 4 * 8192 * vocab + 2 * 8192 * vocab  # fp32 softmax kept + bf16 logits temporary
    assert stage_memory(L70, train, Layout(tp=8, pp=4, dp=1), GPU, 1).logits_loss == 0


def test_layer_params_per_tp_rank() -> None:
    h, f = L70.hidden_size, L70.ffn_hidden_size
    assert layer_params(L70, 8) == ((64 + 16) * 128 * h + 64 * 128 * h + 3 * h * f) // 8 + 2 * h
