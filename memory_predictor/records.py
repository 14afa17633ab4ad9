"""The JSON-ready records the predictor writes: ``evaluate --json``, each ranked layout, ``prediction.json``."""

from __future__ import annotations

from typing import Any

from memory_predictor import constants as C
from memory_predictor.search import evaluate
from memory_predictor.spec import Hardware, Layout, ModelSpec, Options, TrainSpec


def layout_json(layout: Layout, train: TrainSpec) -> dict[str, Any]:
    return {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "dp": layout.dp,
            "mbs": train.micro_batch_size, "sequence_parallel": layout.sp, "recompute": layout.recompute,
            "distributed_optimizer": layout.distributed_optimizer,
            "micro_batches": train.global_batch_size // (layout.dp * train.micro_batch_size)}


def hardware_json(hw: Hardware) -> dict[str, Any]:
    return {"gpu": hw.gpu, "memory_bytes": hw.memory_bytes, "memory_gib": hw.memory_bytes / C.GIB,
            "peak_tflops": hw.peak_tflops, "nodes": hw.nodes, "gpus_per_node": hw.gpus_per_node, "note": hw.note}


def evaluation_json(model: ModelSpec, train: TrainSpec, layout: Layout, opts: Options, hw: Hardware, *,
                    eff: C.Efficiency = C.EFFICIENCY, overheads: C.Overheads = C.OVERHEADS) -> dict[str, Any]:
    """Everything ``evaluate --json`` prints (also what the launcher records in a run directory)."""
    report, step = evaluate(model, train, layout, opts, hw, eff=eff, overheads=overheads)
    stages = {"first": report.first, "middle": report.middle, "last": report.last, "peak": report.peak}
    return {
        "model": model.name, "hardware": hardware_json(hw), "layout": layout_json(layout, train),
        "seq_length": train.seq_length, "global_batch_size": train.global_batch_size,
        "peak_bytes": report.peak_bytes, "peak_gib": report.peak_bytes / C.GIB, "peak_stage": report.peak.stage,
        "fits": report.fits, "usable_fraction": opts.usable_fraction, "usable_bytes": report.usable_bytes,
        "memory_fraction": report.fraction,
        "tflops_per_gpu": step.tflops_per_gpu, "mfu": step.mfu, "tokens_per_s": step.tokens_per_s,
        "step_time_s": step.step_time_s,
        "breakdown": {name: (s.as_dict() if s is not None else None) for name, s in stages.items()},
        "activation_bytes_per_layer": dict(report.layer.items),
        "throughput": step.as_dict(),
    }


__all__ = ["layout_json", "hardware_json", "evaluation_json"]
