"""The data of the shareable plan page: plan, layout space, chosen layout, and predicted vs measured.

``page_data(...)`` gathers everything ``report_html.render_page`` draws into one JSON-ready dict
(pure: dataclasses in, a dict out; the same dict whether the page is written by ``plan
--report``, by the launcher into a run directory, or re-rendered after training by ``report
--run``). ``layout_space`` is every layout the search enumerates, each with its predicted peak
memory and throughput, fitting or not, for the heatmap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import PurePath as Path
from typing import Any

from memory_predictor import constants as C
from memory_predictor.activations import LayerActivations, layer_activations
from memory_predictor.calibration import Calibration, calibration_from_dict
from memory_predictor.failures import FailureModel
from memory_predictor.plan import TrainingPlan, make_plan
from memory_predictor.records import evaluation_json
from memory_predictor.runs import Measured, RunInputs, inputs_from_json
from memory_predictor.search import DEFAULT_MAX_MBS, enumerate_layouts, peak_stage
from memory_predictor.spec import RECOMPUTE
from memory_predictor.throughput import predict_step

#: Columns of ``layout_space`` rows (compact: a 70B search has thousands of layouts).
SPACE_FIELDS = ("tp", "pp", "cp", "vpp", "dp", "mbs", "recompute", "distributed_optimizer", "peak_bytes",
                "tokens_per_s", "fits")


def layout_space(inputs: RunInputs, *, eff: C.Efficiency = C.EFFICIENCY, overheads: C.Overheads = C.OVERHEADS,
                 max_mbs: int = DEFAULT_MAX_MBS, recompute: Sequence[str] = RECOMPUTE) -> list[list[Any]]:
    """Every valid layout of this cluster with its predicted peak bytes and tokens/s (rows of SPACE_FIELDS)."""
    i = inputs
    usable = int(i.hw.memory_bytes * i.opts.usable_fraction) if i.hw.check_memory else 0
    layers: dict[tuple[object, ...], LayerActivations] = {}
    rows: list[list[Any]] = []
    for layout, train in enumerate_layouts(i.model, i.train.seq_length, i.train.global_batch_size, i.hw,
                                           recompute=recompute, max_mbs=max(max_mbs, i.train.micro_batch_size),
                                           cpu_trainer=i.cpu):
        key = (layout.tp, layout.cp, layout.recompute, train.micro_batch_size)
        layer = layers.get(key)
        if layer is None:
            layer = layers[key] = layer_activations(i.model, train.seq_length, train.micro_batch_size, layout, i.opts)
        peak = peak_stage(i.model, train, layout, i.opts, layer, overheads, on_cpu=i.cpu)
        step = predict_step(i.model, train, layout, i.opts, i.hw, eff)
        rows.append([layout.tp, layout.pp, layout.cp, layout.vpp, layout.dp, train.micro_batch_size, layout.recompute,
                     layout.distributed_optimizer, peak.total, round(step.tokens_per_s, 3),
                     not usable or peak.total <= usable])
    return rows


def _plan_json(plan: TrainingPlan) -> dict[str, Any]:
    """The plan without every phase's checkpoint steps (a count instead: a long run has thousands)."""
    out = plan.as_dict()
    out["phases"] = [{**{k: v for k, v in asdict(p).items() if k != "checkpoint_steps"},
                      "checkpoints": len(p.checkpoint_steps)} for p in plan.phases]
    return out


def page_data(inputs: RunInputs, *, title: str, plan: TrainingPlan | None, space: list[list[Any]] | None,
              eff: C.Efficiency = C.EFFICIENCY, overheads: C.Overheads = C.OVERHEADS,
              calibration: Calibration | None = None, calibration_source: str | None = None,
              measured: Measured | None = None, run_dir: str | None = None, generated: str = "",
              notes: Sequence[str] = ()) -> dict[str, Any]:
    """Everything the page shows, JSON-ready."""
    i = inputs
    chosen = evaluation_json(i.model, i.train, i.layout, i.opts, i.hw, eff=eff, overheads=overheads)
    return {
        "title": title, "generated": generated, "run_dir": run_dir, "model": i.model.name,
        "hardware": chosen["hardware"], "cpu": i.cpu, "seq_length": i.train.seq_length,
        "global_batch_size": i.train.global_batch_size, "usable_fraction": i.opts.usable_fraction,
        "chosen": chosen, "plan": _plan_json(plan) if plan is not None else None,
        "space": {"fields": list(SPACE_FIELDS), "rows": space} if space is not None else None,
        "calibration": ({"source": calibration_source, **calibration.as_dict()} if calibration is not None else None),
        "measured": measured.as_dict() if measured is not None else None,
        "notes": list(notes),
        "assumptions": {
            "failure_source": (f"Llama 3 (Dubey et al. 2024, section 3.3.4): {C.LLAMA3_UNEXPECTED_INTERRUPTIONS} "
                               f"unexpected of {C.LLAMA3_INTERRUPTIONS} job interruptions in a "
                               f"{C.LLAMA3_SNAPSHOT_DAYS}-day snapshot on {C.LLAMA3_GPUS:,} H100"),
            "default_failures_per_gpu_hour": C.FAILURES_PER_GPU_HOUR,
        },
    }


def plan_inputs_json(*, steps: int, price_per_node_hour: float | None, checkpoint_interval_steps: int | None,
                     job_hours: float, failures: FailureModel) -> dict[str, Any]:
    """What a run's ``prediction.json`` records so that its page can rebuild the plan."""
    return {"steps": steps, "price_per_node_hour": price_per_node_hour,
            "checkpoint_interval_steps": checkpoint_interval_steps, "job_hours": job_hours,
            "failures": asdict(failures)}


def run_page_data(prediction: Mapping[str, Any], *, measured: Measured | None = None, run_dir: str | None = None,
                  run_name: str | None = None, generated: str = "") -> dict[str, Any]:
    """The page of one run from its ``prediction.json`` (``inputs``, ``plan_inputs``, ``calibration``)
    and, after training, what its logs measured. The launcher writes it at launch; ``report --run``
    rewrites it with the measurements."""
    inputs = inputs_from_json(prediction["inputs"])
    recorded = prediction.get("calibration")
    calibration = calibration_from_dict(recorded, str(recorded.get("source"))) if recorded else None
    eff = calibration.efficiency() if calibration else C.EFFICIENCY
    overheads = calibration.overheads() if calibration else C.OVERHEADS
    step = predict_step(inputs.model, inputs.train, inputs.layout, inputs.opts, inputs.hw, eff)
    p = prediction.get("plan_inputs")
    plan = None
    if p:
        plan = make_plan(step_time_s=step.step_time_s, global_batch=inputs.train.global_batch_size,
                         seq_length=inputs.train.seq_length, nodes=inputs.hw.nodes,
                         gpus_per_node=inputs.hw.gpus_per_node, steps=p["steps"],
                         price_per_node_hour=p.get("price_per_node_hour"),
                         checkpoint_interval_steps=p.get("checkpoint_interval_steps"), job_hours=p["job_hours"],
                         failures=FailureModel(**p.get("failures", {})))
    name = run_name or (Path(run_dir).name if run_dir else None)
    title = f"Run plan: {inputs.model.name}" + (f" ({name})" if name else "")
    return page_data(inputs, title=title, plan=plan, space=layout_space(inputs, eff=eff, overheads=overheads),
                     eff=eff, overheads=overheads, calibration=calibration,
                     calibration_source=str(recorded.get("source")) if recorded else None, measured=measured,
                     run_dir=run_dir, generated=generated)


__all__ = ["SPACE_FIELDS", "layout_space", "page_data", "plan_inputs_json", "run_page_data"]
