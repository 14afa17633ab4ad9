"""The one kernel decision (memory_predictor.kernels): pure rules, the launcher's resolution and the
ranks' check, and megatron's TransformerConfig accepting every decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memory_predictor.kernels import choose_kernels
from tests.e2e import launcher, only_run


def test_decision_table() -> None:
    cpu = choose_kernels("cpu", transformer_engine=True)  # TE never applies to gloo runs
    assert not (cpu.transformer_engine or cpu.flash_attention or cpu.fused_swiglu or cpu.rope_fusion)
    te = choose_kernels("h100-80gb", transformer_engine=True)
    assert te.transformer_engine and te.flash_attention and te.fused_swiglu and te.rope_fusion
    assert te.gradient_accumulation_fusion and te.cross_entropy_fusion and te.cross_entropy_impl == "native"
    plain = choose_kernels("h100-80gb", transformer_engine=False)
    assert not (plain.transformer_engine or plain.flash_attention or plain.rope_fusion)
    assert plain.fused_swiglu and plain.cross_entropy_impl == "native" and "WITHOUT" in plain.reason


@pytest.mark.parametrize("te", [True, False])
def test_megatron_accepts_every_gpu_decision(te: bool) -> None:
    from configs.schema import ModelConfig, ParallelismConfig
    from trainer.model import transformer_config

    model = ModelConfig(name="m", num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                        num_query_groups=2, vocab_size=300)
    kernels = choose_kernels("h100-80gb", transformer_engine=te)
    if te:  # megatron refuses fused RoPE without TE installed: the decision needs TE where it runs
        pytest.importorskip("transformer_engine")
    cfg = transformer_config(model, ParallelismConfig(), "bf16", gloo=True, kernels=kernels)
    assert cfg.bias_activation_fusion is kernels.fused_swiglu
    assert cfg.apply_rope_fusion is kernels.rope_fusion and cfg.cross_entropy_loss_fusion is kernels.cross_entropy_fusion


def test_ranks_refuse_planned_te_that_is_not_importable() -> None:
    from configs.errors import ConfigError
    from trainer.model import runtime_kernels, transformer_engine_importable

    if transformer_engine_importable():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ConfigError, match="cluster.transformer_engine = True: the launch planned Transformer Engine"):
        runtime_kernels("h100-80gb", gloo=False, planned=True)
    assert not runtime_kernels("h100-80gb", gloo=False, planned=False).transformer_engine


def test_launcher_resolves_and_records_the_kernels(tmp_path: Path) -> None:
    image = launcher("config=llama3_70b_p5", "dry_run=true", f"runs_root={tmp_path / 'image'}")
    assert image.returncode == 0, image.stderr
    run = only_run(tmp_path / "image")
    recorded = json.loads((run / "kernels.json").read_text())
    assert recorded["transformer_engine"] and "container image" in recorded["transformer_engine_source"]
    assert "transformer_engine: true" in (run / "config.yaml").read_text()
    bare = launcher("config=llama3_70b_p5", "dry_run=true", "cluster.container_image=null",
                    "cluster.container_mounts=[]", f"runs_root={tmp_path / 'bare'}")
    assert bare.returncode == 0, bare.stderr
    assert "warning: no Transformer Engine" in bare.stdout  # this machine has none: said out loud
    run = only_run(tmp_path / "bare")
    assert json.loads((run / "kernels.json").read_text())["flash_attention"] is False
    assert json.loads((run / "prediction.json").read_text())["peak_gib"] > json.loads(
        (only_run(tmp_path / "image") / "prediction.json").read_text())["peak_gib"]  # unfused attention costs memory


def test_context_parallelism_needs_transformer_engine(tmp_path: Path) -> None:
    proc = launcher("config=llama3_70b_p5", "dry_run=true", "cluster.transformer_engine=false", "parallelism.cp=2",
                    "parallelism.pp=2", "parallelism.vpp=null", f"runs_root={tmp_path}")
    assert proc.returncode == 2
    assert "parallelism.cp = 2: context parallelism needs Transformer Engine" in proc.stderr
