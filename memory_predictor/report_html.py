"""``render_page(data) -> str``: the plan page as one self-contained HTML file.

Inline CSS, inline SVG and one inline script (the heatmap's selectors); nothing is fetched when
the page is viewed, so it can be mailed, attached to a ticket or opened from a run directory
on an air-gapped cluster. Every value from the data is escaped (model names come from user
files); the data travels as JSON in a ``<script type="application/json">`` block with ``</``
escaped. ``data`` is what ``memory_predictor.report.page_data`` returns.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

GIB = 1024**3
#: Memory breakdown items in stacking order: (key, label, colour).
SEGMENTS = (("params", "parameters", "#4e79a7"), ("grads", "gradients", "#76b7b2"),
            ("optimizer", "optimizer states", "#59a14f"), ("embedding_output", "embedding / output", "#8cd17d"),
            ("activations", "activations in flight", "#f28e2b"), ("logits_loss", "logits and loss", "#ffbe7d"),
            ("working", "working buffers", "#e15759"), ("comm_buffers", "p2p buffers", "#ff9d9a"),
            ("step_temporary", "fp32 grads at the step", "#b07aa1"), ("allocator_margin", "allocator margin", "#bab0ac"),
            ("cuda_context", "CUDA context", "#9c755f"), ("nccl", "NCCL buffers", "#79706e"))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def duration(seconds: float | None) -> str:
    """12.9 days, 5.2 h, 3.1 min, 12.0 s."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def count(n: float | None) -> str:
    """314.0B, 1.2M, 950."""
    if n is None:
        return "-"
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:.3g}"


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _money(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


def _hours(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def _layout_label(lay: Mapping[str, Any]) -> str:
    vpp = f" vpp{lay['vpp']}" if lay.get("vpp", 1) > 1 else ""
    return (f"tp{lay['tp']} pp{lay['pp']}{vpp} cp{lay['cp']} dp{lay['dp']} mbs{lay['mbs']} "
            f"recompute={lay['recompute']}" + ("" if lay.get("distributed_optimizer", True) else " plain-optimizer"))


def _script_json(data: Any) -> str:
    """JSON that cannot end (or confuse) its <script> block: <, > and & as \\u escapes (JSON.parse restores them)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(data: Any) -> Any:
    """JSON has no inf/nan: they become null."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


# --------------------------------------------------------------------------- sections


def _card(label: str, value: str, detail: str = "", cls: str = "") -> str:
    return (f'<div class="card {cls}"><div class="label">{_e(label)}</div><div class="value">{_e(value)}</div>'
            f'<div class="detail">{_e(detail)}</div></div>')


def _plan_section(d: Mapping[str, Any]) -> str:
    plan = d.get("plan")
    if not plan:
        return ""
    it = plan["interruptions"]
    gpus = plan["gpus"]
    price = plan.get("price_per_node_hour")
    cost = (f"{_money(plan['cost'])} planned, {_money(plan['expected_cost'])} expected at {price:g} per node-hour"
            if price is not None else "no price: pass --price-per-node-hour (or cluster.price_per_node_hour)")
    mtbf = "no failures modelled" if it["mtbf_hours"] is None else f"MTBF {duration(it['mtbf_hours'] * 3600)} on {gpus} GPUs"
    cards = [
        _card("ideal", duration(plan["ideal_s"]), f"{plan['steps']:,} steps x {plan['step_time_s']:.3g} s"),
        _card("planned", duration(plan["duration_s"]), f"+ {it['job_starts']} job starts, {it['checkpoint_saves']:,} "
              f"checkpoint stalls ({duration(it['checkpoint_stalls_s'])})"),
        _card("expected", duration(plan["expected_s"]), f"+ {it['expected_failures']:.2f} failures x "
              f"{duration(it['cost_per_failure_s'])} ({mtbf})", "expected"),
        _card("GPU-hours", _hours(plan["expected_gpu_hours"]), f"expected; {_hours(plan['gpu_hours'])} planned"),
        _card("cost", _money(plan["expected_cost"]) if price is not None else "-", cost),
    ]
    suggested = it.get("suggested_interval_steps")
    advice = ""
    if suggested:
        advice = (f"<p>Checkpoint interval: every {plan['checkpoint_interval_steps']:,} steps "
                  f"({duration(it['checkpoint_interval_s'])}). For this failure rate Young's interval "
                  f"sqrt(2 x {it['checkpoint_stall_s']:g} s stall x MTBF) is <b>{suggested:,} steps "
                  f"({duration(it['suggested_interval_s'])})</b>, expected duration "
                  f"{duration(it['expected_s_at_suggested'])}."
                  "</p>")
    failure = (f"<p class='small'>Failures: {it['failures_per_gpu_hour']:.3g} per GPU-hour "
               f"(default: {_e(d['assumptions']['failure_source'])}); each costs detection {duration(it['detection_s'])} "
               f"+ restart and checkpoint reload {duration(it['restart_s'])} + half a checkpoint interval of work "
               f"redone ({duration(it['redo_s'])}). Jobs of at most {plan['job_hours']:g} h.</p>")
    nodes = f"{plan['nodes']} node{'s' if plan['nodes'] != 1 else ''}"
    return (f"<section><h2>Plan: {count(plan['tokens'])} tokens on {nodes} ({gpus} GPUs)</h2>"
            f"<div class='cards'>{''.join(cards)}</div>{advice}{failure}{_timeline(plan)}{_milestones(plan)}</section>")


def _ticks(limit: float, unit: float, n: int = 6) -> list[float]:
    span = limit / unit
    raw = span / n if span > 0 else 1.0
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step * unit for i in range(int(span / step) + 1)]


def _timeline(plan: Mapping[str, Any]) -> str:
    w, left, right, row_h = 920, 200, 30, 34
    end = max(plan["expected_s"], plan["duration_s"], 1e-9)
    unit, unit_name = next(((size, name) for name, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0))
                            if end >= 2 * size), (1.0, "s"))

    def x(seconds: float) -> float:
        return left + (w - left - right) * seconds / end

    rows = ("ideal (steps only)", "planned (jobs)", "expected (failures)")
    top = 44
    parts = [f'<svg class="timeline" viewBox="0 0 {w} {top + row_h * 3 + 40}" width="{w}" role="img" '
             f'aria-label="schedule">']
    for i, label in enumerate(rows):
        y = top + i * row_h
        parts.append(f'<text x="{left - 8}" y="{y + 20}" text-anchor="end" class="rowlabel">{_e(label)}</text>')
    parts.append(f'<rect x="{x(0):.1f}" y="{top + 6}" width="{x(plan["ideal_s"]) - x(0):.1f}" height="{row_h - 12}" '
                 f'class="bar ideal"><title>ideal: {_e(duration(plan["ideal_s"]))}</title></rect>')
    for p in plan["phases"]:
        start = p["start_hours"] * 3600
        width = max(x(start + p["duration_hours"] * 3600) - x(start), 0.5)
        parts.append(f'<rect x="{x(start):.2f}" y="{top + row_h + 6}" width="{width:.2f}" '
                     f'height="{row_h - 12}" class="bar job{p["index"] % 2}"><title>job {p["index"]}: steps '
                     f'{p["first_step"]:,}-{p["last_step"]:,}, {_e(duration(p["duration_hours"] * 3600))}, '
                     f'{p["checkpoints"]} checkpoints</title></rect>')
    parts.append(f'<rect x="{x(0):.1f}" y="{top + 2 * row_h + 6}" width="{x(plan["expected_s"]) - x(0):.1f}" '
                 f'height="{row_h - 12}" class="bar expected"><title>expected: {_e(duration(plan["expected_s"]))}'
                 '</title></rect>')
    bottom = top + 3 * row_h
    for t in _ticks(end, unit):
        parts.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{bottom}" class="grid"/>'
                     f'<text x="{x(t):.1f}" y="{bottom + 16}" text-anchor="middle" class="tick">{t / unit:g}</text>')
    parts.append(f'<text x="{w - right}" y="{bottom + 34}" text-anchor="end" class="tick">{unit_name} since the first '
                 f'job started</text>')
    last_label, lift = -1e9, 0
    for m in plan["milestones"]:
        label = f"{100 * m['fraction']:.0f}%"
        for row, key in ((0, "ideal_hours"), (1, "planned_hours"), (2, "expected_hours")):
            cx, cy = x(m[key] * 3600), top + row * row_h + row_h / 2
            parts.append(f'<path d="M{cx:.1f},{cy - 9:.1f} l5,9 l-5,9 l-5,-9 z" class="milestone">'
                         f'<title>{label}: step {m["step"]:,}, {_e(duration(m[key] * 3600))}</title></path>')
        at = x(m["expected_hours"] * 3600)
        lift = (lift + 1) % 3 if at - last_label < 36 else 0  # close labels step up instead of overlapping
        last_label = at
        parts.append(f'<text x="{at:.1f}" y="{top - 6 - 11 * lift}" text-anchor="middle" class="mlabel">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _milestones(plan: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{100 * m['fraction']:.0f}%</td><td>{m['step']:,}</td><td>{count(m['tokens'])}</td>"
                   f"<td>{duration(m['ideal_hours'] * 3600)}</td><td>{duration(m['planned_hours'] * 3600)}</td>"
                   f"<td><b>{duration(m['expected_hours'] * 3600)}</b></td></tr>" for m in plan["milestones"])
    return ("<table class='data'><tr><th>milestone</th><th>step</th><th>tokens</th><th>ideal</th><th>planned</th>"
            f"<th>expected</th></tr>{rows}</table>")


def _heatmap_section(d: Mapping[str, Any]) -> str:
    if not d.get("space"):
        return ""
    selects = "".join(f'<label>{_e(label)} <select id="sel-{name}" data-dim="{name}"></select></label>'
                      for name, label in (("cp", "CP"), ("vpp", "VPP"), ("mbs", "micro batch"),
                                          ("recompute", "recompute"), ("distributed_optimizer", "distributed optimizer")))
    memory = (f"peak memory per GPU as a share of the usable {100 * d['usable_fraction']:.0f}% of "
              f"{d['hardware']['memory_gib']:.0f} GiB (grey: does not fit)" if d["hardware"]["memory_bytes"]
              else "peak memory per process (CPU: host RAM, not checked), coloured from the smallest to the largest")
    return ("<section><h2>Layout space: TP x PP</h2>"
            f"<p class='small'>Each cell: the {_e(memory)}; the text gives the predicted peak GiB and tokens/s. "
            "'best' picks, per cell, the fastest layout that fits over that choice. Outlined: the chosen layout; "
            "star: the fastest cell shown.</p>"
            f"<div class='controls'>{selects}</div><div id='heatmap'></div><p id='space-summary' class='small'></p>"
            "</section>")


def _stacked_bars(chosen: Mapping[str, Any], cpu: bool) -> str:
    breakdown = chosen["breakdown"]
    stages = [(name, breakdown[name]) for name in ("first", "middle", "last") if breakdown.get(name)]
    if len(stages) == 2 and stages[0][1]["pp_rank"] == stages[1][1]["pp_rank"]:
        stages = [("only", stages[0][1])]
    memory = chosen["hardware"]["memory_bytes"]
    usable = chosen["usable_bytes"]
    scale_max = max([memory] + [s["total"] for _, s in stages]) or 1
    w, left, right, bar_h, gap = 920, 200, 80, 30, 14
    height = 20 + len(stages) * (bar_h + gap) + 30

    def x(b: float) -> float:
        return left + (w - left - right) * b / scale_max

    parts = [f'<svg class="bars" viewBox="0 0 {w} {height}" width="{w}" role="img" aria-label="memory breakdown">']
    for i, (name, s) in enumerate(stages):
        y = 20 + i * (bar_h + gap)
        parts.append(f'<text x="{left - 8}" y="{y + 20}" text-anchor="end" class="rowlabel">{_e(name)} stage '
                     f'(pp rank {s["pp_rank"]})</text>')
        forward_backward = s["activations"] + s["logits_loss"] + s["working"] + s["comm_buffers"]
        skip = {"step_temporary"} if forward_backward >= s["step_temporary"] else \
            {"activations", "logits_loss", "working", "comm_buffers"}
        at = 0.0
        for key, label, colour in SEGMENTS:
            size = s.get(key) or 0
            if key in skip or size <= 0:
                continue
            shown = "host runtime" if cpu and key == "cuda_context" else label
            parts.append(f'<rect x="{x(at):.2f}" y="{y}" width="{max(x(at + size) - x(at), 0.3):.2f}" height="{bar_h}" '
                         f'fill="{colour}"><title>{_e(shown)}: {gib(size)} GiB</title></rect>')
            at += size
        parts.append(f'<text x="{x(at) + 4:.1f}" y="{y + 20}" class="tick">{gib(s["total"])} GiB</text>')
    bottom = 20 + len(stages) * (bar_h + gap)
    if memory:
        parts.append(f'<line x1="{x(memory):.1f}" y1="10" x2="{x(memory):.1f}" y2="{bottom}" class="limit"/>'
                     f'<text x="{x(memory):.1f}" y="{bottom + 16}" text-anchor="end" class="tick">GPU {gib(memory)} GiB'
                     '</text>')
    if usable:
        parts.append(f'<line x1="{x(usable):.1f}" y1="10" x2="{x(usable):.1f}" y2="{bottom}" class="usable"/>'
                     f'<text x="{x(usable):.1f}" y="8" text-anchor="middle" class="tick">usable {gib(usable)}</text>')
    parts.append("</svg>")
    peak = breakdown["peak"]
    legend = "".join(f'<span class="swatch"><i style="background:{colour}"></i>'
                     f'{_e("host runtime" if cpu and key == "cuda_context" else label)} {gib(peak.get(key) or 0)}</span>'
                     for key, label, colour in SEGMENTS if peak.get(key))
    fits = "fits" if chosen["fits"] else "does NOT fit"
    return (f"<section><h2>Memory of the chosen layout: {_e(_layout_label(chosen['layout']))}</h2>"
            f"<p>Peak {gib(chosen['peak_bytes'])} GiB on the {_e(chosen['peak_stage'])} stage, {fits}; predicted "
            f"{chosen['tokens_per_s']:,.0f} tokens/s, step {chosen['step_time_s']:.3g} s, "
            f"{chosen['tflops_per_gpu']:.3g} TFLOP/s per GPU.</p>{''.join(parts)}"
            f"<div class='legend'>GiB on the peak stage: {legend}</div></section>")


def _step_chart(times: Sequence[float], predicted: float, median: float | None) -> str:
    if not times:
        return ""
    w, h, left, right, top, bottom = 920, 220, 60, 30, 15, 35
    top_value = max(max(times), predicted) * 1.1 or 1.0

    def x(i: int) -> float:
        return left + (w - left - right) * (i / max(len(times) - 1, 1))

    def y(v: float) -> float:
        return top + (h - top - bottom) * (1 - v / top_value)

    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(times))
    parts = [f'<svg class="steps" viewBox="0 0 {w} {h}" width="{w}" role="img" aria-label="step times">',
             f'<polyline points="{points}" class="measured"/>',
             f'<line x1="{left}" x2="{w - right}" y1="{y(predicted):.1f}" y2="{y(predicted):.1f}" class="predicted"/>',
             f'<text x="{w - right}" y="{y(predicted) - 5:.1f}" text-anchor="end" class="tick">predicted '
             f'{predicted:.3g} s</text>']
    if median:
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(median):.1f}" y2="{y(median):.1f}" class="median"/>'
                     f'<text x="{left + 4}" y="{y(median) - 5:.1f}" class="tick">measured median {median:.3g} s</text>')
    for t in _ticks(top_value, 1.0, 4):
        parts.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end" class="tick">{t:g}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle" class="tick">step '
                 f'(1 to {len(times)}); seconds per step</text></svg>')
    return "".join(parts)


def _measured_section(d: Mapping[str, Any]) -> str:
    m, c = d.get("measured"), d["chosen"]
    if not d.get("run_dir"):
        return ""
    if not m or not m.get("steps_logged"):
        return (f"<section><h2>Predicted vs measured</h2><p>No training steps logged yet in {_e(d['run_dir'])}. After "
                f"training: <code>python -m memory_predictor report --run {_e(d['run_dir'])} --out "
                f"{_e(d['run_dir'])}/plan.html</code></p></section>")
    peak = c["breakdown"]["peak"]
    cpu = m.get("memory_kind") == "cpu_max_rss"
    memory_rows = ([("peak memory (max RSS; predicted total) GiB", peak["total"], m.get("peak_allocated_bytes"))] if cpu
                   else [("max_memory_allocated GiB", peak["allocated"], m.get("peak_allocated_bytes")),
                         ("max_memory_reserved GiB", peak["reserved"], m.get("peak_reserved_bytes"))])
    rows: list[tuple[str, str, str, str]] = []
    for label, pred, meas in (("step time s", c["step_time_s"], m.get("step_time_s")),
                              ("tokens/s", c["tokens_per_s"], m.get("tokens_per_s")),
                              ("TFLOP/s per GPU", c["tflops_per_gpu"], m.get("tflops_per_gpu"))):
        rows.append((label, f"{pred:.4g}", "-" if meas is None else f"{meas:.4g}",
                     "-" if not meas else f"{meas / pred:.2f}"))
    for label, pred, meas in memory_rows:
        rows.append((label, gib(pred), gib(meas), "-" if not meas or not pred else f"{meas / pred:.2f}"))
    table = "".join(f"<tr><td>{_e(a)}</td><td>{_e(b)}</td><td>{_e(cc)}</td><td>{_e(dd)}</td></tr>" for a, b, cc, dd in rows)
    return ("<section><h2>Predicted vs measured</h2>"
            f"<p class='small'>{m['steps_logged']} steps logged in {_e(d['run_dir'])}; medians after the warm-up steps.</p>"
            "<table class='data'><tr><th></th><th>predicted</th><th>measured</th><th>measured / predicted</th></tr>"
            f"{table}</table>{_step_chart(m.get('step_times') or [], c['step_time_s'], m.get('step_time_s'))}</section>")


def _calibration_note(d: Mapping[str, Any]) -> str:
    cal = d.get("calibration")
    if not cal:
        return "<p class='small'>Constants: as shipped (fitted to published runs; no cluster calibration).</p>"
    err = cal.get("step_time_error") or {}
    after = err.get("fitted_after")
    return (f"<p class='small'>Calibrated for {_e(cal['gpu_type'])} from {len(cal.get('runs') or [])} runs "
            f"({_e(cal.get('source') or '')}): fitted {_e(', '.join(cal.get('fitted') or []))}"
            + (f"; step-time error on those runs {100 * after:.0f}%" if after is not None else "") + ".</p>")


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:960px;color:#222}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
.sub,.small{color:#555;font-size:.9em}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;min-width:150px;flex:1}
.card .label{font-size:.8em;color:#666;text-transform:uppercase}.card .value{font-size:1.4em;font-weight:600}
.card .detail{font-size:.8em;color:#555}.card.expected{border-color:#d62728;background:#fff5f5}
table.data{border-collapse:collapse;margin:10px 0}table.data td,table.data th{border:1px solid #ddd;padding:3px 8px;
text-align:right}table.data th{background:#f4f4f4}svg{max-width:100%;height:auto;display:block;margin:8px 0}
.bar.ideal{fill:#9ecae1}.bar.job0{fill:#4e79a7}.bar.job1{fill:#6b93c4}.bar.expected{fill:#e15759}
.grid{stroke:#eee}.tick{font-size:11px;fill:#444}.rowlabel{font-size:12px;fill:#222}.milestone{fill:#222;opacity:.8}
.mlabel{font-size:11px;fill:#222;font-weight:600}.limit{stroke:#000;stroke-width:2}.usable{stroke:#d62728;
stroke-dasharray:5 3;stroke-width:2}.measured{fill:none;stroke:#4e79a7;stroke-width:1.5}.predicted{stroke:#e15759;
stroke-dasharray:6 3;stroke-width:1.5}.median{stroke:#59a14f;stroke-width:1}
.controls label{margin-right:14px;font-size:.9em}#heatmap table{border-collapse:collapse;margin-top:10px}
#heatmap td,#heatmap th{border:1px solid #fff;padding:4px 6px;text-align:center;font-size:12px;min-width:86px}
#heatmap td.chosen{outline:3px solid #000;outline-offset:-3px}#heatmap td.none{background:#f4f4f4;color:#999}
#heatmap td.nofit{background:repeating-linear-gradient(45deg,#bbb,#bbb 4px,#ccc 4px,#ccc 8px);color:#333}
.legend{font-size:12px}.swatch{margin-right:12px;white-space:nowrap}.swatch i{display:inline-block;width:10px;
height:10px;margin-right:4px}code{background:#f4f4f4;padding:1px 4px}
"""

SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('hl-data').textContent);
  var space = data.space;
  if (!space) { return; }
  var F = {};
  space.fields.forEach(function (f, i) { F[f] = i; });
  var rows = space.rows, dims = ['cp', 'vpp', 'mbs', 'recompute', 'distributed_optimizer'];
  var chosen = data.chosen.layout, memory = data.hardware.memory_bytes, usable = memory * data.usable_fraction;
  var want = {cp: chosen.cp, vpp: chosen.vpp, mbs: chosen.mbs, recompute: chosen.recompute,
              distributed_optimizer: chosen.distributed_optimizer};
  var lo = Infinity, hi = 0;
  rows.forEach(function (r) { lo = Math.min(lo, r[F.peak_bytes]); hi = Math.max(hi, r[F.peak_bytes]); });
  function uniq(i) {
    var seen = {}, out = [];
    rows.forEach(function (r) { var k = String(r[i]); if (!seen[k]) { seen[k] = 1; out.push(r[i]); } });
    return out.sort(function (a, b) { return typeof a === 'number' ? a - b : String(a) < String(b) ? -1 : 1; });
  }
  dims.forEach(function (d) {
    var sel = document.getElementById('sel-' + d);
    var opt = document.createElement('option');
    opt.value = 'best'; opt.textContent = 'best'; sel.appendChild(opt);
    uniq(F[d]).forEach(function (v) {
      var o = document.createElement('option');
      o.value = String(v); o.textContent = String(v); sel.appendChild(o);
    });
    sel.value = String(want[d]);
    if (sel.value !== String(want[d])) { sel.value = 'best'; }
    sel.addEventListener('change', draw);
  });
  function better(a, b) {
    if (a[F.fits] !== b[F.fits]) { return a[F.fits]; }
    if (a[F.fits]) { return a[F.tokens_per_s] > b[F.tokens_per_s]; }
    return a[F.peak_bytes] < b[F.peak_bytes];
  }
  function colour(r) {
    var x = memory ? r[F.peak_bytes] / usable : (hi > lo ? (r[F.peak_bytes] - lo) / (hi - lo) : 0);
    x = Math.max(0, Math.min(1, x));
    var red = Math.round(255 * Math.min(1, 2 * x)), green = Math.round(200 * Math.min(1, 2 * (1 - x)) + 30);
    return 'rgb(' + red + ',' + green + ',70)';
  }
  function fmt(n) {
    return n >= 1e6 ? (n / 1e6).toFixed(2) + 'M' : n >= 1e3 ? (n / 1e3).toFixed(1) + 'k' : n.toFixed(1);
  }
  function label(r) {
    return 'tp' + r[F.tp] + ' pp' + r[F.pp] + (r[F.vpp] > 1 ? ' vpp' + r[F.vpp] : '') + ' cp' + r[F.cp] +
      ' dp' + r[F.dp] + ' mbs' + r[F.mbs] + ' ' + r[F.recompute] + (r[F.distributed_optimizer] ? '' : ' plain-opt');
  }
  function draw() {
    var sel = {};
    dims.forEach(function (d) { sel[d] = document.getElementById('sel-' + d).value; });
    var cells = {}, shown = 0, fit = 0;
    rows.forEach(function (r) {
      for (var i = 0; i < dims.length; i++) {
        var v = sel[dims[i]];
        if (v !== 'best' && String(r[F[dims[i]]]) !== v) { return; }
      }
      shown += 1; if (r[F.fits]) { fit += 1; }
      var k = r[F.tp] + 'x' + r[F.pp];
      if (!cells[k] || better(r, cells[k])) { cells[k] = r; }
    });
    var best = null;
    Object.keys(cells).forEach(function (k) {
      var r = cells[k];
      if (r[F.fits] && (!best || r[F.tokens_per_s] > best[F.tokens_per_s])) { best = r; }
    });
    var tps = uniq(F.tp), pps = uniq(F.pp);
    var table = document.createElement('table');
    var head = document.createElement('tr');
    head.appendChild(document.createElement('th')).textContent = 'PP \\\\ TP';
    tps.forEach(function (t) { head.appendChild(document.createElement('th')).textContent = 'TP ' + t; });
    table.appendChild(head);
    pps.forEach(function (p) {
      var tr = document.createElement('tr');
      tr.appendChild(document.createElement('th')).textContent = 'PP ' + p;
      tps.forEach(function (t) {
        var td = document.createElement('td'), r = cells[t + 'x' + p];
        if (!r) { td.className = 'none'; td.textContent = '-'; tr.appendChild(td); return; }
        var gibs = (r[F.peak_bytes] / 1073741824).toFixed(1) + ' GiB';
        td.innerHTML = '';
        td.appendChild(document.createTextNode(gibs + (r === best ? ' \\u2605' : '')));
        td.appendChild(document.createElement('br'));
        td.appendChild(document.createTextNode(fmt(r[F.tokens_per_s]) + ' tok/s'));
        var share = memory ? ' (' + (100 * r[F.peak_bytes] / memory).toFixed(0) + '% of the GPU)' : '';
        td.title = label(r) + ': ' + gibs + share +
          ', ' + Math.round(r[F.tokens_per_s]).toLocaleString() + ' tokens/s' + (r[F.fits] ? '' : ', does not fit');
        if (r[F.fits]) { td.style.background = colour(r); } else { td.className = 'nofit'; }
        var same = r[F.tp] === chosen.tp && r[F.pp] === chosen.pp && r[F.cp] === chosen.cp && r[F.vpp] === chosen.vpp &&
          r[F.mbs] === chosen.mbs && r[F.recompute] === chosen.recompute &&
          r[F.distributed_optimizer] === chosen.distributed_optimizer;
        if (same) { td.className += ' chosen'; }
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    var box = document.getElementById('heatmap');
    box.innerHTML = '';
    box.appendChild(table);
    document.getElementById('space-summary').textContent = shown + ' of ' + rows.length +
      ' layouts match the selection; ' + fit + ' of them fit.';
    document.body.setAttribute('data-heatmap-cells', String(Object.keys(cells).length));
  }
  draw();
})();
"""


def render_page(data: Mapping[str, Any]) -> str:
    """The whole page: header, plan, schedule, layout-space heatmap, memory breakdown, predicted vs measured."""
    d = _finite(dict(data))
    hw = d["hardware"]
    layout = d["chosen"]["layout"]
    subtitle = (f"{d['model']} on {hw['nodes']} x {hw['gpus_per_node']} {hw['gpu']}"
                + (f" ({hw['note']})" if hw.get("note") else "")
                + f", seq {d['seq_length']}, global batch {d['global_batch_size']}; layout {_layout_label(layout)}")
    notes = "".join(f"<p class='small'>{_e(n)}</p>" for n in d.get("notes") or [])
    body = (f"<h1>{_e(d['title'])}</h1><div class='sub'>{_e(subtitle)}</div>"
            f"<div class='sub'>{_e(d.get('generated') or '')}</div>{_calibration_note(d)}{notes}"
            f"{_plan_section(d)}{_heatmap_section(d)}{_stacked_bars(d['chosen'], bool(d.get('cpu')))}"
            f"{_measured_section(d)}")
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'><link rel='icon' href='data:,'>"
            f"<title>{_e(d['title'])}</title><style>{CSS}</style></head><body>{body}"
            f"<script id='hl-data' type='application/json'>{_script_json(d)}</script>"
            f"<script>{SCRIPT}</script></body></html>\n")


__all__ = ["render_page", "duration", "count", "gib"]
