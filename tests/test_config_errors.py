"""Config mistakes: one clear message naming field, value and fix; exit 2; no traceback;
nothing submitted; no run directory left behind. Driven through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
P5 = "config=llama3_70b_p5"

MISTAKES = [
    (["parallelism.tp=3", "cluster.gpus_per_node=3"], "parallelism.tp = 3: model.num_attention_heads=4 is not divisible"),
    ([P5, "parallelism.tp=16", "parallelism.pp=2", "parallelism.vpp=null"], "tensor parallelism must stay inside a node"),
    (["parallelism.pp=3", "cluster.gpus_per_node=3"], "model.num_layers=4 must be divisible by pp x vpp = 3"),
    ([P5, "parallelism.vpp=3"], "model.num_layers=80 must be divisible by pp x vpp = 12"),
    (["cluster.gpus_per_node=2", "parallelism.dp=3"], "must equal tp x pp x cp x dp"),
    (["training.global_batch_size=7"], "training.global_batch_size = 7: must be divisible by micro_batch_size x dp"),
    (["parallelism.cp=2", "cluster.gpus_per_node=2", "training.seq_length=66"], "must be divisible by 2 x cp = 4"),
    (["parallelism.sequence_parallel=true"], "sequence parallelism needs parallelism.tp > 1"),
    (["parallelism.vpp=2"], "virtual pipeline needs parallelism.pp > 1"),
    (["cluster.gpu_type=h100"], "cluster.gpu_type = 'h100': unknown value; choose one of: a100-40gb"),
    (["training.micro_batch_size=0"], "training.micro_batch_size = 0: must be a positive integer"),
    (["training.seq_length=-8"], "training.seq_length = -8: must be a positive integer"),
    (["training.precision=int8"], "training.precision = 'int8': unknown value"),
    (["parallelism.recompute=some"], "parallelism.recompute = 'some': unknown value; choose one of: none, selective, full"),
    ([P5, "cluster.time_limit=forever"], "cluster.time_limit = 'forever': use Slurm's [D-]HH:MM:SS"),
    ([P5, "cluster.instance_type=ml.p6.48xlarge"], "cluster.instance_type = 'ml.p6.48xlarge': unknown instance"),
    (["+cluster.env.AWS_SECRET_ACCESS_KEY=abc"], "looks like a secret; never write its value"),
    (["training.train_tokens=100000"], "set exactly one of training.train_steps and training.train_tokens"),
    (["training.data.source=indexed"], "training.data.blend = []: indexed data needs at least one source"),
    ([P5, "cluster.container_mounts=[fsx]"], "cluster.container_mounts[0] = 'fsx': use SRC:DST[:FLAGS]"),
    ([P5, "runs_root='{tmp}/a b'"], "sbatch cannot take this path in #SBATCH --output"),
    (["cluster.nodes=2"], "a local run uses this machine only"),
    (["parallelism.distributed_optimizer=false"], "parallelism.overlap_param_gather = True: needs parallelism.distributed_optimizer=true"),
    ([P5, "cluster.gpus_per_node=4"], "ml.p5.48xlarge has 8 GPUs per node"),
    (["parallelism.tpp=8"], "Key 'tpp' not in 'ParallelismConfig'"),
    (["parallelism.tp=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["config=nope"], "Could not find 'config/nope'"),
]


def run_cli(args: list[str], runs_root: Path) -> subprocess.CompletedProcess:
    args = [a.replace("{tmp}", str(runs_root)) for a in args]
    if not any(a.startswith("runs_root=") for a in args):
        args.append(f"runs_root={runs_root}")
    return subprocess.run([sys.executable, "-m", "launcher", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("overrides,expected", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_config_mistake(tmp_path: Path, overrides: list[str], expected: str) -> None:
    runs_root = tmp_path / "runs"
    proc = run_cli(overrides, runs_root)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not runs_root.exists() or not any(runs_root.iterdir()), "a run directory was left behind"


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    proc = run_cli(["training.micro_batch_size=0", "training.precision=int8", "cluster.gpu_type=tpu"], tmp_path)
    assert proc.returncode == 2
    assert "invalid configuration (3 problems)" in proc.stderr
    # each problem on its own line: the field, the value given, and what to do
    for expected in ("training.micro_batch_size = 0: must be a positive integer",
                     "training.precision = 'int8': unknown value; choose one of",
                     "cluster.gpu_type = 'tpu': unknown value; choose one of"):
        assert expected in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir()), "a run directory was left behind"


def test_bad_dependency_and_local_depends_on(tmp_path: Path) -> None:
    proc = run_cli([P5, "cluster.dependency='afterok:1;touch x'", "dry_run=true"], tmp_path)
    assert proc.returncode == 2 and "cluster.dependency" in proc.stderr
    proc = run_cli(["depends_on=1234"], tmp_path)
    assert proc.returncode == 2 and "dependencies need a Slurm cluster" in proc.stderr
    proc = run_cli([P5, "depends_on=no-such-run"], tmp_path / "real")  # refused before anything is submitted
    assert proc.returncode == 2 and "no run named 'no-such-run'" in proc.stderr
    assert not (tmp_path / "real").exists() or not any((tmp_path / "real").iterdir())
    dry = run_cli([P5, "depends_on=no-such-run", "dry_run=true"], tmp_path)  # a dry run renders, and warns
    assert dry.returncode == 0 and "warning (dry run; a real launch refuses it)" in dry.stdout + dry.stderr
