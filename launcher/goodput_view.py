"""``launcher status``'s view of a run's goodput ledger (``goodput.json``, written by trainer.tracker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from trainer.goodput import CATEGORIES, read_ledger
from trainer.metrics import human_count, human_duration

_LABELS = {"productive": "productive training", "startup": "start-up and checkpoint load",
           "checkpoint": "checkpoint stalls", "evaluation": "evaluation", "data_wait": "data waits",
           "restarts": "restarts (downtime + redone work)", "straggler": "straggler slowdown",
           "other": "other (logging, callbacks)"}


def summary(run_dir: Path) -> Optional[dict[str, Any]]:
    """The ledger with its derived numbers (goodput, progress, tokens per GPU-hour, cost), or None."""
    raw = read_ledger(str(run_dir))
    if not raw or not isinstance(raw.get("seconds"), dict):
        return None
    seconds = {k: float(raw["seconds"].get(k, 0.0)) for k in CATEGORIES}
    total = sum(seconds.values())
    run = raw.get("run") or {}
    step, total_steps = int(raw.get("last_step", 0)), int(run.get("total_steps") or 0)
    tokens = step * int(run.get("tokens_per_step") or 0)
    gpus, nodes, price = int(run.get("gpus") or 0), int(run.get("nodes") or 0), run.get("price_per_node_hour")
    fraction = step / total_steps if total_steps else 0.0
    out: dict[str, Any] = {
        "seconds": seconds, "total_s": total, "goodput": seconds["productive"] / total if total > 0 else 0.0,
        "attempts": int(raw.get("attempts", 0)), "redone_steps": int(raw.get("redone_steps", 0)),
        "step": step, "total_steps": total_steps, "fraction": fraction, "tokens": tokens,
        "tokens_total": total_steps * int(run.get("tokens_per_step") or 0),
        "tokens_per_gpu_hour": tokens / (total / 3600 * gpus) if total > 0 and gpus else None,
        "restarts": list(raw.get("restarts") or []), "plan": dict(raw.get("plan") or {}),
        "last_update": raw.get("last_update"), "milestones": list(raw.get("milestones") or [])}
    if price is not None and nodes:
        out["cost_usd"] = total / 3600 * nodes * float(price)
        out["projected_cost_usd"] = out["cost_usd"] / fraction if fraction > 0 else None
    return out


def _dur(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 600 else human_duration(seconds)


def lines(view: dict[str, Any]) -> list[str]:
    total = view["total_s"]
    out = [f"goodput {view['goodput']:.1%} of {_dur(total)} wall over {view['attempts']} attempt(s), "
           f"{view['redone_steps']} step(s) redone; progress {view['fraction']:.1%} (step {view['step']}/"
           f"{view['total_steps']}, {human_count(view['tokens'])}/{human_count(view['tokens_total'])} tokens)"]
    for key in CATEGORIES:
        sec = view["seconds"][key]
        share = sec / total if total > 0 else 0.0
        out.append(f"  {_LABELS[key]:<34} {_dur(sec):>12}  {share:6.1%}")
    extra = []
    if view.get("tokens_per_gpu_hour") is not None:
        extra.append(f"{human_count(view['tokens_per_gpu_hour'])} tokens per GPU-hour")
    if view.get("cost_usd") is not None:
        projected = view.get("projected_cost_usd")
        extra.append(f"cost ${view['cost_usd']:,.2f} so far" + (f", ${projected:,.2f} projected" if projected else ""))
    if extra:
        out.append("  " + "; ".join(extra))
    for r in view["restarts"]:
        detection = f"detection {r['detection_s']:.1f} s + " if r.get("detection_s") is not None else ""
        out.append(f"  restart {r.get('attempt')}: after step {r.get('resumed_step')} ({r.get('cause')}): lost "
                   f"{r.get('lost_s', 0.0):.1f} s = {detection}down {r.get('down_s', 0.0):.1f} s + reload "
                   f"{r.get('reload_s', 0.0):.1f} s + redone {r.get('redone_steps', 0)} steps {r.get('redone_s', 0.0):.1f} s")
    if view["plan"].get("line"):
        out.append(f"  {view['plan']['line']} (at step {view['plan'].get('step')})")
    return out
