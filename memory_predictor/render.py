"""Human output: rich tables, and heatmap / schedule plots (HTML needs nothing; PNG needs matplotlib).

Works on the JSON-ready dicts the CLI builds, so what a person reads and what ``--json``
prints cannot drift apart. GiB everywhere (2**30 bytes).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memory_predictor.constants import GIB
from memory_predictor.errors import PredictorError, Problem
from memory_predictor.plan import TrainingPlan
from memory_predictor.report_html import duration

ROWS = (("params", "parameters (layers)"), ("grads", "gradients"), ("optimizer", "optimizer states"),
        ("embedding_output", "embedding / output layer"), ("activations", "activations in flight"),
        ("logits_loss", "logits and loss"), ("working", "layer working buffers"), ("comm_buffers", "p2p buffers"),
        ("step_temporary", "fp32 grads at the step (max with 4 above)"),
        ("allocator_margin", "allocator margin"), ("cuda_context", "CUDA context"), ("nccl", "NCCL buffers"),
        ("total", "total"))


def gib(n: float | int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _console():
    from rich.console import Console

    return Console(width=180)


def _layout_label(d: dict[str, Any]) -> str:
    vpp = f" vpp{d['vpp']}" if d.get("vpp", 1) > 1 else ""
    return f"tp{d['tp']} pp{d['pp']}{vpp} cp{d['cp']} dp{d['dp']} mbs{d['mbs']}"


def breakdown_table(breakdown: dict[str, Any], title: str):
    from rich.table import Table

    stages = [(name, s) for name, s in breakdown.items() if s is not None and name != "peak"]
    table = Table(title=title)
    table.add_column("GiB per GPU")
    for name, s in stages:
        table.add_column(f"{name} (pp rank {s['pp_rank']})", justify="right")
    for key, label in ROWS:
        style = "bold" if key == "total" else None
        table.add_row(label, *[gib(s[key]) for _, s in stages], style=style)
    table.add_row("in flight (chunk-micro-batches x layers)",
                  *[f"{s['in_flight']} x {s['layers_per_chunk']}" for _, s in stages])
    table.add_row("NCCL communicators", *[str(s["nccl_communicators"]) for _, s in stages])
    return table


def _summary(d: dict[str, Any]) -> str:
    mfu = "n/a" if d.get("mfu") is None else f"{100 * d['mfu']:.1f}%"
    return (f"peak {gib(d['peak_bytes'])} GiB ({d['peak_stage']} stage), {'fits' if d['fits'] else 'does NOT fit'} "
            f"(usable {gib(d['usable_bytes'])} GiB = {d['usable_fraction']:.0%} of "
            f"{d.get('hardware', {}).get('memory_gib', 0):.0f} GiB); step {d['step_time_s']:.2f} s, "
            f"{d['tokens_per_s']:,.0f} tokens/s, {d['tflops_per_gpu']:.0f} TFLOP/s per GPU, MFU {mfu}")


def print_evaluation(d: dict[str, Any]) -> None:
    console = _console()
    console.print(breakdown_table(d["breakdown"], f"{d['model']}: {_layout_label(d['layout'])} "
                                  f"recompute={d['layout']['recompute']} on {d['hardware']['gpu']}"))
    console.print(_summary(d))
    t = d["throughput"]
    console.print(f"step time parts (s): compute {t['compute_s']:.3f}, bubble {t['bubble_s']:.3f}, "
                  f"TP {t['tp_comm_s']:.3f}, CP {t['cp_comm_s']:.3f}, PP {t['pp_comm_s']:.3f}, "
                  f"DP {t['dp_comm_s']:.3f}, optimizer {t['optimizer_s']:.3f}")


def ranking_table(layouts: Sequence[dict[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("#", "layout", "recompute", "dist opt", "peak GiB", "stage", "params+grads+opt", "act", "logits",
                "other", "tokens/s", "TFLOP/s/GPU", "MFU"):
        table.add_column(col, justify="left" if col in ("layout", "recompute", "stage") else "right")
    for d in layouts:
        peak = d["breakdown"]["peak"]
        states = peak["params"] + peak["grads"] + peak["optimizer"] + peak["embedding_output"]
        other = peak["total"] - states - peak["activations"] - peak["logits_loss"]
        mfu = "n/a" if d.get("mfu") is None else f"{100 * d['mfu']:.1f}%"
        table.add_row(str(d["rank"]), _layout_label(d), d["recompute"], "yes" if d["distributed_optimizer"] else "no",
                      gib(d["peak_bytes"]), d["peak_stage"], gib(states), gib(peak["activations"]),
                      gib(peak["logits_loss"]), gib(other), f"{d['tokens_per_s']:,.0f}", f"{d['tflops_per_gpu']:.0f}", mfu)
    return table


def print_search(d: dict[str, Any]) -> None:
    hw = d["hardware"]
    console = _console()
    console.print(ranking_table(d["layouts"], f"{d['model']} on {hw['nodes']} x {hw['gpus_per_node']} {hw['gpu']}: "
                                f"top {len(d['layouts'])} of {d['fitting']} layouts that fit "
                                f"({d['evaluated']} evaluated, usable {gib(d['usable_bytes'])} GiB)"))
    if d["layouts"]:
        best = d["layouts"][0]
        console.print(breakdown_table(best["breakdown"], f"best layout: {_layout_label(best)}"))


def print_plan(d: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    console.print(ranking_table([d["best"], *d["alternatives"][:4]], f"{d['model']}: best layout and alternatives"))
    cost = "n/a (pass --price-per-node-hour)" if d["cost"] is None else f"{d['cost']:,.0f}"
    it = d["interruptions"]
    console.print(f"{d['tokens']:.4g} tokens in {d['steps']:,} steps of {d['step_time_s']:.3g} s: "
                  f"ideal {duration(d['ideal_s'])} | planned {duration(d['duration_s'])} (+ {it['job_starts']} job "
                  f"starts, {it['checkpoint_saves']:,} checkpoint stalls of {it['checkpoint_stall_s']:g} s) | "
                  f"[bold]expected {duration(d['expected_s'])}[/bold] (+ {it['expected_failures']:.2f} failures "
                  f"expected at {it['failures_per_gpu_hour']:.3g} per GPU-hour"
                  + ("" if it["mtbf_hours"] is None else f", MTBF {duration(it['mtbf_hours'] * 3600)}")
                  + f", {duration(it['cost_per_failure_s'])} each)")
    expected_cost = "" if d["expected_cost"] is None else f" ({d['expected_cost']:,.0f} expected)"
    console.print(f"{d['gpu_hours']:,.1f} GPU-hours, {d['node_hours']:,.1f} node-hours planned "
                  f"({d['expected_gpu_hours']:,.1f} GPU-hours expected), cost {cost}{expected_cost}")
    if it["suggested_interval_steps"]:
        console.print(f"checkpoint every {d['checkpoint_interval_steps']:,} steps ({duration(it['checkpoint_interval_s'])}); "
                      f"Young's interval for this failure rate: every {it['suggested_interval_steps']:,} steps "
                      f"({duration(it['suggested_interval_s'])}), expected {duration(it['expected_s_at_suggested'])} "
                      "(--checkpoint-every-steps)")
    table = Table(title=f"schedule: jobs of <= {d['job_hours']:g} h, checkpoint every {d['checkpoint_interval_steps']} steps")
    for col in ("job", "nodes", "steps", "tokens", "start (days)", "hours", "checkpoints"):
        table.add_column(col, justify="right")
    phases = d["schedule"]
    shown = phases if len(phases) <= 12 else phases[:6] + phases[-3:]
    for i, p in enumerate(shown):
        if len(phases) > 12 and i == 6:
            table.add_row("...", "", "", "", "", "", "")
        table.add_row(str(p["index"]), str(p["nodes"]), f"{p['first_step']}-{p['last_step']}", f"{p['tokens']:.3g}",
                      f"{p['start_hours'] / 24:.2f}", f"{p['duration_hours']:.1f}", str(len(p["checkpoint_steps"])))
    console.print(table)


# --------------------------------------------------------------------------- files


def _colour(fraction: float | None, usable: float) -> str:
    """Green below 60% of memory, through yellow, red at the usable limit, grey above it."""
    if fraction is None:
        return "#eeeeee"
    if fraction > usable:
        return "#888888"
    x = min(1.0, max(0.0, (fraction - 0.3) / max(usable - 0.3, 1e-9)))
    red, green = int(255 * min(1.0, 2 * x)), int(255 * min(1.0, 2 * (1 - x)))
    return f"#{red:02x}{green:02x}40"


def heatmap_html(rows: Sequence[tuple[str, Sequence[float | None]]], micro_batches: Sequence[int], usable: float,
                 title: str) -> str:
    head = "".join(f"<th>mbs {b}</th>" for b in micro_batches)
    body = []
    for label, fractions in rows:
        cells = "".join(
            f'<td style="background:{_colour(f, usable)}">{"-" if f is None else f"{100 * f:.0f}%"}</td>'
            for f in fractions)
        body.append(f"<tr><th style='text-align:left'>{html.escape(label)}</th>{cells}</tr>")
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 10px;text-align:center}</style>"
            f"<h3>{html.escape(title)}</h3><p>Predicted peak memory per GPU as a fraction of GPU memory; "
            f"grey: above the usable fraction ({usable:.0%}), '-': micro batch does not divide the batch.</p>"
            f"<table><tr><th>layout (ranked by predicted throughput)</th>{head}</tr>{''.join(body)}</table>\n")


def _pyplot(path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PredictorError([Problem("output", path, "writing an image needs matplotlib (pip install matplotlib); "
                                      "or give a .html path, which needs nothing")]) from None
    return plt


def check_output(path: str, flag: str) -> None:
    """Refuse an output path that cannot be written before any work is done (PredictorError)."""
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise PredictorError([Problem(flag, path, "is a directory; give a file name (.html, .png or .svg)")])
    if not parent.is_dir():
        raise PredictorError([Problem(flag, path, f"its directory {parent} does not exist; create it first")])
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise PredictorError([Problem(flag, path, "is not writable here; choose another path")])


def write_text(path: str, text: str) -> None:
    """Write an output file; PredictorError (not a traceback) when it cannot be written."""
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise PredictorError([Problem("output", path, f"cannot be written: {exc.strerror or exc}")]) from None


def write_heatmap(path: str, rows: Sequence[tuple[str, Sequence[float | None]]], micro_batches: Sequence[int],
                  usable: float, title: str) -> None:
    if path.endswith((".html", ".htm")):
        write_text(path, heatmap_html(rows, micro_batches, usable, title))
        return
    plt = _pyplot(path)
    import numpy as np

    data = np.array([[np.nan if f is None else f for f in fractions] for _, fractions in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(4.5 + 0.9 * len(micro_batches), 1.5 + 0.4 * max(len(rows), 1)))
    image = ax.imshow(data, cmap="RdYlGn_r", vmin=0.3, vmax=max(1.0, usable), aspect="auto")
    ax.set_xticks(range(len(micro_batches)), [f"mbs {b}" for b in micro_batches])
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    for i, (_, fractions) in enumerate(rows):
        for j, f in enumerate(fractions):
            ax.text(j, i, "-" if f is None else f"{100 * f:.0f}%", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label=f"peak / GPU memory (usable {usable:.0%})")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cumulative(plan: TrainingPlan) -> tuple[list[float], list[float], list[float]]:
    days, tokens, boundaries = [0.0], [0.0], []
    done = 0
    for phase in plan.phases:
        boundaries.append(phase.start_hours / 24)
        done += phase.tokens
        days.append((phase.start_hours + phase.duration_hours) / 24)
        tokens.append(float(done))
    return days, tokens, boundaries


def write_schedule_plot(path: str, plan: TrainingPlan, title: str) -> None:
    days, tokens, boundaries = _cumulative(plan)
    if path.endswith((".html", ".htm")):
        write_text(path, _schedule_svg_html(days, tokens, boundaries, title))
        return
    plt = _pyplot(path)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(days, [t / 1e9 for t in tokens], marker="o", markersize=3)
    for b in boundaries[1:]:
        ax.axvline(b, color="grey", linewidth=0.5)
    ax.set_xlabel("days since start")
    ax.set_ylabel("tokens trained (billions)")
    ax.set_title(f"{title}\njobs of <= {plan.job_hours:g} h (grey lines), checkpoint every "
                 f"{plan.checkpoint_interval_steps} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _schedule_svg_html(days: Sequence[float], tokens: Sequence[float], boundaries: Sequence[float], title: str) -> str:
    w, h, pad = 640, 320, 50
    max_d, max_t = max(days[-1], 1e-9), max(tokens[-1], 1.0)
    x = lambda d: pad + (w - 2 * pad) * d / max_d  # noqa: E731
    y = lambda t: h - pad - (h - 2 * pad) * t / max_t  # noqa: E731
    points = " ".join(f"{x(d):.1f},{y(t):.1f}" for d, t in zip(days, tokens))
    lines = "".join(f'<line x1="{x(b):.1f}" y1="{pad}" x2="{x(b):.1f}" y2="{h - pad}" stroke="#ccc"/>'
                    for b in boundaries[1:])
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><h3>{html.escape(title)}</h3>"
            f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{lines}'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/>'
            f'<text x="{pad}" y="{h - 10}">0</text><text x="{w - pad}" y="{h - 10}">{max_d:.1f} days</text>'
            f'<text x="5" y="{pad}">{max_t / 1e9:.0f}B tokens</text></svg>\n')
