"""megatron-core's layout rules in the predictor: what it refuses, the search never proposes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memory_predictor.models import load_model
from memory_predictor.search import enumerate_layouts, search
from memory_predictor.spec import Layout, Options, TrainSpec, hardware, interleaving_accepts, layout_problems

L8, L70, L405, TINY = (load_model(n) for n in ("llama3.1_8b", "llama3.3_70b", "llama3.1_405b", "tiny"))


def megatron_interleaving_refuses(m: int, pp: int) -> bool:
    """The two checks of megatron-core 0.16.1 pipeline_parallel/schedules.py (lines ~995-1015) in
    ``forward_backward_pipelining_with_interleaving``, with ``microbatch_group_size_per_vp_stage``
    at its default, the pipeline size (model_parallel_config.py)."""
    group = pp
    if group > m or group < pp:
        return True  # ValueError: "The number of contiguous micro-batches ... should range in [PP, M]"
    return 0 < m % group < pp  # RuntimeError: "The remainder of M ... should be 0, or larger than ..."


@pytest.mark.parametrize("pp", [2, 3, 4, 8, 9, 16])
def test_interleaving_rule_is_megatrons(pp: int) -> None:
    for m in range(1, 5 * pp + 2):
        assert interleaving_accepts(m, pp, vpp=2) == (not megatron_interleaving_refuses(m, pp)), (m, pp)
        assert interleaving_accepts(m, pp, vpp=1)  # 1F1B takes any number of micro-batches


@pytest.mark.parametrize("gbs,ok", [(32, True), (24, False), (16, True), (40, False), (4, False)])
def test_layout_problems_name_the_interleaving_rule(gbs: int, ok: bool) -> None:
    hw = hardware("h100-80gb", nodes=16)
    layout = Layout(tp=8, pp=4, vpp=5, dp=4)
    train = TrainSpec(seq_length=8192, micro_batch_size=1, global_batch_size=gbs)
    problems = [str(p) for p in layout_problems(L70, train, layout, hw)]
    if ok:
        assert problems == []
    else:
        assert len(problems) == 1 and "interleaved schedule (vpp=5) needs a multiple of pp=4" in problems[0]
        assert "multiple of mbs x dp x pp = 16" in problems[0]
    assert layout_problems(L70, train, replace(layout, vpp=1), hw) == []  # 1F1B: any count


def test_405b_on_1008_gpus_only_layouts_megatron_accepts() -> None:
    """126 layers x 1008 GPUs, gbs 1008: the old rule (m >= pp) let 368 interleaved splits (with
    micro batch) through that megatron refuses, e.g. tp8 pp9 vpp7 dp14 with micro batch 3 (24
    micro-batches)."""
    hw = hardware("h100-80gb", nodes=126)
    seen_interleaved = 0
    for layout, train in enumerate_layouts(L405, 8192, 1008, hw):
        m = train.global_batch_size // (layout.dp * train.micro_batch_size)
        if layout.vpp > 1:
            seen_interleaved += 1
            assert not megatron_interleaving_refuses(m, layout.pp), layout.short()
        assert layout_problems(L405, train, layout, hw) == []
    assert seen_interleaved > 0
    layout = Layout(tp=8, pp=9, vpp=7, cp=1, dp=14)
    refused = TrainSpec(seq_length=8192, micro_batch_size=3, global_batch_size=1008)
    assert any("gives 24 micro-batches per step" in str(p) for p in layout_problems(L405, refused, layout, hw))
    accepted = replace(refused, micro_batch_size=1)  # 72 micro-batches
    assert layout_problems(L405, accepted, layout, hw) == []
    best = search(L405, 8192, 1008, hw, Options()).best
    assert best is not None
    m = 1008 // (best.layout.dp * best.micro_batch_size)
    assert interleaving_accepts(m, best.layout.pp, best.layout.vpp)


def test_sequence_parallelism_splits_each_ranks_tokens_over_tp() -> None:
    """megatron's _split_along_first_dim: the s / cp tokens of a rank must divide by tp."""
    hw = hardware("h100-80gb", nodes=1)
    train = TrainSpec(seq_length=8196, micro_batch_size=1, global_batch_size=8)  # 8196 = 4 x 2049
    problems = [str(p) for p in layout_problems(L8, train, Layout(tp=8, dp=1), hw)]
    assert any("splits each rank's seq_length / cp = 8196 tokens over tp" in p for p in problems)
    assert layout_problems(L8, train, Layout(tp=4, dp=2), hw) == []
    assert layout_problems(L8, train, Layout(tp=8, dp=1, sequence_parallel=False), hw) == []
    cp = TrainSpec(seq_length=8200, micro_batch_size=1, global_batch_size=8)  # s / cp = 4100 = 4 x 1025
    assert layout_problems(L8, cp, Layout(tp=4, cp=2, dp=1), hw) == []
    problems = [str(p) for p in layout_problems(L8, cp, Layout(tp=8, cp=2, dp=1), hardware("h100-80gb", nodes=2))]
    assert problems == ["tp = 8: sequence parallelism splits each rank's seq_length / cp = 4100 tokens over tp: "
                        "use a seq_length that is a multiple of cp x tp = 16"]
    assert all((8192 // lay.cp) % lay.tp == 0 for lay, _ in enumerate_layouts(L8, 8192, 64, hardware("h100-80gb", nodes=8)))


def test_tp_must_divide_the_ffn() -> None:
    odd = replace(L8, name="odd-ffn", ffn_hidden_size=14338)  # 2 x 7169
    hw = hardware("h100-80gb", nodes=1)
    train = TrainSpec(seq_length=8192, micro_batch_size=1, global_batch_size=8)
    assert any("must divide ffn_hidden_size=14338" in str(p) for p in layout_problems(odd, train, Layout(tp=4, dp=2), hw))
    assert layout_problems(odd, train, Layout(tp=2, dp=4), hw) == []
    assert {lay.tp for lay, _ in enumerate_layouts(odd, 8192, 8, hw)} == {1, 2}


def test_full_recompute_layers_per_checkpoint_at_most_layers_per_stage() -> None:
    hw = hardware("h100-80gb", nodes=4)
    train = TrainSpec(seq_length=8192, micro_batch_size=1, global_batch_size=64)
    layout = Layout(tp=8, pp=4, dp=1, recompute="full", recompute_num_layers=21)
    assert any("between 1 and the layers per pipeline rank (20)" in str(p)
               for p in layout_problems(L70, train, layout, hw))
    assert layout_problems(L70, train, replace(layout, recompute_num_layers=20), hw) == []


def test_every_tp_is_tried_when_the_batch_is_smaller_than_the_cluster() -> None:
    """TP=1 needs PP (or CP) here: dp = 128 would not divide gbs 32, dp = 32 with pp = 4 does."""
    hw = hardware("h100-80gb", nodes=16)
    tps = {lay.tp for lay, _ in enumerate_layouts(L8, 8192, 32, hw)}
    assert 1 in tps and 8 in tps
