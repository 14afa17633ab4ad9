"""Write a config.yaml from the tiny presets and run ``python -m trainer`` under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # pytest run from elsewhere than the repo root
    sys.path.insert(0, str(REPO_ROOT))

from trainer.metrics import StepMetrics, parse_step_line  # noqa: E402


def write_config(run_dir: Path, overrides: list[str]) -> Path:
    """Compose configs/launcher.yaml (+ overrides) the way the launcher does, dump it to run_dir."""
    from hydra import compose, initialize_config_dir

    from configs.loading import dump_config, explicit_model_fields, to_root
    from configs.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base=None):
        cfg = compose("launcher", overrides=overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(dump_config(to_root(cfg, explicit=explicit_model_fields(overrides))))
    return path


@dataclass(frozen=True)
class TrainerRun:
    returncode: int
    stdout: str
    stderr: str
    steps: list[StepMetrics]

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps]

    @property
    def final_line(self) -> str | None:
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("training finished:")]
        return lines[-1] if lines else None

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-8000:]}"


def run_trainer(config: Path, nproc: int | None, timeout_s: float = 150.0) -> TrainerRun:
    """torchrun --standalone with ``nproc`` CPU processes (None: one plain ``python -m trainer``).

    On timeout the ranks dump their stacks (SIGUSR1, faulthandler), then everything is killed.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "trainer", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGUSR1)  # the ranks print their stacks (faulthandler)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n[harness] killed after {timeout_s} s"
    steps = [m for m in (parse_step_line(ln) for ln in stdout.splitlines()) if m is not None]
    return TrainerRun(proc.returncode, stdout, stderr, steps)


def train(run_dir: Path, nproc: int, overrides: list[str], timeout_s: float = 150.0) -> TrainerRun:
    """Run to completion and check the log contract: one step line per step, then the final line."""
    overrides = [f"cluster.gpus_per_node={nproc}", *overrides]
    run = run_trainer(write_config(run_dir, overrides), nproc, timeout_s)
    if run.returncode != 0:
        raise AssertionError(f"trainer failed:\n{run.describe()}")
    total = run.steps[0].total_steps if run.steps else 0
    if [s.step for s in run.steps] != list(range(1, total + 1)) or total == 0:
        raise AssertionError(f"expected one step line per step:\n{run.describe()}")
    expected_final = f"training finished: steps={total} final_loss={run.steps[-1].loss:.4f}"
    if run.final_line != expected_final:
        raise AssertionError(f"expected {expected_final!r}:\n{run.describe()}")
    return run
