"""Which DCGM fields our alerting rules and dashboards need, and who serves each of them on a node.

A dcgm-exporter the node already runs (HyperPod: port 9400) serves its own field list: stock
dcgm-exporter and HyperPod's *basic* list lack the ECC volatile totals, the NVLink error counters
and ``PROF_SM_*``, so the rules built on them would never fire and nothing would say so. The node
exporter scrapes it once (:func:`served_fields`), serves the missing fields from NVML when it can
(monitoring.gpu.DcgmCollector ``only=``), and records the rest: :func:`plan` says which alerts and
panels are blind, and the node exporter writes that into the run directory and says it once.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import yaml

from monitoring.dashboards import DASHBOARDS

RULES_DIR = Path(__file__).resolve().parent / "rules"
_FIELD = re.compile(r"\bDCGM_FI_[A-Z0-9_]+\b")
_SERVED = re.compile(r"^(DCGM_FI_[A-Z0-9_]+)[{ ]", re.M)


def served_fields(port: int, timeout_s: float = 2.0) -> Optional[frozenset[str]]:
    """The DCGM fields something on this node's ``port`` serves; None when no DCGM exporter answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
            text = resp.read(16 << 20).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    fields = frozenset(_SERVED.findall(text))
    return fields or None


def _mentions(expr: str, name: str) -> bool:
    return re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", expr) is not None


@lru_cache(maxsize=1)
def rule_fields(rules_dir: Path = RULES_DIR) -> dict[str, frozenset[str]]:
    """alert name -> the DCGM fields its expression reads (through recording rules too)."""
    recorded: dict[str, set[str]] = {}
    out: dict[str, frozenset[str]] = {}
    for path in sorted(rules_dir.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                expr = str(rule["expr"])
                fields = set(_FIELD.findall(expr))
                for name, used in recorded.items():
                    if _mentions(expr, name):
                        fields |= used
                if "record" in rule:
                    recorded[rule["record"]] = fields
                elif fields:
                    out[rule["alert"]] = frozenset(fields)
    return out


def panel_fields() -> dict[str, frozenset[str]]:
    """'dashboard / panel' -> the DCGM fields its queries read."""
    out = {}
    for d in DASHBOARDS:
        for p in d.panels:
            fields = frozenset(f for q in p.queries for f in _FIELD.findall(q.expr))
            if fields:
                out[f"{d.title} / {p.title}"] = fields
    return out


def needed_fields() -> frozenset[str]:
    return frozenset().union(*rule_fields().values(), *panel_fields().values())


@dataclass(frozen=True)
class Coverage:
    served: frozenset[str]  # by the node's dcgm-exporter (empty when we serve everything ourselves)
    from_nvml: frozenset[str]  # needed, not served there, served by our node exporter from NVML
    missing: frozenset[str]  # needed and served by nobody
    blind_rules: tuple[str, ...]  # alerts reading a missing field: they cannot fire on this node
    blind_panels: tuple[str, ...]

    def record(self, **extra: Any) -> dict[str, Any]:
        return {**extra, "served_by_dcgm_exporter": sorted(self.served & needed_fields()),
                "served_from_nvml": sorted(self.from_nvml), "missing": sorted(self.missing),
                "blind_rules": list(self.blind_rules), "blind_panels": list(self.blind_panels)}


def plan(served: frozenset[str], nvml_can_serve: frozenset[str]) -> Coverage:
    """Pure: who serves each needed field, and what stays blind."""
    needed = needed_fields()
    from_nvml = (needed - served) & nvml_can_serve
    missing = needed - served - from_nvml
    blind_rules = tuple(sorted(a for a, f in rule_fields().items() if f & missing))
    blind_panels = tuple(sorted(p for p, f in panel_fields().items() if f & missing))
    return Coverage(served, frozenset(from_nvml), frozenset(missing), blind_rules, blind_panels)
