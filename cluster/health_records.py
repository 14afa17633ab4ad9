"""The plain records the preflight health checks pass around: settings, findings, samples (no I/O).

Every check reports ``Finding``s; a node fails when any finding fails. Bandwidth tests report
``LinkSample``s (one direction between two ranks on different nodes), ``NodeSample``s (an all-reduce
within one node) and one ``AllSample`` (an all-reduce across every node). All of them round-trip
through JSON (the per-rank result files and the report in the run directory).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

FAIL, WARN, INFO = "fail", "warn", "info"


@dataclass(frozen=True)
class HealthSettings:
    """What the checks need, from ``cluster.*`` (a run's config) or the operator's command line."""

    time_budget_s: float = 180.0
    gpu_diag_level: int = 1
    bandwidth_check: bool = True
    min_bandwidth_fraction: float = 0.5
    quarantine: bool = True
    max_quarantine_fraction: float = 0.5
    max_requeues: int = 3
    gpu_type: str = "cpu"
    gpus_per_node: int = 1  # GPUs a node must have (processes per node on CPU)
    efa_devices: int = 0  # 0: no EFA check
    instance_type: Optional[str] = None
    expected_gbps: Optional[float] = None
    port: int = 29501  # the bandwidth test's rendezvous port on the first node
    pushgateway_url: Optional[str] = None
    run_name: str = ""  # the run directory's name: the ``run`` label of the run's metrics
    quarantine_action: str = "drain"  # drain | replace (HyperPod: state=fail reason="Action:Replace")

    @property
    def gpu(self) -> bool:
        return self.gpu_type != "cpu"

    @property
    def ranks_per_node(self) -> int:
        """One rank per GPU on GPU nodes (each GPU reaches its own EFA devices), one per CPU node."""
        return self.gpus_per_node if self.gpu else 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HealthSettings:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Finding:
    check: str  # gpu.count, gpu.dcgmi, gpu.ecc, gpu.row_remap, gpu.retired_pages, gpu.throttle, gpu.xid,
    #             efa.devices, net.link, net.intra, net.all, node.result
    severity: str  # fail | warn | info
    message: str
    figure: str = ""  # the number behind the verdict, for a drain reason ("0.01 GB/s < 0.12 GB/s")
    gpu: Optional[int] = None

    def short(self) -> str:
        return f"{self.check}: {self.figure or self.message}"


@dataclass(frozen=True)
class NodeReport:
    """What one node's local checks found (written by the node's first rank)."""

    node: str
    host: str
    seconds: float
    gpu_source: str  # "dcgmi diag -r 1", "nvml", "n/a (gpu_type=cpu)", ...
    efa: str  # "32/32", "n/a"
    findings: tuple[Finding, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeReport:
        findings = tuple(Finding(**f) for f in data.get("findings", ()))
        return cls(node=data["node"], host=data.get("host", data["node"]), seconds=float(data.get("seconds", 0)),
                   gpu_source=data.get("gpu_source", ""), efa=data.get("efa", ""), findings=findings)


@dataclass(frozen=True)
class Endpoint:
    node: str
    local_rank: int = 0

    def name(self, ranks_per_node: int) -> str:
        return self.node if ranks_per_node <= 1 else f"{self.node}/gpu{self.local_rank}"


@dataclass(frozen=True)
class LinkSample:
    """One direction between two ranks on different nodes: the best of its timed transfers."""

    src: Endpoint
    dst: Endpoint
    bytes_per_s: float  # 0 when no transfer finished
    transfers: int
    complete: bool = True  # False: still running when the time budget ran out (a stalled link)


@dataclass(frozen=True)
class NodeSample:
    """An all-reduce among the ranks of one node (NVLink on GPU nodes): bus bandwidth."""

    node: str
    bytes_per_s: float


@dataclass(frozen=True)
class AllSample:
    """An all-reduce across every rank of every node: bus bandwidth."""

    bytes_per_s: float
    ranks: int


@dataclass
class Measurements:
    links: list[LinkSample] = field(default_factory=list)
    intra: list[NodeSample] = field(default_factory=list)
    all_nodes: Optional[AllSample] = None
    errors: list[str] = field(default_factory=list)  # e.g. the rendezvous failed
    finished_ranks: set[int] = field(default_factory=set)


def sample_from_dict(data: dict[str, Any]) -> object:
    """One line of a rank's result file back into its record (LinkSample, NodeSample, AllSample or dict)."""
    kind = data.get("kind")
    if kind == "link":
        return LinkSample(src=Endpoint(**data["src"]), dst=Endpoint(**data["dst"]),
                          bytes_per_s=float(data["bytes_per_s"]), transfers=int(data["transfers"]),
                          complete=bool(data.get("complete", True)))
    if kind == "intra":
        return NodeSample(node=data["node"], bytes_per_s=float(data["bytes_per_s"]))
    if kind == "all":
        return AllSample(bytes_per_s=float(data["bytes_per_s"]), ranks=int(data["ranks"]))
    return data


def sample_to_dict(sample: object) -> dict[str, Any]:
    kinds = {LinkSample: "link", NodeSample: "intra", AllSample: "all"}
    return {"kind": kinds[type(sample)], **dataclasses.asdict(sample)}  # type: ignore[call-overload]
