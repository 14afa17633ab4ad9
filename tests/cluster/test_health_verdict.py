"""The bandwidth catalogue, the round-robin pairing, who a slow link is pinned on, and the quarantine
policy (pure functions, table-driven)."""

from __future__ import annotations

import itertools

import pytest

from cluster.bandwidth import GBIT, expected_bandwidth
from cluster.health_net import link_verdict, pair_rounds
from cluster.health_records import (FAIL, WARN, AllSample, Endpoint, Finding, HealthSettings, LinkSample,
                                    Measurements, NodeReport, NodeSample)
from cluster.health_verdict import FAILED, PASS, QUARANTINE, WARNED, decide

GB = 1e9
CPU = expected_bandwidth(instance_type=None, gpu_type="cpu", ranks_per_node=1)


# ---- catalogue -----------------------------------------------------------------------------------

@pytest.mark.parametrize("instance,gpu,link_gbs,all_gbs,intra_gbs", [
    ("p5.48xlarge", "h100-80gb", 50.0, 400.0, 450.0),
    ("ml.p5e.48xlarge", "h200-141gb", 50.0, 400.0, 450.0),
    ("p5en.48xlarge", "h200-141gb", 50.0, 400.0, 450.0),
    ("ml.p4de.24xlarge", "a100-80gb", 6.25, 50.0, 300.0),
    ("p4d.24xlarge", "a100-40gb", 6.25, 50.0, 300.0),
])
def test_catalogue_figures_per_gpu_per_node_and_nvlink(instance, gpu, link_gbs, all_gbs, intra_gbs) -> None:
    e = expected_bandwidth(instance_type=instance, gpu_type=gpu, ranks_per_node=8)
    assert (e.link / GB, e.all_nodes / GB, e.intra_node / GB) == pytest.approx((link_gbs, all_gbs, intra_gbs))
    assert "Gbit/s" in e.source and "NVLink" in e.source and "https://" in e.source


def test_no_catalogue_figure_means_the_median_rule() -> None:
    assert (CPU.link, CPU.all_nodes, CPU.intra_node) == (None, None, None)
    generic = expected_bandwidth(instance_type=None, gpu_type="h100-94gb", ranks_per_node=8)
    assert generic.link is None and generic.intra_node is None  # H100 NVL: no all-to-all NVLink
    override = expected_bandwidth(instance_type="p5.48xlarge", gpu_type="h100-80gb", ranks_per_node=8,
                                  override_gbps=400)
    assert override.all_nodes == 400 * GBIT and "expected_gbps=400" in override.source


# ---- pairing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", range(1, 10))
def test_every_pair_once_and_each_node_once_per_round(n: int) -> None:
    rounds = pair_rounds(n)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))
    for r in rounds:
        nodes = [x for p in r for x in p]
        assert len(nodes) == len(set(nodes))
    assert len(rounds) == (0 if n < 2 else n - 1 if n % 2 == 0 else n)


# ---- links ---------------------------------------------------------------------------------------

def links(rates: dict[tuple[str, str], float], stalled: tuple[tuple[str, str], ...] = ()) -> Measurements:
    m = Measurements(links=[LinkSample(Endpoint(a), Endpoint(b), r * GB, 6) for (a, b), r in rates.items()])
    m.links += [LinkSample(Endpoint(a), Endpoint(b), 0.0, 0, complete=False) for a, b in stalled]
    return m


def full_mesh(nodes: list[str], rate: float = 1.4, **special: float) -> dict[tuple[str, str], float]:
    return {(a, b): special.get(f"{a}_{b}", rate) for a in nodes for b in nodes if a != b}


def blamed(v) -> dict[str, list[str]]:
    return {node: [f.message.split(" at ")[0] for f in fs] for node, fs in v.node_findings.items() if fs}


@pytest.mark.parametrize("case,rates,stalled,expect_blamed,expect_warnings", [
    ("healthy pair, 2x noise", full_mesh(["n1", "n2"], n1_n2=0.8), (), {}, 0),
    ("egress of n2 throttled (tbf)", full_mesh(["n1", "n2"], n2_n1=0.0012), (), {"n2": ["n2 sends"]}, 0),
    ("both directions equally slow: no peer to compare with", full_mesh(["n1", "n2"], n1_n2=0.001, n2_n1=0.001), (),
     {}, 0),
    ("egress of n2 among three", full_mesh(["n1", "n2", "n3"], n2_n1=0.001, n2_n3=0.001), (), {"n2": ["n2 sends"]}, 0),
    ("ingress of n3 among three", full_mesh(["n1", "n2", "n3"], n1_n3=0.001, n2_n3=0.001), (),
     {"n3": ["n3 receives"]}, 0),
    ("one bad link among four: nobody to blame", full_mesh(["a", "b", "c", "d"], a_b=0.001, b_a=0.001), (), {}, 2),
    ("a transfer that never finished", {("n1", "n2"): 1.4}, (("n2", "n1"),), {"n2": ["n2 sends"]}, 0),
])
def test_slow_links_are_pinned_on_the_node_that_explains_them(case, rates, stalled, expect_blamed,
                                                              expect_warnings) -> None:
    v = link_verdict(links(rates, stalled), CPU, 0.5, 1)
    assert blamed(v) == expect_blamed, case
    assert len(v.warnings) == expect_warnings, case
    assert v.link_baseline_source == "median of all links"


def test_the_finding_names_the_check_the_figure_and_the_baseline() -> None:
    v = link_verdict(links(full_mesh(["n1", "n2", "n3"], n2_n1=0.0012, n2_n3=0.0012)), CPU, 0.5, 1)
    (f,) = v.node_findings["n2"]
    assert f.check == "net.link" and f.severity == FAIL
    assert f.figure == "n2 sends 0.0012 GB/s < 0.7 GB/s (50% of the median of all links 1.4 GB/s)"
    assert "to n1, n3" in f.message
    assert v.tx["n2"] == pytest.approx(0.0012 * GB) and v.rx["n1"] == pytest.approx((1.4 + 0.0012) / 2 * GB)
    stalled = link_verdict(links({("n1", "n2"): 1.4}, (("n2", "n1"),)), CPU, 0.5, 1)
    assert "(a transfer never finished)" in stalled.node_findings["n2"][0].message


def test_two_nodes_slow_both_ways_against_the_catalogue_are_both_named() -> None:
    """Nothing tells the two ends apart: both are named, and the policy then refuses to drain every node."""
    p4d = expected_bandwidth(instance_type="p4d.24xlarge", gpu_type="a100-40gb", ranks_per_node=1)
    v = link_verdict(links(full_mesh(["n1", "n2"], rate=2.0)), p4d, 0.5, 1)
    assert blamed(v) == {"n1": ["n1 sends"], "n2": ["n2 sends"]}
    verdict = decide(["n1", "n2"], {"n1": report("n1"), "n2": report("n2")}, v, SETTINGS)
    assert verdict.status == FAILED and verdict.quarantine == ()


def test_one_slow_rail_of_a_gpu_node_against_the_catalogue() -> None:
    """Eight ranks per node, each to its counterpart: GPU 5 of b sends at a tenth of its share of EFA."""
    p5 = expected_bandwidth(instance_type="p5.48xlarge", gpu_type="h100-80gb", ranks_per_node=8)
    m = Measurements()
    for a, b in (("a", "b"), ("b", "a")):
        for rail in range(8):
            rate = 5.0 if (a, rail) == ("b", 5) else 45.0
            m.links.append(LinkSample(Endpoint(a, rail), Endpoint(b, rail), rate * GB, 6))
    v = link_verdict(m, p5, 0.5, 8)
    assert v.link_baseline == pytest.approx(50 * GB) and v.link_baseline_source == "expected"
    assert blamed(v) == {"b": ["b/gpu5 sends"]}


def test_within_node_and_all_node_checks() -> None:
    p5 = expected_bandwidth(instance_type="p5.48xlarge", gpu_type="h100-80gb", ranks_per_node=8)
    m = Measurements(intra=[NodeSample("a", 380 * GB), NodeSample("b", 90 * GB)],
                     all_nodes=AllSample(150 * GB, 16))
    v = link_verdict(m, p5, 0.5, 8)
    assert [f.check for f in v.node_findings["b"]] == ["net.intra"] and "a" not in v.node_findings
    assert [w.check for w in v.warnings] == ["net.all"]  # no node to name: a warning
    cpu = link_verdict(Measurements(links=links(full_mesh(["n1", "n2"])).links, all_nodes=AllSample(0.1 * GB, 2)),
                       CPU, 0.5, 1)
    assert cpu.warnings == []  # without a catalogue figure the all-node figure is information only
    median = expected_bandwidth(instance_type=None, gpu_type="h100-94gb", ranks_per_node=8)
    v = link_verdict(Measurements(intra=[NodeSample(n, 300 * GB) for n in "abc"] + [NodeSample("d", 40 * GB)]),
                     median, 0.5, 8)
    assert list(v.node_findings) == ["d"]


# ---- the quarantine policy -----------------------------------------------------------------------

def report(node: str, *findings: Finding) -> NodeReport:
    return NodeReport(node, node, 1.0, "nvml", "32/32", findings)


ROW_REMAP = Finding("gpu.row_remap", FAIL, "GPU 4: row remapping pending (reset the GPU)",
                    figure="GPU 4 row remap pending", gpu=4)
NO_FI_INFO = Finding("efa.software", FAIL, "fi_info not found", figure="fi_info missing")
SETTINGS = HealthSettings()


def test_healthy_and_warning_verdicts() -> None:
    nodes = ["n1", "n2"]
    v = decide(nodes, {n: report(n) for n in nodes}, None, SETTINGS)
    assert (v.status, v.exit_code, v.quarantine) == (PASS, 0, ())
    v = decide(nodes, {"n1": report("n1", Finding("gpu.ecc", WARN, "history")), "n2": report("n2")}, None, SETTINGS)
    assert (v.status, v.exit_code) == (WARNED, 0)


def test_a_failing_node_is_quarantined_with_the_check_and_the_figure() -> None:
    nodes = ["n1", "n2", "n3"]
    v = decide(nodes, {"n1": report("n1"), "n2": report("n2", ROW_REMAP), "n3": report("n3")}, None, SETTINGS)
    assert (v.status, v.exit_code, v.failed) == (QUARANTINE, 1, ["n2"])
    assert v.quarantine == (("n2", "hyperlaunch preflight: gpu.row_remap: GPU 4 row remap pending"),)
    assert "1 of 3 nodes failed (n2: gpu.row_remap)" in v.message


def test_reasons_are_one_line() -> None:
    evil = Finding("net.link", FAIL, "x", figure="a\tb\nc " + "y" * 400)
    v = decide(["n1", "n2"], {"n1": report("n1", evil, evil, evil), "n2": report("n2")}, None, SETTINGS)
    reason = v.quarantine[0][1]
    assert "\t" not in reason and "\n" not in reason and len(reason) <= 240


def test_a_node_without_results_fails() -> None:
    v = decide(["n1", "n2"], {"n1": report("n1")}, None, SETTINGS)
    assert v.status == QUARANTINE and v.nodes[1].findings[0].check == "node.result"


@pytest.mark.parametrize("case,nodes,failing,settings,previous,expect", [
    ("half of two nodes", 2, {"n2": ROW_REMAP}, SETTINGS, 0, QUARANTINE),
    ("most nodes: the software, not the nodes", 3, {"n1": NO_FI_INFO, "n2": NO_FI_INFO}, SETTINGS, 0, FAILED),
    ("every node", 2, {"n1": ROW_REMAP, "n2": ROW_REMAP}, SETTINGS, 0, FAILED),
    ("one-node job, hardware", 1, {"n1": ROW_REMAP}, SETTINGS, 0, QUARANTINE),
    ("one-node job, environment", 1, {"n1": NO_FI_INFO}, SETTINGS, 0, FAILED),
    ("quarantine off", 3, {"n2": ROW_REMAP}, HealthSettings(quarantine=False), 0, FAILED),
    ("requeued too often", 3, {"n2": ROW_REMAP}, SETTINGS, 3, FAILED),
    ("a higher fraction allowed", 3, {"n1": ROW_REMAP, "n2": ROW_REMAP}, HealthSettings(max_quarantine_fraction=0.7),
     0, QUARANTINE),
])
def test_quarantine_refused_when_it_would_be_the_wrong_medicine(case, nodes, failing, settings, previous,
                                                                 expect) -> None:
    names = [f"n{i}" for i in range(1, nodes + 1)]
    reports = {n: report(n, *([failing[n]] if n in failing else [])) for n in names}
    v = decide(names, reports, None, settings, previous_requeues=previous)
    assert v.status == expect, (case, v.message)
    assert v.exit_code == 1 and (v.quarantine != ()) == (expect == QUARANTINE)
