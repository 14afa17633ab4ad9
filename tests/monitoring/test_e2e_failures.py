"""Failures and bad input on real 2-rank CPU runs, scraped by the real Prometheus of the session.

* a rank fails mid-training: W&B (offline) gets "Job failed" naming that rank with the reason and
  a log tail, the Pushgateway and the last scrape carry ``failed``, the dead rank stays a target;
* everything monitoring needs is missing or broken (rank port taken, Pushgateway unreachable,
  W&B online without credentials, no NVML, no EFA sysfs): the job still trains to the end, each
  problem is said once, and ``hyperlaunch_monitoring_degraded{component}`` shows it.
"""

from __future__ import annotations

import socket

import pytest

from tests.faults import FAULT_ENV, PLUGIN

from tests.monitoring.conftest import Launched, Stack, fake_nvml_env, launch
from tests.monitoring.fakes import write_nvml_spec
from tests.monitoring.services import free_port, wait_for

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def failed_run(stack: Stack) -> Launched:
    run = launch(stack, [
        "training.train_steps=60", "monitoring.wandb=true", "monitoring.wandb_mode=offline",
        f"monitoring.pushgateway_url={stack.pushgateway.url}", "monitoring.final_scrape_grace_s=2",
        "monitoring.alerts.log_tail_lines=5",
    ], env={FAULT_ENV: "fail:rank=1,step=25", "HYPERLAUNCH_PLUGINS": PLUGIN})
    assert run.proc.returncode == 1, run.output[-4000:]
    return run


def test_failed_rank_is_reported_in_wandb_with_reason_and_log_tail(failed_run: Launched) -> None:
    records = failed_run.wandb_records()
    failed = [r["alert"] for r in records if r["type"] == "alert" and r["alert"]["title"] == "Job failed"]
    assert len(failed) == 1, [r["alert"]["title"] for r in records if r["type"] == "alert"]
    text = failed[0]["text"]
    assert f"rank 1 on {socket.gethostname()}, GPU 1 (cpu) failed at step 24" in text
    assert "RuntimeError: injected test fault (HYPERLAUNCH_TEST_FAULT) at step 25" in text
    assert "--- traceback (last lines)" in text and "--- local.out (last" in text and "step=24/60" in text
    assert failed[0]["level"] == "ERROR"
    exits = [r["exit"] for r in records if r["type"] == "exit"]
    assert exits and exits[-1].get("exit_code") == 1
    assert (failed_run.run_dir / "monitoring" / "failures" / "rank-1.json").exists()


def test_failed_state_reaches_prometheus_and_the_job_failed_rule(stack: Stack, failed_run: Launched) -> None:
    run = failed_run.run_dir.name
    expr = ('max by (run) (hyperlaunch_job_state{state="failed"}) == 1 and on (run) '
            '(time() - max by (run) (hyperlaunch_job_end_time_seconds) < 6 * 3600)')  # HyperlaunchJobFailed
    result = wait_for(lambda: [s for s in stack.prometheus.query(expr) if s["metric"]["run"] == run], 15,
                      "the failed state from the Pushgateway")
    assert result
    pushed = stack.prometheus.query(f'hyperlaunch_job_state{{job="hyperlaunch", run="{run}", state="failed"}}')
    assert {s["metric"]["rank"] for s in pushed if s["value"][1] == "1"} >= {"1"}
    # the failed rank keeps its target file, so `up == 0` (HyperlaunchRankDown) points at it
    assert list(stack.targets.glob(f"{run}.rank-00001.json"))
    down = wait_for(lambda: stack.prometheus.query(f'up{{job="hyperlaunch-ranks", run="{run}"}} == 0'), 15,
                    "the dead rank's target to go down")
    assert "1" in {s["metric"]["rank"] for s in down}


@pytest.fixture(scope="module")
def degraded_run(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[Launched, int]:
    home = tmp_path_factory.mktemp("home")  # no ~/.netrc: W&B has no credentials
    no_driver = write_nvml_spec(home / "nvml.json", error="LibraryNotFound")  # the same on a GPU machine
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    base = taken.getsockname()[1] - 1  # rank 0 wants base + 1: taken
    try:
        run = launch(stack, [
            "training.train_steps=150", f"monitoring.port_base={base}", "cluster.gpu_type=h100-80gb",
            "cluster.efa_devices=2", "monitoring.efa_sysfs_dir=/nonexistent/infiniband",
            f"monitoring.pushgateway_url=http://127.0.0.1:{free_port()}", "monitoring.push_interval_s=1",
            "monitoring.wandb=true", "monitoring.wandb_mode=online",
        ], env={"HOME": str(home), **fake_nvml_env(no_driver)})
    finally:
        taken.close()
    return run, base


def test_job_trains_on_and_says_once_what_is_missing(degraded_run: tuple[Launched, int]) -> None:
    run, base = degraded_run
    assert run.proc.returncode == 0, run.output[-4000:]
    log = (run.run_dir / "logs" / "local.out").read_text()
    assert "training finished: steps=150" in log
    for needle in (f"port {base + 1} is taken", "cannot push to the Pushgateway", "W&B has no credentials",
                   "NVML is not available", "0 of the 2 EFA devices the cluster config expects"):
        assert log.count(needle) == 1, (needle, log[-3000:])


def test_degradation_shows_in_metrics_and_rules(stack: Stack, degraded_run: tuple[Launched, int]) -> None:
    run, _ = degraded_run
    window = (run.start, run.end + 5)
    series = stack.prometheus.query_range(f'hyperlaunch_monitoring_degraded{{run="{run.run_dir.name}"}} == 1', *window)
    components = {s["metric"]["component"] for s in series}
    assert {"rank_port", "pushgateway", "wandb", "nvml", "efa_sysfs"} <= components, components
    # rank 0 moved to an ephemeral port and was still scraped
    steps = stack.prometheus.query_range(f'hyperlaunch_train_step{{run="{run.run_dir.name}", rank="0"}}', *window)
    assert steps, "rank 0 was not scraped on its fallback port"
    rule = "max by (run, host, component) (hyperlaunch_monitoring_degraded) == 1"  # HyperlaunchMonitoringDegraded
    assert stack.prometheus.query_range(rule, *window)
    missing = ("hyperlaunch_efa_expected_devices > on (run, host) group_left count by (run, host) "
               "(node_amazonefa_info) or (hyperlaunch_efa_expected_devices > 0 unless on (run, host) "
               "node_amazonefa_info)")  # EfaDevicesMissing
    assert stack.prometheus.query_range(missing, *window)
    assert not (run.run_dir / "wandb").exists()  # no W&B run was attempted without credentials
