"""``python -m memory_predictor evaluate | search | plan | calibrate | report``: the command line (a stable interface).

Exit status: 0 success; 1 ``evaluate`` of a layout that does not fit, or ``search``/``plan``
with no layout that fits; 2 bad input (one line per problem: field, value, fix).
``calibrate`` and ``report`` read run directories (memory_predictor.cli_runs).
Keep heavy imports (torch, megatron, hydra, omegaconf) out of this path: ``search`` for a
70B model on 1024 GPUs must answer in under a second including interpreter start.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from memory_predictor import constants as C
from memory_predictor.errors import PredictorError, Problem, raise_if
from memory_predictor.models import load_model
from memory_predictor.records import evaluation_json, hardware_json, layout_json
from memory_predictor.spec import GPU_NAMES, PRECISIONS, RECOMPUTE, Hardware, Layout, ModelSpec, Options, TrainSpec, \
    hardware, layout_problems

if TYPE_CHECKING:
    from memory_predictor.calibration import Calibration

EXIT_OK, EXIT_NO_FIT, EXIT_INPUT = 0, 1, 2


def _count(text: str) -> int:
    """1000000, 1e12, 15T, 500B, 2M: a positive count (tokens, steps)."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}.get(text[-1:].upper(), 1)
    body = text[:-1] if scale > 1 else text
    try:
        value = float(body) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1000000, 1e12, 15T, 500B)") from None
    return int(round(value))


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def _str_list(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m memory_predictor",
                                     description="Per-GPU memory, 4D layout search, throughput and time to train "
                                                 "for Llama-style models on megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="a configs/model name (e.g. llama3.1_8b) or a Hugging Face config.json")
    gpu = common.add_mutually_exclusive_group(required=True)
    gpu.add_argument("--gpu", help=f"GPU type: {', '.join(GPU_NAMES)}, or cpu (this project's CPU trainer over gloo)")
    gpu.add_argument("--gpu-memory-gib", type=float, help="any GPU by its memory (H100 peak and bandwidths assumed)")
    common.add_argument("--gpus-per-node", type=int, default=8)
    common.add_argument("--seq", type=int, required=True, help="sequence length")
    common.add_argument("--gbs", type=int, required=True, help="global batch size (sequences per step)")
    common.add_argument("--precision", choices=PRECISIONS, default="bf16")
    common.add_argument("--no-flash-attention", action="store_true", help="megatron's unfused softmax attention")
    common.add_argument("--fused-swiglu", action="store_true", help="bias_activation_fusion (the trainer leaves it off)")
    common.add_argument("--gradient-accumulation-fusion", action="store_true",
                        help="weight gradients straight into main_grad (Megatron-LM/NeMo default; the trainer leaves it off)")
    common.add_argument("--grad-reduce-in-bf16", action="store_true",
                        help="16-bit gradient buffer and reduction (NeMo's performance recipes; default fp32)")
    common.add_argument("--tp-comm-overlap", action="store_true", help="Transformer Engine TP communication overlap")
    common.add_argument("--usable-fraction", type=float, default=C.DEFAULT_USABLE_FRACTION,
                        help=f"safety rule: a layout fits when its predicted peak <= this x GPU memory "
                             f"(default {C.DEFAULT_USABLE_FRACTION})")
    common.add_argument("--calibration", metavar="FILE",
                        help="a cluster calibration (python -m memory_predictor calibrate) for this GPU type")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    ev = sub.add_parser("evaluate", parents=[common], help="memory breakdown and throughput of one layout")
    for name in ("tp", "pp", "cp", "dp"):
        ev.add_argument(f"--{name}", type=int, default=1)
    ev.add_argument("--vpp", type=int, default=1, help="virtual pipeline chunks per rank (1 = plain 1F1B)")
    ev.add_argument("--mbs", type=int, default=1, help="micro batch size")
    ev.add_argument("--nodes", type=int, help="default: tp x pp x cp x dp / gpus-per-node, rounded up")
    ev.add_argument("--recompute", choices=RECOMPUTE, default="none")
    ev.add_argument("--recompute-num-layers", type=int, default=1)
    ev.add_argument("--no-distributed-optimizer", action="store_true")
    ev.add_argument("--no-sequence-parallel", action="store_true")

    for name, helptext in (("search", "rank every layout that fits by predicted throughput"),
                           ("plan", "time to train, GPU-hours and cost with the best layout")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("--nodes", type=int, required=True)
        p.add_argument("--top", type=int, default=10, help="layouts to show (with breakdowns in --json)")
        p.add_argument("--max-mbs", type=int, default=8, help="largest micro batch size to try")
        p.add_argument("--mbs", type=_int_list, help="micro batch sizes to try, e.g. 1,2 (default: divisors up to --max-mbs)")
        p.add_argument("--recompute", type=_str_list(RECOMPUTE), default=list(RECOMPUTE),
                       help="recompute options to try (comma-separated)")
        p.add_argument("--no-distributed-optimizer", action="store_true", help="only layouts without it")
        p.add_argument("--heatmap", help="write a heatmap (layouts x micro batch, coloured by memory fraction): "
                                         ".html (no dependencies) or .png/.svg (matplotlib)")
    plan = sub.choices["plan"]
    amount = plan.add_mutually_exclusive_group(required=True)
    amount.add_argument("--tokens", type=_count, help="tokens to train on (e.g. 1e12, 15T)")
    amount.add_argument("--steps", type=_count, help="optimizer steps to train")
    plan.add_argument("--price-per-node-hour", type=float, help="for the cost (no default: prices change)")
    plan.add_argument("--checkpoint-every-steps", type=int, help="default: about one checkpoint per hour")
    plan.add_argument("--job-hours", type=float, default=48.0, help="Slurm time limit of one job (segment length)")
    plan.add_argument("--plot", help="schedule plot: .png/.svg (matplotlib) or .html (no dependencies)")
    plan.add_argument("--failures-per-gpu-hour", type=float, default=C.FAILURES_PER_GPU_HOUR,
                      help=f"interruptions per GPU-hour (default {C.FAILURES_PER_GPU_HOUR:.3g}: Llama 3's "
                           f"{C.LLAMA3_UNEXPECTED_INTERRUPTIONS} unexpected interruptions in {C.LLAMA3_SNAPSHOT_DAYS} days "
                           f"on {C.LLAMA3_GPUS} H100; 0 = no failures)")
    plan.add_argument("--detection-s", type=float,
                      help="seconds to notice a failure (default: the hang watchdog's max(10 x step, 300 s))")
    plan.add_argument("--restart-s", type=float,
                      help=f"seconds to restart and reload the checkpoint, per failure and per job (default "
                           f"{C.RESTART_OVERHEAD_S:g}; {C.CPU_RESTART_S:g} with --gpu cpu)")
    plan.add_argument("--checkpoint-stall-s", type=float,
                      help=f"seconds training stalls per checkpoint save (default {C.CHECKPOINT_STALL_S:g}; "
                           f"{C.CPU_CHECKPOINT_STALL_S:g} with --gpu cpu)")
    plan.add_argument("--report", metavar="HTML", help="write the plan page: one self-contained .html file")

    cal = sub.add_parser("calibrate", help="refit this cluster's efficiencies and memory overheads from finished runs")
    cal.add_argument("--runs", action="append", required=True, metavar="DIR",
                     help="a runs root, a sweep directory or a run directory (repeatable)")
    cal.add_argument("--out", default="cluster_calibration.yaml", help="where to write it (default: %(default)s)")
    cal.add_argument("--hold-out", metavar="NAMES", help="comma-separated run names (or prefixes) to evaluate, not fit")
    cal.add_argument("--gpu-type", help="use only the runs of this GPU type (needed when the runs mix types)")
    cal.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the medians (default 2)")
    cal.add_argument("--calibration", metavar="FILE", help="start from this calibration instead of the shipped constants")
    cal.add_argument("--json", action="store_true", help="machine-readable output")

    rep = sub.add_parser("report", help="the plan page of a run directory, with predicted vs measured")
    rep.add_argument("--run", required=True, metavar="DIR", help="a run directory (holding prediction.json)")
    rep.add_argument("--out", required=True, metavar="HTML", help="the page to write (e.g. <run dir>/plan.html)")
    rep.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the medians (default 2)")
    return parser


def _options(args: argparse.Namespace) -> Options:
    if not 0 < args.usable_fraction <= 1:
        raise PredictorError([Problem("usable_fraction", args.usable_fraction, "must be in (0, 1], e.g. 0.94")])
    if args.gpu == "cpu":
        return Options.cpu_trainer(precision=args.precision, usable_fraction=args.usable_fraction)
    return Options(precision=args.precision, flash_attention=not args.no_flash_attention,
                   fused_swiglu=args.fused_swiglu, tp_comm_overlap=args.tp_comm_overlap,
                   gradient_accumulation_fusion=args.gradient_accumulation_fusion,
                   fp32_grad_accumulation=not args.grad_reduce_in_bf16, usable_fraction=args.usable_fraction)


def _sizes(args: argparse.Namespace, names: Sequence[str]) -> None:
    raise_if([Problem(name, getattr(args, name), "must be a positive integer")
              for name in names if getattr(args, name) is not None and getattr(args, name) <= 0])


def _hardware(args: argparse.Namespace, nodes: int) -> Hardware:
    return hardware(args.gpu, memory_gib=args.gpu_memory_gib, nodes=nodes, gpus_per_node=args.gpus_per_node)


def _constants(args: argparse.Namespace, hw: Hardware) -> tuple[C.Efficiency, C.Overheads, Calibration | None]:
    """The shipped constants, or this cluster's calibration (--calibration) applied to them."""
    if not args.calibration:
        return C.EFFICIENCY, C.OVERHEADS, None
    from memory_predictor.calibration import read_calibration

    cal = read_calibration(args.calibration)
    raise_if(cal.problems_for(hw.gpu, "gpu"))
    return cal.efficiency(), cal.overheads(), cal


def cmd_evaluate(args: argparse.Namespace) -> int:
    _sizes(args, ("tp", "pp", "cp", "dp", "vpp", "mbs", "gbs", "seq", "nodes", "gpus_per_node", "recompute_num_layers"))
    model = load_model(args.model)
    opts = _options(args)
    world = args.tp * args.pp * args.cp * args.dp
    nodes = args.nodes or -(-world // args.gpus_per_node)
    gpus_per_node = args.gpus_per_node if world >= args.gpus_per_node else world
    hw = hardware(args.gpu, memory_gib=args.gpu_memory_gib, nodes=nodes, gpus_per_node=gpus_per_node)
    if args.nodes is None and world % args.gpus_per_node and world > args.gpus_per_node:
        raise PredictorError([Problem("dp", args.dp, f"tp x pp x cp x dp = {world} does not fill whole nodes of "
                                      f"{args.gpus_per_node} GPUs; change dp or --gpus-per-node")])
    train = TrainSpec(seq_length=args.seq, micro_batch_size=args.mbs, global_batch_size=args.gbs)
    layout = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp, cp=args.cp, dp=args.dp,
                    sequence_parallel=not args.no_sequence_parallel, recompute=args.recompute,
                    recompute_num_layers=args.recompute_num_layers,
                    distributed_optimizer=not args.no_distributed_optimizer)
    raise_if(layout_problems(model, train, layout, hw, cpu_trainer=hw.gpu == "cpu"))
    eff, overheads, _ = _constants(args, hw)
    out = evaluation_json(model, train, layout, opts, hw, eff=eff, overheads=overheads)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        from memory_predictor import render

        render.print_evaluation(out)
    return EXIT_OK if out["fits"] else EXIT_NO_FIT


def _search(args: argparse.Namespace):
    from memory_predictor.search import search

    for flag in ("heatmap", "plot", "report"):
        if getattr(args, flag, None):  # an unwritable output fails before the search, not after it
            from memory_predictor import render

            render.check_output(getattr(args, flag), f"--{flag}")
    _sizes(args, ("gbs", "seq", "nodes", "gpus_per_node", "top", "max_mbs"))
    if args.mbs:
        _sizes(argparse.Namespace(mbs=min(args.mbs)), ("mbs",))
    model = load_model(args.model)
    opts = _options(args)
    hw = _hardware(args, args.nodes)
    eff, overheads, _ = _constants(args, hw)
    result = search(model, args.seq, args.gbs, hw, opts, recompute=args.recompute,
                    distributed_optimizer=(False,) if args.no_distributed_optimizer else (True, False),
                    max_mbs=args.max_mbs, micro_batches=args.mbs, cpu_trainer=hw.gpu == "cpu", eff=eff,
                    overheads=overheads)
    if args.heatmap:
        from memory_predictor import render
        from memory_predictor.search import heatmap_rows

        mbs = tuple(args.mbs or [b for b in (1, 2, 4, 8, 16) if b <= max(args.max_mbs, 1)])
        rows = heatmap_rows(model, result, opts, hw, micro_batches=mbs, overheads=overheads)
        render.write_heatmap(args.heatmap, rows, mbs, opts.usable_fraction,
                             title=f"{model.name} on {hw.nodes} x {hw.gpus_per_node} {hw.gpu}, seq {args.seq}, gbs {args.gbs}")
    return model, opts, hw, result


def _ranked_json(args: argparse.Namespace, model: ModelSpec, opts: Options, hw: Hardware, result: Any,
                 top: int) -> list[dict[str, Any]]:
    eff, overheads, _ = _constants(args, hw)
    out = []
    for rank, cand in enumerate(result.ranked[:top], start=1):
        entry = evaluation_json(model, cand.train, cand.layout, opts, hw, eff=eff, overheads=overheads)
        entry = {"rank": rank, **entry["layout"], **{k: v for k, v in entry.items() if k not in ("layout", "model", "hardware")}}
        out.append(entry)
    return out


def _no_fit_problem(args: argparse.Namespace, result: Any, hw: Hardware) -> str:
    return (f"no layout fits: {result.evaluated} evaluated on {hw.nodes} x {hw.gpus_per_node} {hw.gpu} "
            f"(usable {result.usable_bytes / C.GIB:.1f} GiB per GPU); add nodes, shorten --seq, allow "
            f"--recompute full, or use a larger GPU")


def cmd_search(args: argparse.Namespace) -> int:
    model, opts, hw, result = _search(args)
    out = {"model": model.name, "hardware": hardware_json(hw), "seq_length": args.seq, "global_batch_size": args.gbs,
           "usable_fraction": opts.usable_fraction, "usable_bytes": result.usable_bytes,
           "evaluated": result.evaluated, "fitting": len(result.ranked), "rejected_memory": result.rejected_memory,
           "layouts": _ranked_json(args, model, opts, hw, result, args.top)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        from memory_predictor import render

        render.print_search(out)
    if not result.ranked:
        print(f"error: {_no_fit_problem(args, result, hw)}", file=sys.stderr)
        return EXIT_NO_FIT
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from memory_predictor.failures import FailureModel
    from memory_predictor.plan import make_plan

    model, opts, hw, result = _search(args)
    if not result.ranked:
        print(f"error: {_no_fit_problem(args, result, hw)}", file=sys.stderr)
        return EXIT_NO_FIT
    best = result.ranked[0]
    if best.step is None:  # search() times every layout it keeps
        raise RuntimeError("the best layout has no step time")
    failures = FailureModel.for_device(hw.gpu, failures_per_gpu_hour=args.failures_per_gpu_hour,
                                       detection_s=args.detection_s, restart_s=args.restart_s,
                                       checkpoint_stall_s=args.checkpoint_stall_s)
    plan = make_plan(step_time_s=best.step.step_time_s, global_batch=args.gbs, seq_length=args.seq, nodes=hw.nodes,
                     gpus_per_node=hw.gpus_per_node, tokens=args.tokens, steps=args.steps,
                     price_per_node_hour=args.price_per_node_hour, checkpoint_interval_steps=args.checkpoint_every_steps,
                     job_hours=args.job_hours, failures=failures)
    ranked = _ranked_json(args, model, opts, hw, result, args.top)
    out = {"model": model.name, "hardware": hardware_json(hw), "seq_length": args.seq, "global_batch_size": args.gbs,
           "best": ranked[0], "alternatives": ranked[1:],
           "tokens": plan.tokens, "steps": plan.steps, "step_time_s": plan.step_time_s,
           "tokens_per_s": plan.tokens_per_s, "tflops_per_gpu": best.step.tflops_per_gpu, "mfu": best.step.mfu,
           "ideal_s": plan.ideal_s, "ideal_days": plan.ideal_days,
           "duration_s": plan.duration_s, "duration_days": plan.duration_days,
           "expected_s": plan.expected_s, "expected_days": plan.expected_days,
           "gpu_hours": plan.gpu_hours, "node_hours": plan.node_hours, "expected_gpu_hours": plan.expected_gpu_hours,
           "price_per_node_hour": plan.price_per_node_hour, "cost": plan.cost, "expected_cost": plan.expected_cost,
           "checkpoint_interval_steps": plan.checkpoint_interval_steps, "job_hours": plan.job_hours,
           "interruptions": plan.interruptions.as_dict(), "milestones": [asdict(m) for m in plan.milestones],
           "schedule": [asdict(phase) for phase in plan.phases]}
    if args.plot:
        from memory_predictor import render

        render.write_schedule_plot(args.plot, plan, title=f"{model.name}: {plan.tokens:.3g} tokens on "
                                   f"{hw.nodes} x {hw.gpus_per_node} {hw.gpu}")
    if args.report:
        _write_plan_page(args, model, opts, hw, best, plan)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        from memory_predictor import render

        render.print_plan(out)
    return EXIT_OK


def _write_plan_page(args: argparse.Namespace, model: ModelSpec, opts: Options, hw: Hardware, best: Any,
                     plan: Any) -> None:
    import time

    from memory_predictor import render
    from memory_predictor.report import layout_space, page_data
    from memory_predictor.report_html import render_page
    from memory_predictor.runs import RunInputs

    eff, overheads, cal = _constants(args, hw)
    inputs = RunInputs(model=model, train=best.train, layout=best.layout, opts=opts, hw=hw)
    space = layout_space(inputs, eff=eff, overheads=overheads, max_mbs=args.max_mbs, recompute=args.recompute)
    data = page_data(inputs, title=f"Plan: {model.name}, {plan.tokens:.3g} tokens", plan=plan, space=space, eff=eff,
                     overheads=overheads, calibration=cal, calibration_source=args.calibration,
                     generated=time.strftime("generated %Y-%m-%d %H:%M UTC by python -m memory_predictor plan",
                                             time.gmtime()))
    render.write_text(args.report, render_page(data))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from memory_predictor.cli_runs import calibrate

    return calibrate(args)


def cmd_report(args: argparse.Namespace) -> int:
    from memory_predictor.cli_runs import report

    return report(args)


COMMANDS = {"evaluate": cmd_evaluate, "search": cmd_search, "plan": cmd_plan, "calibrate": cmd_calibrate,
            "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PredictorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
