"""The launcher's use of the predictor: ``parallelism=auto``, the fit check, the run-dir record.

``apply_predictor(root)`` is called by ``launcher.app.launch`` before anything is rendered:

* ``parallelism.mode=auto``: search every layout of the cluster, take the fastest that fits,
  write it into the config (as ``mode: manual``, so the ranks validate an explicit layout),
  and record the top-k alternatives with their breakdowns in ``layout_search.json``;
* a manual layout predicted not to fit is refused (ConfigError: the breakdown and the best
  layout that fits) unless ``parallelism.allow_oom=true``;
* every run gets ``prediction.json`` (breakdown and throughput of the layout it runs, and the
  predictor's inputs, the plan's inputs and the calibration used, so that ``python -m
  memory_predictor calibrate`` and ``report`` can re-predict it), which the benchmark sweep puts
  next to the measured numbers, and ``plan.html``, the plan page (memory_predictor.report_html);
* ``cluster.calibration`` (a file written by ``python -m memory_predictor calibrate``) replaces the
  shipped efficiencies and overheads for this cluster type in all of the above.

CPU (gloo) runs are predicted with the CPU trainer's eager kernels; their memory is host RAM,
so the fit check is skipped unless ``parallelism.memory_gib`` is set.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from configs.derived import derived_dp, parse_time_limit, train_steps
from configs.errors import ConfigError, Problem
from configs.schema import RootConfig
from configs.validate import validate
from memory_predictor import constants as C
from memory_predictor.calibration import Calibration, read_calibration
from memory_predictor.constants import GIB
from memory_predictor.errors import PredictorError
from memory_predictor.failures import FailureModel
from memory_predictor.kernels import choose_kernels
from memory_predictor.records import evaluation_json
from memory_predictor.report import plan_inputs_json, run_page_data
from memory_predictor.report_html import render_page
from memory_predictor.runs import inputs_json
from memory_predictor.search import SearchResult, search
from memory_predictor.spec import Hardware, Layout, ModelSpec, Options, TrainSpec, hardware

PREDICTION_FILE = "prediction.json"
SEARCH_FILE = "layout_search.json"
REPORT_FILE = "plan.html"


def model_spec(root: RootConfig) -> ModelSpec:
    m = root.model
    return ModelSpec(name=m.name, num_layers=m.num_layers, hidden_size=m.hidden_size,
                     ffn_hidden_size=m.ffn_hidden_size, num_attention_heads=m.num_attention_heads,
                     num_query_groups=m.num_query_groups, vocab_size=m.vocab_size,
                     make_vocab_size_divisible_by=m.make_vocab_size_divisible_by, tie_embeddings=m.tie_embeddings,
                     qkv_bias=m.qkv_bias, kv_channels=m.head_dim)


def options(root: RootConfig) -> Options:
    """The predictor's numerics and kernels: the same decision the trainer builds with."""
    par, c = root.parallelism, root.cluster
    te = bool(c.transformer_engine) if c.transformer_engine is not None else c.gpu_type != "cpu"
    k = choose_kernels(c.gpu_type, transformer_engine=te)
    return Options.from_kernels(k.as_dict(), precision=root.training.precision,
                                overlap_grad_reduce=par.overlap_grad_reduce,
                                overlap_param_gather=par.overlap_param_gather, tp_comm_overlap=par.tp_comm_overlap,
                                usable_fraction=par.usable_memory_fraction)


def calibration(root: RootConfig) -> Calibration | None:
    """``cluster.calibration``, read and checked against the cluster type (ConfigError naming the field)."""
    path = root.cluster.calibration
    if not path:
        return None
    try:
        cal = read_calibration(path)
    except PredictorError as exc:
        raise ConfigError([Problem("cluster.calibration", path, p.fix) for p in exc.problems]) from None
    problems = cal.problems_for(root.cluster.gpu_type, "cluster.gpu_type")
    if problems:
        raise ConfigError([Problem("cluster.calibration", path, problems[0].fix)])
    return cal


def constants(root: RootConfig) -> tuple[C.Efficiency, C.Overheads]:
    cal = calibration(root)
    return (cal.efficiency(), cal.overheads()) if cal else (C.EFFICIENCY, C.OVERHEADS)


def device(root: RootConfig) -> Hardware:
    c = root.cluster
    return hardware(c.gpu_type, memory_gib=root.parallelism.memory_gib, nodes=c.nodes, gpus_per_node=c.gpus_per_node)


def layout_of(root: RootConfig) -> tuple[Layout, TrainSpec]:

    par, t = root.parallelism, root.training
    layout = Layout(tp=par.tp, pp=par.pp, vpp=par.vpp or 1, cp=par.cp, dp=derived_dp(root) or 1,
                    sequence_parallel=par.sequence_parallel, recompute=par.recompute,
                    recompute_num_layers=par.recompute_num_layers, distributed_optimizer=par.distributed_optimizer)
    return layout, TrainSpec(seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                             global_batch_size=t.global_batch_size)


def search_layouts(root: RootConfig) -> SearchResult:
    eff, overheads = constants(root)
    return search(model_spec(root), root.training.seq_length, root.training.global_batch_size, device(root),
                  options(root), max_mbs=max(8, root.training.micro_batch_size),
                  cpu_trainer=root.cluster.gpu_type == "cpu", eff=eff, overheads=overheads)


def prediction_record(root: RootConfig, layout: Layout, train: TrainSpec) -> dict[str, Any]:
    """``prediction.json``: the prediction of the layout this run uses, and what rebuilds it (the
    predictor's inputs, the plan's inputs, the calibration) for ``memory_predictor calibrate/report``."""
    model, opts, hw = model_spec(root), options(root), device(root)
    cal = calibration(root)
    eff, overheads = (cal.efficiency(), cal.overheads()) if cal else (C.EFFICIENCY, C.OVERHEADS)
    record = evaluation_json(model, train, layout, opts, hw, eff=eff, overheads=overheads)
    ckpt = root.checkpoint
    job_hours = (parse_time_limit(root.cluster.time_limit) or 48 * 3600) / 3600.0
    record["inputs"] = inputs_json(model, train, layout, opts, hw)
    record["plan_inputs"] = plan_inputs_json(
        steps=train_steps(root), price_per_node_hour=root.cluster.price_per_node_hour,
        checkpoint_interval_steps=ckpt.save_interval if ckpt.enabled and ckpt.save_interval > 0 else None,
        job_hours=job_hours, failures=FailureModel.for_device(
            root.cluster.gpu_type, detection_step_factor=root.resilience.step_factor,
            detection_floor_s=root.resilience.floor_s))
    record["calibration"] = {"source": root.cluster.calibration, **cal.as_dict()} if cal else None
    return record


def run_files(root: RootConfig, layout: Layout, train: TrainSpec) -> tuple[dict[str, str], dict[str, Any]]:
    """(``prediction.json`` and ``plan.html``, the prediction) for a run of this layout."""
    record = prediction_record(root, layout, train)
    page = render_page(run_page_data(record, run_dir="<run dir>", run_name=root.run_name, generated=time.strftime(
        "generated %Y-%m-%d %H:%M UTC at launch", time.gmtime())))
    return {PREDICTION_FILE: json.dumps(record, indent=2) + "\n", REPORT_FILE: page}, record


def with_layout(root: RootConfig, layout: Layout, train: TrainSpec) -> RootConfig:
    """The config with this layout and micro batch written in, as an explicit (manual) layout."""
    par = replace(root.parallelism, mode="manual", tp=layout.tp, pp=layout.pp,
                  vpp=layout.vpp if layout.vpp > 1 else None, cp=layout.cp, dp=layout.dp,
                  sequence_parallel=layout.sp, recompute=layout.recompute,
                  distributed_optimizer=layout.distributed_optimizer,
                  overlap_param_gather=root.parallelism.overlap_param_gather and layout.distributed_optimizer,
                  tp_comm_overlap=root.parallelism.tp_comm_overlap and layout.sp)
    return replace(root, parallelism=par, training=replace(root.training, micro_batch_size=train.micro_batch_size))


def apply_predictor(root: RootConfig) -> tuple[RootConfig, dict[str, str], list[str]]:
    """(config to launch, extra run-dir files, messages for the user); ConfigError when refused."""
    try:
        if root.parallelism.mode == "auto":
            return _resolve_auto(root)
        return _check_manual(root)
    except PredictorError as exc:  # e.g. a GPU type the predictor has no bandwidths for
        raise ConfigError([Problem(f"parallelism ({p.field})", p.value, p.fix) for p in exc.problems]) from None


def _resolve_auto(root: RootConfig) -> tuple[RootConfig, dict[str, str], list[str]]:

    hw = device(root)
    result = search_layouts(root)
    if not result.ranked:
        raise ConfigError([Problem("parallelism.mode", "auto",
                                   f"no layout of {model_spec(root).name} fits {hw.nodes} x {hw.gpus_per_node} "
                                   f"{hw.gpu} ({result.evaluated} evaluated, usable "
                                   f"{result.usable_bytes / GIB:.1f} GiB per GPU): add nodes (cluster.nodes), "
                                   "shorten training.seq_length, or raise parallelism.usable_memory_fraction")])
    best = result.ranked[0]
    chosen = with_layout(root, best.layout, best.train)
    validate(chosen)  # the trainer's own rules, on the explicit layout
    model, opts = model_spec(root), options(root)
    eff, overheads = constants(root)
    alternatives = [evaluation_json(model, c.train, c.layout, opts, hw, eff=eff, overheads=overheads)
                    for c in result.ranked[: root.parallelism.top_k]]
    record = {"mode": "auto", "chosen": alternatives[0], "alternatives": alternatives[1:],
              "evaluated": result.evaluated, "fitting": len(result.ranked), "rejected_memory": result.rejected_memory,
              "usable_bytes": result.usable_bytes}
    files, step = run_files(chosen, best.layout, best.train)
    message = (f"parallelism=auto: {best.layout.short()} mbs={best.micro_batch_size} "
               f"(predicted peak {step['peak_gib']:.1f} GiB/GPU, {step['tokens_per_s']:,.0f} tokens/s; "
               f"best of {len(result.ranked)} that fit, {root.parallelism.top_k} recorded in {SEARCH_FILE}"
               + (f"; calibrated by {root.cluster.calibration}" if root.cluster.calibration else "") + ")")
    return chosen, {SEARCH_FILE: json.dumps(record, indent=2) + "\n", **files}, [message]


def _check_manual(root: RootConfig) -> tuple[RootConfig, dict[str, str], list[str]]:

    layout, train = layout_of(root)
    opts, hw = options(root), device(root)
    files, prediction = run_files(root, layout, train)
    if prediction["fits"]:
        return root, files, []
    peak = prediction["breakdown"]["peak"]
    parts = ", ".join(f"{name} {peak[name] / GIB:.1f}" for name in
                      ("params", "grads", "optimizer", "embedding_output", "activations", "logits_loss", "working",
                       "allocator_margin", "cuda_context", "nccl") if peak[name])
    summary = (f"predicted peak {prediction['peak_gib']:.1f} GiB per GPU on the {peak['stage']} stage exceeds the "
               f"usable {prediction['usable_bytes'] / GIB:.1f} GiB ({opts.usable_fraction:.0%} of "
               f"{hw.memory_bytes / GIB:.0f} GiB) [GiB: {parts}]")
    if root.parallelism.allow_oom:
        return root, files, [f"warning: {summary}; launching anyway (parallelism.allow_oom=true)"]
    result = search_layouts(root)
    if result.best is not None:
        b = result.best
        suggestion = (f"try tp={b.layout.tp} pp={b.layout.pp} vpp={b.layout.vpp if b.layout.vpp > 1 else 'null'} "
                      f"cp={b.layout.cp} dp={b.layout.dp} recompute={b.layout.recompute} "
                      f"training.micro_batch_size={b.micro_batch_size} (predicted {b.peak_bytes / GIB:.1f} GiB, "
                      f"{b.step.tokens_per_s if b.step else 0:,.0f} tokens/s) or parallelism=auto")
    else:
        suggestion = "no layout of this model fits this cluster: add nodes or shorten the sequence"
    raise ConfigError([Problem("parallelism", layout.short(),
                               f"{summary}; {suggestion}; or set parallelism.allow_oom=true to launch anyway")])
