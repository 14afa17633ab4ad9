"""Bandwidth between nodes with torch.distributed (NCCL on GPUs, gloo on CPU), and who is to blame.

Measurement (``measure``; one process per GPU, or one per node on CPU; torch is imported here only):

1. within each node (more than one rank per node): an all-reduce among its ranks (NVLink);
2. node pairs in rounds (the circle method: every pair once, each node in at most one pair per round,
   so ``n-1`` rounds for ``n`` nodes; at most ``MAX_ROUNDS`` of them, so every node meets up to eight
   peers and large jobs stay within the budget): for the pair (a, b), a -> b, then b -> a; rank ``l`` of a
   sends to rank ``l`` of b, all ranks of the node at once (each GPU reaches its own EFA devices);
   before every timed transfer the receiver says it is ready, afterwards it acknowledges, and the
   sender takes the time in between; the best of a short probe and up to five full transfers counts;
3. an all-reduce across every rank of every node (bus bandwidth as nccl-tests computes it).

Each result is appended to the rank's result file as it arrives, so a stalled link still leaves what
was measured before it (``link_start`` without its ``link``: the coordinator counts it as 0).

Blame (``link_verdict``, pure): a link is slow below ``min_bandwidth_fraction`` x the expected
bandwidth (cluster.bandwidth: the catalogue, or the median of all links). A sender most of whose
links are slow is to blame (its transmit path); slow links no blamed sender explains are then put on
a receiver most of whose incoming links are slow. With two nodes a slow direction is put on its
sender: nothing else can tell sender from receiver, and with both directions slow both nodes are
named (and the quarantine policy refuses to drain every node of a job). A slow link explained by
neither end is a warning: no node can be named.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional

from cluster.bandwidth import Expectation
from cluster.health_records import FAIL, WARN, Endpoint, Finding, LinkSample, Measurements, NodeSample

CPU_BYTES = 64 << 20  # gloo over TCP: smaller transfers measure caches and the scheduler more than the link
GPU_BYTES = 256 << 20  # per GPU: large enough for NCCL to reach its bus bandwidth
PROBE_DIVISOR = 16  # the first timed transfer is this much smaller (a crawling link answers fast)
MAX_FULL = 5  # full-size transfers per direction at most
DIRECTION_CAP_S = 8.0  # a direction stops starting transfers after this long
MAX_ROUNDS = 8  # each node meets this many peers at most (every pair for up to 9 nodes): enough to blame


def pair_rounds(n: int) -> list[list[tuple[int, int]]]:
    """Round-robin pairing of nodes 0..n-1: every pair exactly once, each node at most once per round."""
    slots: list[Optional[int]] = list(range(n)) + ([None] if n % 2 else [])
    m = len(slots)
    rounds = []
    for _ in range(m - 1):
        pairs = []
        for i in range(m // 2):
            a, b = slots[i], slots[m - 1 - i]
            if a is not None and b is not None:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(sorted(pairs))
        slots = [slots[0], slots[-1], *slots[1:-1]]
    return [r for r in rounds if r]


# ---- measurement (inside the healthcheck worker) ---------------------------------------------------

@dataclass(frozen=True)
class RankPlace:
    rank: int
    world: int
    local_rank: int
    ranks_per_node: int
    nodes: tuple[str, ...]  # the step's nodes, in Slurm's order
    master_addr: str
    port: int

    @property
    def node_index(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def node(self) -> str:
        return self.nodes[self.node_index]


def measure(place: RankPlace, gpu: bool, deadline: float, record: Callable[[dict[str, Any]], None]) -> None:
    """Run every bandwidth test this rank takes part in, calling ``record`` with each result."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", place.local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    remaining = max(deadline - time.time(), 5.0)
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{place.master_addr}:{place.port}",
                            rank=place.rank, world_size=place.world, timeout=timedelta(seconds=remaining))
    run = _Run(place, device, GPU_BYTES if gpu else CPU_BYTES, record)
    nnodes = len(place.nodes)
    if place.ranks_per_node > 1:
        run.intra_node(cap=min(DIRECTION_CAP_S, (deadline - time.time()) * 0.1))
    if nnodes > 1:
        rounds = pair_rounds(nnodes)[:MAX_ROUNDS]
        share = (deadline - time.time()) * 0.75 / (2 * len(rounds))
        run.pairs(rounds, cap=max(min(DIRECTION_CAP_S, share), 0.5))
        run.all_nodes(cap=max(min(DIRECTION_CAP_S, (deadline - time.time()) * 0.5), 0.5))


class _Run:
    def __init__(self, place: RankPlace, device: Any, nbytes: int, record: Callable[[dict[str, Any]], None]) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.place, self.record = torch, dist, place, record
        self.gpu = device.type == "cuda"
        self.buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
        self.token = torch.zeros(1, dtype=torch.float32, device=device)
        self.full = nbytes // 4
        self.probe = max(self.full // PROBE_DIVISOR, 1)

    def _sync(self) -> None:
        if self.gpu:
            self.torch.cuda.synchronize()

    def _endpoint(self, node_index: int) -> dict[str, Any]:
        return {"node": self.place.nodes[node_index], "local_rank": self.place.local_rank}

    # node pairs, one direction at a time
    def pairs(self, rounds: list[list[tuple[int, int]]], cap: float) -> None:
        me = self.place.node_index
        for pairs in rounds:
            partner = next((b if a == me else a for a, b in pairs if me in (a, b)), None)
            if partner is None:
                continue
            peer = partner * self.place.ranks_per_node + self.place.local_rank
            for sender in sorted((me, partner)):
                if sender == me:
                    self._send(peer, partner, cap)
                else:
                    self._receive(peer)

    def _send(self, peer: int, partner: int, cap: float) -> None:
        dist, buf, token = self.dist, self.buf, self.token
        src, dst = self._endpoint(self.place.node_index), self._endpoint(partner)
        self.record({"kind": "link_start", "src": src, "dst": dst, "time": time.time()})
        dist.send(buf[:1], peer)  # warm-up: opens the pair's connection (NCCL: its communicator)
        dist.recv(token, peer)
        best, transfers, started = 0.0, 0, time.monotonic()
        sizes = [self.probe] + [self.full] * MAX_FULL
        for i, n in enumerate(sizes):
            dist.recv(token, peer)  # the receiver is ready
            self._sync()
            t0 = time.perf_counter()
            dist.send(buf[:n], peer)
            dist.recv(token, peer)  # ... and has everything
            self._sync()
            dt = max(time.perf_counter() - t0, 1e-9)
            best, transfers = max(best, n * 4 / dt), transfers + 1
            go = i + 1 < len(sizes) and (time.monotonic() - started) + dt * (self.full / n) < cap
            token.fill_(1.0 if go else 0.0)
            dist.send(token, peer)
            if not go:
                break
        self.record({"kind": "link", "src": src, "dst": dst, "bytes_per_s": best, "transfers": transfers,
                     "complete": True})

    def _receive(self, peer: int) -> None:
        dist, buf, token = self.dist, self.buf, self.token
        dist.recv(buf[:1], peer)
        dist.send(token, peer)
        for n in [self.probe] + [self.full] * MAX_FULL:
            dist.send(token, peer)
            dist.recv(buf[:n], peer)
            dist.send(token, peer)
            dist.recv(token, peer)
            if float(token.item()) == 0.0:
                break

    # collectives
    def _allreduce_busbw(self, group: Any, size: int, leader: int, cap: float) -> float:
        """Best bus bandwidth of a probe and up to MAX_FULL full all-reduces; the leader decides when to stop."""
        dist, buf, token = self.dist, self.buf, self.token
        dist.all_reduce(buf[:1], group=group)  # warm-up
        best, started = 0.0, time.monotonic()
        sizes = [self.probe] + [self.full] * MAX_FULL
        for i, n in enumerate(sizes):
            dist.all_reduce(token, group=group)  # everyone is here
            self._sync()
            t0 = time.perf_counter()
            dist.all_reduce(buf[:n], group=group)
            self._sync()
            dt = max(time.perf_counter() - t0, 1e-9)
            best = max(best, n * 4 * 2 * (size - 1) / size / dt)
            go = i + 1 < len(sizes) and (time.monotonic() - started) + dt * (self.full / n) < cap
            token.fill_(1.0 if go else 0.0)
            dist.broadcast(token, leader, group=group)
            if float(token.item()) == 0.0:
                break
        return best

    def intra_node(self, cap: float) -> None:
        p = self.place
        group, _ = self.dist.new_subgroups(p.ranks_per_node)
        leader = p.node_index * p.ranks_per_node
        busbw = self._allreduce_busbw(group, p.ranks_per_node, leader, cap)
        if p.local_rank == 0:
            self.record({"kind": "intra", "node": p.node, "bytes_per_s": busbw})

    def all_nodes(self, cap: float) -> None:
        busbw = self._allreduce_busbw(None, self.place.world, 0, cap)
        if self.place.rank == 0:
            self.record({"kind": "all", "bytes_per_s": busbw, "ranks": self.place.world})


# ---- verdict (pure) ------------------------------------------------------------------------------

@dataclass
class NetVerdict:
    link_baseline: Optional[float] = None  # bytes/s a link is compared with
    link_baseline_source: str = ""
    node_findings: dict[str, list[Finding]] = field(default_factory=lambda: defaultdict(list))
    warnings: list[Finding] = field(default_factory=list)  # nothing to pin on a node
    tx: dict[str, float] = field(default_factory=dict)  # node -> median outgoing link bandwidth (display)
    rx: dict[str, float] = field(default_factory=dict)


def _gbs(value: float) -> str:
    return f"{value / 1e9:.3g} GB/s"


def _majority_slow(links: list[LinkSample], slow: set[int]) -> bool:
    return bool(links) and 2 * sum(id(link) in slow for link in links) > len(links)


def link_verdict(m: Measurements, expected: Expectation, fraction: float, ranks_per_node: int) -> NetVerdict:
    """Slow links, the nodes to blame for them, and the within-node and all-node checks."""
    v = NetVerdict()
    links = m.links
    by_src: dict[Endpoint, list[LinkSample]] = defaultdict(list)
    by_dst: dict[Endpoint, list[LinkSample]] = defaultdict(list)
    for link in links:
        by_src[link.src].append(link)
        by_dst[link.dst].append(link)
    for node in {e.node for e in by_src} | {e.node for e in by_dst}:
        out = [x.bytes_per_s for e, ls in by_src.items() if e.node == node for x in ls]
        inc = [x.bytes_per_s for e, ls in by_dst.items() if e.node == node for x in ls]
        if out:
            v.tx[node] = statistics.median(out)
        if inc:
            v.rx[node] = statistics.median(inc)
    measured = [x.bytes_per_s for x in links if x.complete and x.transfers > 0]
    if expected.link is not None:
        v.link_baseline, v.link_baseline_source = expected.link, "expected"
    elif measured:
        v.link_baseline, v.link_baseline_source = statistics.median(measured), "median of all links"
    if links and v.link_baseline is not None:
        threshold = fraction * v.link_baseline
        slow = {id(x) for x in links if x.bytes_per_s < threshold}
        blamed_tx = {e for e, ls in by_src.items() if _majority_slow(ls, slow)}
        left = {id(x) for x in links if id(x) in slow and x.src not in blamed_tx}
        blamed_rx = {e for e, ls in by_dst.items() if _majority_slow(ls, left)}
        why = f"< {_gbs(threshold)} ({fraction:.0%} of the {v.link_baseline_source} {_gbs(v.link_baseline)})"
        for role, blamed, table in (("sends", blamed_tx, by_src), ("receives", blamed_rx, by_dst)):
            for e in sorted(blamed, key=lambda x: (x.node, x.local_rank)):
                bad = [x for x in table[e] if id(x) in slow]
                value = statistics.median(x.bytes_per_s for x in bad)
                stalled = " (a transfer never finished)" if any(not x.complete for x in bad) else ""
                peers = ", ".join(sorted({(x.dst if role == "sends" else x.src).name(ranks_per_node) for x in bad}))
                towards = "to" if role == "sends" else "from"
                v.node_findings[e.node].append(Finding(
                    "net.link", FAIL, f"{e.name(ranks_per_node)} {role} at {_gbs(value)} {towards} {peers}{stalled} {why}",
                    figure=f"{e.name(ranks_per_node)} {role} {_gbs(value)} {why}"))
        for x in links:
            if id(x) in left and x.dst not in blamed_rx:
                v.warnings.append(Finding("net.link", WARN, f"link {x.src.name(ranks_per_node)} -> "
                                          f"{x.dst.name(ranks_per_node)} at {_gbs(x.bytes_per_s)} {why}; neither end "
                                          "is slow with its other peers"))
    _intra_verdict(m.intra, expected, fraction, v)
    if m.all_nodes is not None and expected.all_nodes is not None:  # without a catalogue figure: information only
        if m.all_nodes.bytes_per_s < fraction * expected.all_nodes:
            v.warnings.append(Finding("net.all", WARN, f"all-reduce across {m.all_nodes.ranks} ranks at "
                                      f"{_gbs(m.all_nodes.bytes_per_s)} bus bandwidth, < {fraction:.0%} of the expected "
                                      f"{_gbs(expected.all_nodes)}", figure=_gbs(m.all_nodes.bytes_per_s)))
    for error in m.errors:
        v.warnings.append(Finding("net.all", WARN, error))
    return v


def _intra_verdict(samples: list[NodeSample], expected: Expectation, fraction: float, v: NetVerdict) -> None:
    if not samples:
        return
    base, source = expected.intra_node, "expected"
    if base is None:
        base, source = statistics.median(s.bytes_per_s for s in samples), "median of the nodes"
    for s in samples:
        if s.bytes_per_s < fraction * base:
            v.node_findings[s.node].append(Finding(
                "net.intra", FAIL, f"all-reduce within {s.node} at {_gbs(s.bytes_per_s)} bus bandwidth, < "
                f"{fraction:.0%} of the {source} {_gbs(base)} (NVLink)",
                figure=f"intra-node {_gbs(s.bytes_per_s)} < {_gbs(fraction * base)}"))
