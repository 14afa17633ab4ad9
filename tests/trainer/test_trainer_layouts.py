"""End to end: torchrun + ``python -m trainer`` on CPU processes (gloo), tiny model.

Every layout trains on the same global batches from the same layout-independent initial
weights, so the per-step losses must equal the single-process run. Tolerance: abs 2e-4 on the
printed 4-decimal loss (one unit of the last printed digit plus rounding; in practice the
printed values are identical). Precision is fp32 (the tiny preset) and dropout is 0.
"""

from __future__ import annotations

import faulthandler
from pathlib import Path

import pytest

from trainer_harness import TrainerRun, run_trainer, train, write_config

faulthandler.enable()
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240),
              # importing megatron-core (the tokenizer test) announces its TE/apex fallbacks
              pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

STEPS = 6
LOSS_TOL = 2e-4
BASE = [f"training.train_steps={STEPS}", "training.precision=fp32"]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> TrainerRun:
    return train(tmp_path_factory.mktemp("single"), 1, BASE)


def assert_same_losses(run: TrainerRun, reference: TrainerRun) -> None:
    assert run.losses == pytest.approx(reference.losses, abs=LOSS_TOL), (
        f"losses differ from the single-process run:\n{run.losses}\n{reference.losses}")
    assert [s.grad_norm for s in run.steps] == pytest.approx([s.grad_norm for s in reference.steps], abs=2e-3)


def test_single_process_loss_decreases(single: TrainerRun) -> None:
    assert len(single.steps) == STEPS
    assert single.losses[-1] < single.losses[0] - 0.1, single.losses
    first = single.steps[0]
    assert first.mfu_percent is None  # cpu: no peak
    assert first.tokens_per_s > 0 and first.tflops_per_gpu >= 0


@pytest.mark.parametrize("name,overrides", [
    ("tp2", ["parallelism.tp=2"]),
    ("tp2_sp", ["parallelism.tp=2", "parallelism.sequence_parallel=true"]),
    ("dp2", []),  # dp derived: 2 processes / (tp x pp) = 2, distributed optimizer + overlap
    ("pp2", ["parallelism.pp=2"]),
    ("pp2_vpp2", ["parallelism.pp=2", "parallelism.vpp=2"]),  # 4 micro-batches >= pp
])
def test_layout_matches_single_process(tmp_path: Path, single: TrainerRun, name: str, overrides: list[str]) -> None:
    run = train(tmp_path / name, 2, BASE + overrides)
    assert_same_losses(run, single)


def test_indexed_data_trains(tmp_path: Path) -> None:
    from trainer.tokenize import ByteTokenizer, tokenize_files

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    prefix = tmp_path / "data" / "corpus"
    tokenize_files([text], str(prefix), ByteTokenizer())
    run = train(tmp_path / "run", 2, [
        "training.train_steps=5", "training.data.source=indexed", f"training.data.blend=[{{path:{prefix}}}]",
    ])
    assert len(run.steps) == 5
    assert run.losses[-1] < run.losses[0]


def test_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["training.train_steps=1", "training.data.source=indexed",
                                     f"training.data.blend=[{{path:{tmp_path / 'missing'}}}]"])
    run = run_trainer(config, None, timeout_s=60)  # no torchrun: it adds its own traceback
    assert run.returncode == 2, run.describe()
    assert "training.data.blend" in run.stderr and "trainer.tokenize" in run.stderr
    assert "Traceback" not in run.stderr
