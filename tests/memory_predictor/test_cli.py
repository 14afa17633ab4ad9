"""``python -m memory_predictor``: the exact command-line shape, JSON keys, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memory_predictor.cli import main

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv: str, fits: bool = True) -> dict:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0 or (not fits and rc == 1), err  # 1: evaluated, does not fit
    return json.loads(out)


def test_evaluate_json_shape(capsys) -> None:
    d = run_json(capsys, "evaluate", "--model", "llama3.1_8b", "--gpu", "h100-80gb", "--tp", "2", "--pp", "1", "--cp", "1",
                 "--dp", "4", "--vpp", "1", "--mbs", "1", "--gbs", "1024", "--seq", "8192", "--recompute", "none")
    for key in ("peak_bytes", "fits", "tflops_per_gpu", "breakdown", "mfu", "tokens_per_s"):
        assert key in d
    assert set(d["breakdown"]) == {"first", "middle", "last", "peak"}
    assert d["breakdown"]["middle"] is None  # pp=1: one stage
    peak = d["breakdown"]["peak"]
    assert d["peak_bytes"] == peak["total"] == peak["reserved"] + peak["cuda_context"] + peak["nccl"]
    assert d["layout"] == {"tp": 2, "pp": 1, "vpp": 1, "cp": 1, "dp": 4, "mbs": 1, "sequence_parallel": True,
                           "recompute": "none", "distributed_optimizer": True, "micro_batches": 256}
    assert d["fits"] is True and 0 < d["mfu"] < 1


def test_evaluate_flags_change_the_prediction(capsys) -> None:
    base = ["evaluate", "--model", "llama3.3_70b", "--gpu", "h100-80gb", "--tp", "8", "--pp", "4", "--dp", "8",
            "--mbs", "1", "--gbs", "1024", "--seq", "8192"]
    ref = run_json(capsys, *base)
    no_dist = run_json(capsys, *base, "--no-distributed-optimizer", fits=False)
    no_sp = run_json(capsys, *base, "--no-sequence-parallel", fits=False)
    full = run_json(capsys, *base, "--recompute", "full")
    vpp = run_json(capsys, *base, "--vpp", "5")
    assert no_dist["breakdown"]["first"]["optimizer"] == 8 * ref["breakdown"]["first"]["optimizer"]
    assert no_sp["breakdown"]["first"]["activations"] > ref["breakdown"]["first"]["activations"]
    assert full["breakdown"]["first"]["activations"] < ref["breakdown"]["first"]["activations"] / 10
    assert full["tflops_per_gpu"] < ref["tflops_per_gpu"]
    assert vpp["breakdown"]["first"]["in_flight"] == 23 and vpp["breakdown"]["middle"]["pp_rank"] == 2
    custom = run_json(capsys, *base[:3], "--gpu-memory-gib", "94", *base[5:])
    assert custom["hardware"]["memory_bytes"] == 94 * GIB and custom["peak_bytes"] == ref["peak_bytes"]


def test_evaluate_exit_1_when_it_does_not_fit(capsys) -> None:
    rc, out, _ = run(capsys, "evaluate", "--model", "llama3.3_70b", "--gpu", "h100-80gb", "--tp", "8", "--dp", "1",
                     "--gbs", "8", "--seq", "8192", "--json")
    assert rc == 1 and json.loads(out)["fits"] is False


def test_search_json_ranked_layouts(capsys) -> None:
    d = run_json(capsys, "search", "--model", "llama3.3_70b", "--gpu", "h100-80gb", "--nodes", "32",
                 "--gpus-per-node", "8", "--seq", "8192", "--gbs", "1024", "--top", "5")
    layouts = d["layouts"]
    assert len(layouts) == 5 and d["fitting"] > 100 and d["evaluated"] > d["fitting"]
    speeds = [x["tokens_per_s"] for x in layouts]
    assert speeds == sorted(speeds, reverse=True) and [x["rank"] for x in layouts] == [1, 2, 3, 4, 5]
    for x in layouts:
        assert x["fits"] and x["peak_bytes"] <= d["usable_bytes"]
        assert x["tp"] * x["pp"] * x["cp"] * x["dp"] == 256 and x["tp"] <= 8
        assert {"first", "last", "peak"} <= set(x["breakdown"])


def test_plan_json(capsys, tmp_path: Path) -> None:
    d = run_json(capsys, "plan", "--model", "llama3.1_8b", "--gpu", "h100-80gb", "--nodes", "4", "--seq", "8192",
                 "--gbs", "512", "--tokens", "1e11", "--price-per-node-hour", "50", "--plot", str(tmp_path / "p.html"))
    for key in ("best", "tokens_per_s", "duration_days", "gpu_hours", "cost", "schedule"):
        assert key in d
    assert d["best"]["rank"] == 1 and d["steps"] == -(-10**11 // (512 * 8192))
    assert d["gpu_hours"] == pytest.approx(d["duration_s"] / 3600 * 32)
    assert d["cost"] == pytest.approx(d["node_hours"] * 50)
    assert d["duration_days"] * 86400 >= d["steps"] * d["step_time_s"]
    assert sum(p["last_step"] - p["first_step"] + 1 for p in d["schedule"]) == d["steps"]
    assert all(p["duration_hours"] <= 48 for p in d["schedule"])
    assert "<svg" in (tmp_path / "p.html").read_text()


def test_heatmap_html_without_matplotlib(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # HTML must not need it
    out = tmp_path / "heat.html"
    d = run_json(capsys, "search", "--model", "llama3.1_8b", "--gpu", "h100-80gb", "--nodes", "1", "--seq", "8192",
                 "--gbs", "64", "--heatmap", str(out))
    text = out.read_text()
    assert "<table>" in text and "mbs 1" in text and "%" in text and d["layouts"]
    rc, _, err = run(capsys, "search", "--model", "llama3.1_8b", "--gpu", "h100-80gb", "--nodes", "1", "--seq", "8192",
                     "--gbs", "64", "--heatmap", str(tmp_path / "heat.png"))
    assert rc == 2 and "matplotlib" in err and ".html" in err


def test_heatmap_png(capsys, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "heat.png"
    run_json(capsys, "search", "--model", "llama3.1_8b", "--gpu", "h100-80gb", "--nodes", "1", "--seq", "8192",
             "--gbs", "64", "--heatmap", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rich_tables_without_json(capsys) -> None:
    rc, out, _ = run(capsys, "search", "--model", "llama3.1_8b", "--gpu", "h100-80gb", "--nodes", "1", "--seq", "8192",
                     "--gbs", "64", "--top", "3")
    assert rc == 0 and "tokens/s" in out and "activations in flight" in out and "NCCL buffers" in out
    rc, out, _ = run(capsys, "plan", "--model", "llama3.1_8b", "--gpu", "h100-80gb", "--nodes", "1", "--seq", "8192",
                     "--gbs", "64", "--steps", "1000")
    assert rc == 0 and "schedule" in out and "GPU-hours" in out and "pass --price-per-node-hour" in out


def test_hugging_face_config_json(capsys, tmp_path: Path) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "hidden_act": "silu", "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    args = ["--gpu", "h100-80gb", "--tp", "2", "--dp", "4", "--gbs", "64", "--seq", "8192"]
    from_hf = run_json(capsys, "evaluate", "--model", str(path), *args)
    from_ours = run_json(capsys, "evaluate", "--model", "llama3.1_8b", *args)
    assert from_hf["peak_bytes"] == from_ours["peak_bytes"]
    assert run_json(capsys, "evaluate", "--model", str(tmp_path), *args)["peak_bytes"] == from_hf["peak_bytes"]


BAD = [
    (["--model", "nope"], "model = 'nope': unknown model; use one of: llama3.1_405b"),
    (["--gpu", "h200"], "gpu = 'h200': unknown GPU type; use one of: a100-40gb"),
    (["--tp", "3"], "tp = 3: must divide num_attention_heads=32"),
    (["--pp", "5"], "pp x vpp = 5 must divide num_layers=32"),
    (["--tp", "16", "--gpus-per-node", "8"], "tensor parallelism stays inside a node"),
    (["--cp", "3"], "seq_length=8192 must be divisible by 2 x cp = 6"),
    (["--dp", "3"], "must be divisible by mbs x dp"),
    (["--seq", "0"], "seq = 0: must be a positive integer"),
    (["--gbs", "-8"], "gbs = -8: must be a positive integer"),
    (["--mbs", "0"], "mbs = 0: must be a positive integer"),
    (["--gpu", None, "--gpu-memory-gib", "-1"], "gpu_memory_gib = -1.0: must be a positive number of GiB"),
    (["--vpp", "2"], "the interleaved schedule needs pp > 1"),
    (["--usable-fraction", "1.5"], "usable_fraction = 1.5: must be in (0, 1]"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_input_one_clear_error(capsys, change: list, message: str) -> None:
    args = {"--model": "llama3.1_8b", "--gpu": "h100-80gb", "--seq": "8192", "--gbs": "64"}
    extra = []
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[flag] = value
        else:
            extra += [flag, value]
    argv = ["evaluate"] + [x for k, v in args.items() if v is not None for x in (k, v)] + extra
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("content,message", [
    ({"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 1000},
     "config.json:intermediate_size = None: missing in"),
    ({"hidden_size": 4096, "intermediate_size": 0, "num_attention_heads": 32, "num_hidden_layers": 32,
      "vocab_size": 1000}, "config.json:intermediate_size = 0: must be a positive integer"),
    ({"hidden_size": 4096, "intermediate_size": 100, "num_attention_heads": 32, "num_hidden_layers": 32,
      "vocab_size": 1000, "num_key_value_heads": 5}, "num_query_groups = 5: must divide num_attention_heads=32"),
    ({"hidden_size": 64, "intermediate_size": 100, "num_attention_heads": 4, "num_hidden_layers": 2,
      "vocab_size": 100, "num_local_experts": 8}, "mixture-of-experts models are not modelled yet"),
    ("{not json", "not valid JSON"),
])
def test_bad_config_json(capsys, tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    rc, _, err = run(capsys, "evaluate", "--model", str(path), "--gpu", "h100-80gb", "--seq", "2048", "--gbs", "8")
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_search_with_no_fitting_layout_says_what_to_do(capsys) -> None:
    rc, out, err = run(capsys, "search", "--model", "llama3.1_405b", "--gpu", "a100-40gb", "--nodes", "1", "--seq", "8192",
                       "--gbs", "64", "--json")
    assert rc == 1 and json.loads(out)["layouts"] == [] and "no layout fits" in err and "add nodes" in err


def test_real_process_exit_codes_and_no_traceback() -> None:
    """The module entry point itself (interpreter start, -m dispatch, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "memory_predictor", "evaluate", "--model", "llama3.1_8b", "--gpu",
                           "b200", "--seq", "8192", "--gbs", "8"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown GPU type" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "memory_predictor", "search", "--model", "llama3.3_70b", "--gpu",
                           "h100-80gb", "--nodes", "128", "--gpus-per-node", "8", "--seq", "8192", "--gbs", "1024",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["layouts"]
    assert "torch" not in proc.stderr


@pytest.mark.parametrize("flag,command", [("--heatmap", "search"), ("--plot", "plan")])
def test_unwritable_output_is_a_message_not_a_traceback(tmp_path, flag, command) -> None:
    import subprocess
    import sys

    args = ["--model", "llama3.1_8b", "--gpu", "h100-80gb", "--nodes", "2", "--seq", "8192", "--gbs", "256"]
    if command == "plan":
        args += ["--tokens", "1T"]
    for bad, why in ((tmp_path / "no" / "such" / "out.html", "does not exist"), (tmp_path, "is a directory")):
        proc = subprocess.run([sys.executable, "-m", "memory_predictor", command, *args, flag, str(bad)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert flag in proc.stderr and why in proc.stderr and "Traceback" not in proc.stderr
