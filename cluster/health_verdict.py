"""Per-node verdicts and the quarantine decision (pure: results in, a frozen verdict out).

A node fails when any of its findings fails (GPU, EFA, bandwidth) or when it reported nothing
within the time budget. Failing nodes are quarantined (drained, excluded, the job requeued) unless
that would be the wrong medicine:

* more than ``max_quarantine_fraction`` of the job's nodes fail (with two or more nodes): the same
  fault on most nodes is the software or the configuration (a container without the EFA libraries,
  a wrong instance type), not broken hardware; the job stops and nothing is drained;
* an environment finding (``efa.software``, ``gpu.driver``) on a one-node job: the same;
* ``quarantine=false``, or the run already requeued ``max_requeues`` times for the preflight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cluster.health_net import NetVerdict
from cluster.health_records import FAIL, WARN, Finding, HealthSettings, NodeReport

ENVIRONMENT_CHECKS = ("efa.software", "gpu.driver")
PASS, WARNED, QUARANTINE, FAILED = "pass", "warn", "quarantine", "fail"


@dataclass(frozen=True)
class NodeVerdict:
    node: str
    status: str  # pass | warn | fail
    findings: tuple[Finding, ...]
    report: Optional[NodeReport]

    def reason(self) -> str:
        """The drain reason: the check and the figure, one line, no tabs."""
        fails = [f for f in self.findings if f.severity == FAIL]
        text = "; ".join(f.short() for f in fails[:2]) + (f" (+{len(fails) - 2} more)" if len(fails) > 2 else "")
        return " ".join(f"hyperlaunch preflight: {text}".split())[:240]


@dataclass(frozen=True)
class Verdict:
    status: str  # pass | warn | quarantine | fail
    nodes: tuple[NodeVerdict, ...]
    quarantine: tuple[tuple[str, str], ...]  # (node, reason) to drain and exclude
    message: str
    warnings: tuple[Finding, ...] = ()  # not pinned on a node
    link_baseline: Optional[float] = None
    link_baseline_source: str = ""
    tx: dict[str, float] = field(default_factory=dict)
    rx: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [n.node for n in self.nodes if n.status == FAILED]

    @property
    def exit_code(self) -> int:
        return 1 if self.status in (QUARANTINE, FAILED) else 0


def decide(nodes: list[str], reports: dict[str, NodeReport], net: Optional[NetVerdict], settings: HealthSettings,
           previous_requeues: int = 0) -> Verdict:
    verdicts = []
    for node in nodes:
        report = reports.get(node)
        findings = list(report.findings) if report is not None else [
            Finding("node.result", FAIL, "no result within the time budget (hung or too slow)",
                    figure=f"no result within {settings.time_budget_s:.0f} s")]
        if net is not None:
            findings += net.node_findings.get(node, [])
        relevant = tuple(f for f in findings if f.severity in (FAIL, WARN))
        status = FAILED if any(f.severity == FAIL for f in relevant) else WARNED if relevant else PASS
        verdicts.append(NodeVerdict(node, status, relevant, report))
    failed = [v for v in verdicts if v.status == FAILED]

    def verdict(status: str, quarantine: tuple[tuple[str, str], ...], message: str) -> Verdict:
        return Verdict(status, tuple(verdicts), quarantine, message,
                       warnings=tuple(net.warnings) if net is not None else (),
                       link_baseline=net.link_baseline if net is not None else None,
                       link_baseline_source=net.link_baseline_source if net is not None else "",
                       tx=dict(net.tx) if net is not None else {}, rx=dict(net.rx) if net is not None else {})

    if not failed:
        warned = (net is not None and bool(net.warnings)) or any(v.status == WARNED for v in verdicts)
        return verdict(WARNED if warned else PASS, (), f"all {len(nodes)} nodes healthy")
    names = ", ".join(v.node for v in failed)
    checks = sorted({f.check for v in failed for f in v.findings if f.severity == FAIL})
    summary = f"{len(failed)} of {len(nodes)} nodes failed ({names}: {', '.join(checks)})"
    refusal = _refusal(failed, len(nodes), settings, previous_requeues)
    if refusal:
        return verdict(FAILED, (), f"{summary}; {refusal}")
    return verdict(QUARANTINE, tuple((v.node, v.reason()) for v in failed), f"{summary}; to quarantine: {names}")


def _refusal(failed: list[NodeVerdict], total: int, settings: HealthSettings, previous_requeues: int) -> str:
    if not settings.quarantine:
        return "not quarantining (cluster.preflight.quarantine=false)"
    if total >= 2 and len(failed) > settings.max_quarantine_fraction * total:
        return (f"more than {settings.max_quarantine_fraction:.0%} of the nodes fail: that looks like the software or "
                "the configuration, not broken nodes, so nothing is drained (cluster.preflight.max_quarantine_fraction)")
    environment = [f for v in failed for f in v.findings if f.severity == FAIL and f.check in ENVIRONMENT_CHECKS]
    if total == 1 and environment:
        return (f"{environment[0].message}: on a one-node job that cannot be told from a configuration problem, "
                "so the node is not drained")
    if previous_requeues >= settings.max_requeues:
        return (f"the preflight already requeued this run {previous_requeues} times "
                f"(cluster.preflight.max_requeues={settings.max_requeues}); not draining more nodes")
    return ""
