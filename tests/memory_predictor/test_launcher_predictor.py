"""The launcher with the predictor: parallelism=auto, refusing a layout that will not fit, run-dir records."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.e2e import launcher, only_run

P5 = ["config=llama3_70b_p5", "dry_run=true"]


def test_auto_picks_a_layout_and_records_alternatives(tmp_path: Path) -> None:
    proc = launcher(*P5, "cluster.nodes=32", "parallelism=auto", "parallelism.top_k=4", f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "parallelism=auto:" in proc.stdout and "layout_search.json" in proc.stdout
    run = only_run(tmp_path)
    record = json.loads((run / "layout_search.json").read_text())
    chosen, alternatives = record["chosen"], record["alternatives"]
    assert len(alternatives) == 3 and record["fitting"] > 100 and record["evaluated"] > record["fitting"]
    assert all(a["fits"] and a["breakdown"]["peak"]["total"] == a["peak_bytes"] for a in [chosen, *alternatives])
    assert chosen["tokens_per_s"] >= max(a["tokens_per_s"] for a in alternatives)
    config = yaml.safe_load((run / "config.yaml").read_text())
    par, lay = config["parallelism"], chosen["layout"]
    assert par["mode"] == "manual"  # the ranks get an explicit, validated layout
    assert (par["tp"], par["pp"], par["cp"], par["dp"]) == (lay["tp"], lay["pp"], lay["cp"], lay["dp"])
    assert config["training"]["micro_batch_size"] == lay["mbs"]
    assert json.loads((run / "prediction.json").read_text())["layout"] == lay


def test_manual_layout_predicted_not_to_fit_is_refused(tmp_path: Path) -> None:
    proc = launcher(*P5, "cluster.nodes=4", "training.micro_batch_size=2", f"runs_root={tmp_path}")
    assert proc.returncode == 2
    err = proc.stderr
    assert "parallelism = 'tp=8 pp=4 vpp=5 cp=1 dp=1" in err and "exceeds the usable 75.2 GiB" in err
    assert "activations" in err and "optimizer" in err  # the breakdown
    assert "try tp=" in err and "parallelism.allow_oom=true" in err  # a suggestion and the override
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_allow_oom_launches_anyway_with_a_warning(tmp_path: Path) -> None:
    proc = launcher(*P5, "cluster.nodes=4", "training.micro_batch_size=2", "parallelism.allow_oom=true",
                    f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "warning: predicted peak" in proc.stdout
    assert json.loads((only_run(tmp_path) / "prediction.json").read_text())["fits"] is False


def test_manual_layout_that_fits_records_its_prediction(tmp_path: Path) -> None:
    proc = launcher(*P5, "cluster.nodes=32", f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    prediction = json.loads((only_run(tmp_path) / "prediction.json").read_text())
    assert prediction["fits"] and prediction["layout"]["vpp"] == 5 and prediction["peak_stage"] == "first"


def test_auto_on_cpu_and_no_fit_and_bad_fields(tmp_path: Path) -> None:
    proc = launcher("config=tiny_local", "parallelism=auto", "cluster.gpus_per_node=2", "dry_run=true",
                    f"runs_root={tmp_path / 'cpu'}")
    assert proc.returncode == 0, proc.stderr
    par = yaml.safe_load((only_run(tmp_path / "cpu") / "config.yaml").read_text())["parallelism"]
    assert par["cp"] == 1 and par["tp"] * par["pp"] * par["dp"] == 2
    proc = launcher("config=llama3_70b_p5", "model=llama3.1_405b", "cluster.nodes=1", "parallelism=auto",
                    "dry_run=true", f"runs_root={tmp_path / 'big'}")
    assert proc.returncode == 2 and "no layout of llama3.1_405b fits 1 x 8 h100-80gb" in proc.stderr
    proc = launcher("config=tiny_local", "parallelism.usable_memory_fraction=1.5", "parallelism.top_k=0",
                    "dry_run=true", f"runs_root={tmp_path / 'bad'}")
    assert proc.returncode == 2
    assert "parallelism.usable_memory_fraction = 1.5: must be in (0, 1]" in proc.stderr
    assert "parallelism.top_k = 0: must be a positive integer" in proc.stderr
