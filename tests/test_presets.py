"""The presets of the workflow the project exists for dry-run here (no /fsx): CPT of Llama 3.3 70B
Instruct on 32 x P5 from HF weights over a weighted blend, and SFT chained after it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e import launcher, only_run


def test_cpt_preset_dry_run(tmp_path: Path) -> None:
    proc = launcher("config=llama3_70b_cpt_p5", "dry_run=true", f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    run = only_run(tmp_path)
    report = json.loads((run / "data_report.json").read_text())
    assert [s["name"] for s in report["sources"]] == ["ja_web", "code", "en_web", "ja_wiki", "math"]
    assert abs(report["sources"][0]["weight"] - 210 / 314) < 1e-9 and report["training_tokens"] > 3.13e11
    assert "warning (dry run; a real launch refuses it): checkpoint.init_from" in proc.stdout
    config = (run / "config.yaml").read_text()
    for line in ("init_from: /fsx/models/Llama-3.3-70B-Instruct", "export_hf: true", "eval_interval: 500"):
        assert line in config
    assert "#SBATCH --nodes=32" in (run / "job.sbatch").read_text()


def test_cpt_preset_real_launch_refuses_missing_inputs(tmp_path: Path) -> None:
    proc = launcher("config=llama3_70b_cpt_p5", f"runs_root={tmp_path}")
    assert proc.returncode == 2
    assert "training.data.blend[0].path = '/fsx/data/ja_web/text_document'" in proc.stderr
    assert "checkpoint.init_from = '/fsx/models/Llama-3.3-70B-Instruct'" in proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_sft_preset_dry_run(tmp_path: Path) -> None:
    proc = launcher("config=llama3_70b_sft_p5", "dry_run=true", f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "depends_on = 'llama3_70b_cpt_p5'" in proc.stdout  # nothing to chain after here: a warning
    config = (only_run(tmp_path) / "config.yaml").read_text()
    for line in ("source: sft", "init_from: /fsx/checkpoints/llama3_70b_cpt_p5", "pack_sequences: true"):
        assert line in config
