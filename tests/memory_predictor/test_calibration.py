"""The predictor against the published measurements (benchmarks/predictor_calibration.py): a
regression of the throughput or memory model, or a stale fitted constant, fails here."""

from __future__ import annotations

import csv

import pytest

from benchmarks import predictor_calibration as cal
from memory_predictor import constants as C


@pytest.fixture(scope="module")
def rows() -> list[cal.Row]:
    return cal.load_rows()


@pytest.fixture(scope="module")
def results(rows: list[cal.Row]) -> list[cal.Result]:
    return cal.evaluate(rows)


def test_the_table_is_public_and_complete(rows: list[cal.Row]) -> None:
    with open(cal.DATA, newline="") as fh:
        header = next(csv.reader(fh))
    for column in ("source", "url", "model", "gpu", "num_gpus", "seq_length", "global_batch_size", "tp", "pp", "cp",
                   "dp", "precision", "tokens_per_s_per_gpu", "ran_ok", "assumptions"):
        assert column in header
    assert all(r.text("url").startswith("https://") for r in rows)
    measured = [r for r in rows if cal.published_tokens_per_gpu(r)]
    assert len(measured) >= 15 and len({r.text("source") for r in measured}) >= 3
    primary = [r for r in rows if r.set == cal.PRIMARY]
    assert {r.text("split") for r in primary} == {"train", "heldout"}
    assert all(r.text("precision") == "bf16" and r.text("gpu") == "h100-80gb" for r in primary)


def test_throughput_mape_target(results: list[cal.Result]) -> None:
    summary = cal.summarize(results)
    for split in ("train", "heldout"):
        mape = summary.mape[f"{cal.PRIMARY}/{split}"]
        assert mape is not None and mape <= cal.TARGET_MAPE, (split, mape)
    assert summary.counts[f"{cal.PRIMARY}/train"] >= 15 and summary.counts[f"{cal.PRIMARY}/heldout"] >= 5


def test_fit_check_accepts_what_ran_and_refuses_what_did_not(results: list[cal.Result]) -> None:
    summary = cal.summarize(results)
    assert [(r.row.id, why) for r, why in summary.rejected] == []
    assert summary.oom_predicted_to_fit == []
    assert summary.targets_met
    # the only exceptions are layouts the predictor cannot represent (uneven pipeline splits)
    assert all("uneven" in r.case.limits for r, _ in summary.rejected_known if r.case)


def test_published_peak_memory(results: list[cal.Result]) -> None:
    """NVIDIA's NeMo log of Llama 3.1 8B (TP1 CP2 DP4): max reserved and model states at step end."""
    logged = [r for r in results if r.row.as_float("peak_reserved_gib") and r.row.set in cal.MEGATRON_SETS]
    assert logged
    for r in logged:
        assert r.reserved_bytes / C.GIB == pytest.approx(r.row.as_float("peak_reserved_gib"), rel=0.03)
        assert r.states_bytes / C.GIB == pytest.approx(r.row.as_float("allocated_gib"), rel=0.03)


def test_shipped_constants_are_the_fit(rows: list[cal.Row], results: list[cal.Result]) -> None:
    """Refitting on the table gives the values in memory_predictor/constants.py (rounded)."""
    fitted = cal.fit_efficiency(rows)
    shipped = C.EFFICIENCY
    assert fitted.compute["h100"] == pytest.approx(shipped.compute["h100"], abs=0.01)
    assert fitted.compute["a100"] == pytest.approx(shipped.compute["a100"], abs=0.01)
    assert fitted.gemm_half_flops == pytest.approx(shipped.gemm_half_flops, rel=0.05)
    margin = cal.fit_allocator_margin(rows)
    assert margin is not None and margin == pytest.approx(C.OVERHEADS.allocator_margin_fraction, abs=0.005)
    assert cal.fit_usable_fraction(results) == C.DEFAULT_USABLE_FRACTION


def test_unknown_settings_are_skipped_not_guessed(rows: list[cal.Row]) -> None:
    skipped = [r for r in rows if isinstance(cal.case_for(r), str)]
    assert skipped and all("not published" in str(cal.case_for(r)) for r in skipped)
