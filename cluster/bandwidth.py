"""What bandwidth a healthy node should reach: a catalogue per instance and GPU type, or the median rule.

Figures are the vendors' line rates; the preflight (cluster.healthcheck) fails a node or link that
measures below ``cluster.preflight.min_bandwidth_fraction`` of them (0.5 by default: a healthy
NCCL run reaches well above half of the line rate, a degraded EFA device or a link fallen back to
TCP sockets reaches a small fraction of it).

Inter-node (EFA), per instance, in Gbit/s per node (AWS: "Amazon EC2 accelerated computing instance
specifications", https://docs.aws.amazon.com/ec2/latest/instancetypes/ac.html, and the product pages
https://aws.amazon.com/ec2/instance-types/p5/ , https://aws.amazon.com/ec2/instance-types/p4/):
p5.48xlarge 3200 (32 EFA devices), p5e.48xlarge 3200 (32), p5en.48xlarge 3200 (16 EFAv3),
p4d.24xlarge and p4de.24xlarge 400 (4).

Intra-node (NVLink), per GPU type, in GB/s per GPU, both directions together (NVIDIA data sheets:
H100 SXM5 "NVLink: 900GB/s", https://www.nvidia.com/en-us/data-center/h100/ ; H200 SXM 900 GB/s,
https://www.nvidia.com/en-us/data-center/h200/ ; A100 SXM "NVLink 600GB/s",
https://www.nvidia.com/en-us/data-center/a100/). One direction is half of that.

How the tests compare (bus bandwidth as nccl-tests defines it, ``busbw = algbw x 2(n-1)/n`` for an
all-reduce over n ranks):

* a node pair, one direction, one GPU of each node to its counterpart, every GPU at once: each GPU
  should get ``line rate / gpus_per_node`` (the node's EFA devices are shared by its GPUs);
* an all-reduce across all nodes: bus bandwidth about the node's line rate (every byte of a ring
  crosses each node boundary ``2(n-1)/n`` times, so the network bounds busbw at the line rate);
* an all-reduce within a node: bus bandwidth about one direction of NVLink.

Without a catalogue figure (``gpu_type=cpu`` test clusters, generic Slurm clusters without an
instance type) the preflight measures a baseline instead: the median over every link (or node) of
the same kind, so one slow node or link stands out against its peers. ``cluster.preflight.
expected_gbps`` overrides the inter-node figure for clusters whose line rate the catalogue lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from configs.hardware import lookup_instance

GBIT = 1e9 / 8  # bytes per second in one Gbit/s


@dataclass(frozen=True)
class NetworkFigure:
    gbps: float  # per node, the sum over its EFA devices
    source: str


@dataclass(frozen=True)
class NvlinkFigure:
    gbytes_per_s: float  # per GPU, both directions together
    source: str


_AWS_SPECS = "https://docs.aws.amazon.com/ec2/latest/instancetypes/ac.html"
NETWORK: dict[str, NetworkFigure] = {
    "p5.48xlarge": NetworkFigure(3200, f"{_AWS_SPECS}; https://aws.amazon.com/ec2/instance-types/p5/"),
    "p5e.48xlarge": NetworkFigure(3200, f"{_AWS_SPECS}; https://aws.amazon.com/ec2/instance-types/p5/"),
    "p5en.48xlarge": NetworkFigure(3200, f"{_AWS_SPECS}; https://aws.amazon.com/ec2/instance-types/p5/"),
    "p4d.24xlarge": NetworkFigure(400, f"{_AWS_SPECS}; https://aws.amazon.com/ec2/instance-types/p4/"),
    "p4de.24xlarge": NetworkFigure(400, f"{_AWS_SPECS}; https://aws.amazon.com/ec2/instance-types/p4/"),
}

NVLINK: dict[str, NvlinkFigure] = {
    "h100-80gb": NvlinkFigure(900, "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM5)"),
    "h200-141gb": NvlinkFigure(900, "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM)"),
    "a100-80gb": NvlinkFigure(600, "https://www.nvidia.com/en-us/data-center/a100/ (A100 SXM)"),
    "a100-40gb": NvlinkFigure(600, "https://www.nvidia.com/en-us/data-center/a100/ (A100 SXM)"),
    # h100-94gb (H100 NVL) pairs GPUs with NVLink bridges; an 8-GPU all-reduce crosses PCIe: median rule
}


@dataclass(frozen=True)
class Expectation:
    """Expected bandwidths in bytes/s; None: no figure, compare with the median of the peers."""

    link: Optional[float]  # one GPU (rank) to its counterpart on another node, one direction
    all_nodes: Optional[float]  # all-reduce bus bandwidth across every node
    intra_node: Optional[float]  # all-reduce bus bandwidth within one node (NVLink)
    source: str

    def describe(self) -> str:
        def fmt(v: Optional[float]) -> str:
            return "median of peers" if v is None else f"{v / 1e9:.3g} GB/s"
        return f"link {fmt(self.link)}, all nodes {fmt(self.all_nodes)}, intra-node {fmt(self.intra_node)}"


def expected_bandwidth(*, instance_type: Optional[str], gpu_type: str, ranks_per_node: int,
                       override_gbps: Optional[float] = None) -> Expectation:
    """The figures a healthy node reaches (pure: from names to numbers)."""
    sources: list[str] = []
    network: Optional[float] = None
    if override_gbps is not None:
        network = override_gbps * GBIT
        sources.append(f"cluster.preflight.expected_gbps={override_gbps:g}")
    elif instance_type:
        inst = lookup_instance(instance_type)
        figure = NETWORK.get(inst.name) if inst is not None else None
        if figure is not None:
            network = figure.gbps * GBIT
            sources.append(f"{inst.name if inst else instance_type}: {figure.gbps:g} Gbit/s ({figure.source})")
    intra: Optional[float] = None
    nvlink = NVLINK.get(gpu_type) if gpu_type != "cpu" and ranks_per_node > 1 else None
    if nvlink is not None:
        intra = nvlink.gbytes_per_s / 2 * 1e9
        sources.append(f"{gpu_type}: NVLink {nvlink.gbytes_per_s:g} GB/s ({nvlink.source})")
    return Expectation(link=network / max(ranks_per_node, 1) if network is not None else None,
                       all_nodes=network, intra_node=intra,
                       source="; ".join(sources) or "no catalogue figure: median of the measured peers")
