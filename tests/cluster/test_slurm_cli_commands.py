"""Tier 1: what SlurmCLI sends and how it reacts, with a scripted runner."""

from __future__ import annotations

import pytest

from cluster.backend import (
    SLURM_CLI_NOT_FOUND,
    BackendError,
    BackendUnavailable,
    JobBackend,
    JobState,
    SubmitError,
)
from cluster.slurm_cli import SACCT_FIELDS, SQUEUE_FORMAT, CommandResult, SlurmCLI, backoff_delays
from tests.cluster.fakes import FakeRunner, fail, ok, recorded, recorded_result


def test_slurm_cli_is_a_job_backend():
    assert isinstance(SlurmCLI(runner=FakeRunner()), JobBackend)


# ----------------------------------------------------------------------------- submit


def test_submit_sends_parsable_sbatch_with_job_name():
    runner = FakeRunner([(["sbatch"], ok("4242\n"))])
    assert SlurmCLI(runner=runner).submit("/fsx/runs/a b/job.sbatch", job_name="llama-70b") == "4242"
    assert runner.calls == [("sbatch", "--parsable", "--job-name=llama-70b", "/fsx/runs/a b/job.sbatch")]


def test_submit_without_name_and_with_cluster_suffix():
    runner = FakeRunner([(["sbatch"], ok("77;hyperpod\n", stderr="sbatch: warning: something\n"))])
    assert SlurmCLI(runner=runner).submit("job.sbatch") == "77"
    assert runner.calls == [("sbatch", "--parsable", "job.sbatch")]


def test_submit_extra_args_go_before_the_script():
    runner = FakeRunner([(["sbatch"], ok("5\n"))])
    SlurmCLI(runner=runner).submit("job.sbatch", extra_args=["--dependency=afterok:4"])
    assert runner.calls[0][-2:] == ("--dependency=afterok:4", "job.sbatch")


@pytest.mark.parametrize("case", sorted(recorded()["sbatch"]))
def test_submit_refusals_raise_submit_error_with_sbatch_stderr_and_hint(case):
    result = recorded_result("sbatch", case)
    runner = FakeRunner([(["sbatch"], result)])
    with pytest.raises(SubmitError) as info:
        SlurmCLI(runner=runner).submit("job.sbatch", job_name="x")
    err = info.value
    assert err.stderr == result.stderr.strip()
    assert err.hint
    text = str(err)
    assert result.stderr.strip() in text and f"Hint: {err.hint}" in text


def test_gres_refusal_explains_missing_gpu_gres():
    runner = FakeRunner([(["sbatch"], recorded_result("sbatch", "gpus_per_node_without_gres"))])
    with pytest.raises(SubmitError) as info:
        SlurmCLI(runner=runner).submit("job.sbatch")
    text = str(info.value)
    assert "sbatch: error: Invalid generic resource (gres) specification" in text
    assert "--gpus-per-node" in text and "GRES" in text


def test_sbatch_missing_says_so():
    runner = FakeRunner([(["sbatch"], FileNotFoundError(2, "No such file or directory", "sbatch"))])
    with pytest.raises(BackendUnavailable) as info:
        SlurmCLI(runner=runner).submit("job.sbatch")
    assert str(info.value).startswith(SLURM_CLI_NOT_FOUND)
    assert "cluster=local" in str(info.value)


def test_unreachable_controller_is_a_backend_error_not_a_refusal():
    stderr = ("sbatch: error: Batch job submission failed: Unable to contact slurm controller "
              "(connect failure)\n")
    runner = FakeRunner([(["sbatch"], fail(stderr))])
    with pytest.raises(BackendError) as info:
        SlurmCLI(runner=runner).submit("job.sbatch")
    assert not isinstance(info.value, SubmitError)
    assert "not reachable" in str(info.value) and "connect failure" in str(info.value)


def test_slurm_installed_but_not_configured_is_a_backend_error():
    # Real 22.05 output with the client installed and neither SLURM_CONF nor /etc/slurm/slurm.conf.
    stderr = ("sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
              "sbatch: error: fetch_config: DNS SRV lookup failed\n"
              "sbatch: error: _establish_config_source: failed to fetch config\n"
              "sbatch: fatal: Could not establish a configuration source\n")
    runner = FakeRunner([(["sbatch"], fail(stderr))])
    with pytest.raises(BackendError) as info:
        SlurmCLI(runner=runner).submit("job.sbatch")
    assert not isinstance(info.value, SubmitError)
    assert "SLURM_CONF" in str(info.value) and "Could not establish a configuration source" in str(info.value)


def test_sbatch_printing_garbage_is_a_backend_error():
    runner = FakeRunner([(["sbatch"], ok("Submitted batch job 12\n"))])
    with pytest.raises(BackendError, match="job id"):
        SlurmCLI(runner=runner).submit("job.sbatch")


# ----------------------------------------------------------------------------- status


def _real_cluster_runner() -> FakeRunner:
    """squeue / sacct / sacct -c / scontrol answering as the recorded 22.05 cluster did."""
    rec = recorded()
    by_id = {rec["ids"][k]: f"scontrol_{k}" for k in ("completed", "failed")}
    by_id[rec["ids"]["running"]] = "scontrol_cancelled"

    def scontrol(argv: tuple[str, ...]) -> CommandResult:
        key = by_id.get(argv[-1], "scontrol_unknown")
        return recorded_result(key)

    return FakeRunner([
        (["squeue"], recorded_result("squeue")),
        (["sacct", "-c"], recorded_result("sacct_jobcomp")),
        (["sacct"], recorded_result("sacct_disabled")),
        (["scontrol", "show", "job"], scontrol),
    ])


def test_status_batches_squeue_then_accounting_then_jobcomp():
    rec = recorded()
    ids = rec["ids"]
    runner = FakeRunner([
        (["squeue"], ok(f"{ids['pending']}|PENDING|0:00||Priority\n")),
        (["sacct", "-c"], recorded_result("sacct_jobcomp")),
        (["sacct"], recorded_result("sacct_disabled")),
    ])
    cli = SlurmCLI(runner=runner)
    wanted = [ids["completed"], ids["failed"], ids["running"], ids["pending"]]
    out = cli.status(wanted)
    assert list(out) == wanted
    assert out[ids["completed"]].state is JobState.COMPLETED and out[ids["completed"]].exit_code == 0
    assert out[ids["failed"]].state is JobState.FAILED and out[ids["failed"]].exit_code == 3
    assert out[ids["running"]].state is JobState.CANCELLED
    assert out[ids["pending"]].state is JobState.PENDING and out[ids["pending"]].reason == "Priority"
    joined = ",".join(wanted)
    finished = ",".join(wanted[:3])
    assert runner.calls == [
        ("squeue", "--noheader", f"--jobs={joined}", f"--format={SQUEUE_FORMAT}"),
        ("sacct", "-X", "-n", "-P", f"--format={SACCT_FIELDS}", f"--jobs={finished}"),
        ("sacct", "-c", "-X", "-n", "-P", f"--format={SACCT_FIELDS}", f"--jobs={finished}"),
    ]


def test_status_remembers_that_accounting_is_disabled():
    ids = recorded()["ids"]
    runner = _real_cluster_runner()
    cli = SlurmCLI(runner=runner)
    cli.status([ids["completed"]])
    runner.calls.clear()
    cli.status([ids["completed"]])
    assert runner.commands() == ["squeue", "sacct -c"]


def test_status_uses_slurmdbd_when_it_answers():
    runner = FakeRunner([
        (["squeue"], ok("")),
        (["sacct"], ok("101|CANCELLED by 1000|0:15|00:00:31|p5-st-1-1|None\n")),
    ])
    out = SlurmCLI(runner=runner).status(["101"])
    assert out["101"].state is JobState.CANCELLED and out["101"].signal == 15
    assert runner.commands() == ["squeue", "sacct -X"]


def test_status_falls_back_to_scontrol_when_jobcomp_has_nothing():
    ids = recorded()["ids"]
    runner = _real_cluster_runner()
    runner.rules.insert(0, (("sacct", "-c"), ok("")))  # e.g. jobcomp file not readable on this host
    out = SlurmCLI(runner=runner).status([ids["failed"], "99999"])
    assert out[ids["failed"]].state is JobState.FAILED and out[ids["failed"]].exit_code == 3
    assert out[ids["failed"]].reason == "NonZeroExitCode"
    assert out["99999"].state is JobState.UNKNOWN and not out["99999"].terminal
    assert runner.calls[-2:] == [("scontrol", "show", "job", "-o", ids["failed"]),
                                 ("scontrol", "show", "job", "-o", "99999")]


def test_status_asks_scontrol_when_jobcomp_lost_the_state():
    # Real 22.05 behaviour for a job named "odd name; rm -rf x": the jobcomp parser of
    # sacct -c splits the name and prints an empty State.
    runner = FakeRunner([
        (["squeue"], ok("")),
        (["sacct", "-c"], ok("1|||00:00:00|vm|\n", stderr="sacct: error: Unknown type name; rm -rf x JobState: "
                                                        "COMPLETED\n")),
        (["sacct"], recorded_result("sacct_disabled")),
        (["scontrol"], ok("JobId=1 JobName=odd name; rm -rf x JobState=COMPLETED Reason=None ExitCode=0:0\n")),
    ])
    assert SlurmCLI(runner=runner).status(["1"])["1"].state is JobState.COMPLETED


def test_status_single_unknown_id_is_not_an_error():
    runner = FakeRunner([
        (["squeue"], recorded_result("squeue_unknown_single")),
        (["sacct", "-c"], ok("")),
        (["sacct"], recorded_result("sacct_disabled")),
        (["scontrol"], recorded_result("scontrol_unknown")),
    ])
    assert SlurmCLI(runner=runner).status(["99999"])["99999"].state is JobState.UNKNOWN


def test_status_of_nothing_runs_nothing_and_duplicates_are_merged():
    runner = FakeRunner([(["squeue"], ok("5|RUNNING|1:02|vm|None\n"))])
    cli = SlurmCLI(runner=runner)
    assert cli.status([]) == {}
    assert runner.calls == []
    out = cli.status(["5", "5"])
    assert list(out) == ["5"] and out["5"].elapsed == "00:01:02"
    assert runner.calls == [("squeue", "--noheader", "--jobs=5", f"--format={SQUEUE_FORMAT}")]


def test_status_when_controller_is_down_raises_backend_error():
    stderr = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"
    runner = FakeRunner([(["squeue"], fail(stderr))])
    with pytest.raises(BackendError, match="not reachable"):
        SlurmCLI(runner=runner).status(["1"])


# ----------------------------------------------------------------------------- cancel, requeue, info


def test_cancel_sends_scancel_and_tolerates_finished_jobs():
    runner = FakeRunner([(["scancel", "3"], recorded_result("scancel_finished")),
                         (["scancel", "4"], fail("scancel: error: Kill job error on job id 4: "
                                                 "Job/step already completing or completed\n"))])
    cli = SlurmCLI(runner=runner)
    cli.cancel("3")
    cli.cancel("4")
    assert runner.calls == [("scancel", "3"), ("scancel", "4")]


def test_cancel_failure_raises():
    runner = FakeRunner([(["scancel"], fail("scancel: error: Kill job error on job id 9: Access/permission denied\n"))])
    with pytest.raises(BackendError, match="permission denied"):
        SlurmCLI(runner=runner).cancel("9")


def test_stop_signals_only_the_batch_shell():
    runner = FakeRunner([(["scancel", "--batch", "--signal=TERM", "5"], ok()),
                         (["scancel", "--batch", "--signal=TERM", "6"], fail("scancel: error: Kill job error on job id 6: "
                                                                            "Job/step already completing or completed\n")),
                         (["scancel", "--batch", "--signal=TERM", "7"], fail("scancel: error: Access/permission denied\n"))])
    cli = SlurmCLI(runner=runner)
    cli.stop("5")
    cli.stop("6")
    with pytest.raises(BackendError, match="permission denied"):
        cli.stop("7")
    assert runner.calls[0] == ("scancel", "--batch", "--signal=TERM", "5")


def test_requeue_commands():
    runner = FakeRunner([(["scontrol"], ok())])
    cli = SlurmCLI(runner=runner)
    cli.requeue("8")
    cli.requeue("10", hold=True)
    assert runner.calls == [("scontrol", "requeue", "8"), ("scontrol", "requeuehold", "10")]


def test_requeue_start_now_waits_for_the_old_run_to_finish_completing():
    states = ["JobId=9 JobState=COMPLETING Reason=None", "JobId=9 JobState=COMPLETING Reason=None",
              "JobId=9 JobState=PENDING Reason=BeginTime"]
    runner = FakeRunner([(["scontrol", "show", "job"], lambda argv: ok(states.pop(0) + "\n")),
                         (["scontrol"], ok())])
    clock = Clock()
    SlurmCLI(runner=runner, sleep=clock.sleep, clock=clock).requeue("9", start_now=True)
    assert runner.calls[0] == ("scontrol", "requeue", "9")
    assert runner.calls[-1] == ("scontrol", "update", "JobId=9", "StartTime=now")
    assert runner.commands().count("scontrol show") == 3 and clock.sleeps == [0.2, 0.2]


def test_job_info_and_stdout_path():
    runner = FakeRunner([(["scontrol", "show", "job", "-o", "99999"], recorded_result("scontrol_unknown")),
                         (["scontrol", "show", "job"], recorded_result("scontrol_completed"))])
    cli = SlurmCLI(runner=runner)
    assert cli.stdout_path("3").endswith("/ok.sh_3.out")
    assert cli.job_info("3")["JobState"] == "COMPLETED"
    assert cli.job_info("99999") is None


def test_version():
    runner = FakeRunner([(["scontrol", "--version"], ok("slurm 22.05.8\n"))])
    assert SlurmCLI(runner=runner).version() == (22, 5, 8)


# ----------------------------------------------------------------------------- wait


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def _sequence_runner(squeue_outputs: list[str], final: str) -> FakeRunner:
    """squeue answers from a list (one per poll); once exhausted the job is in jobcomp."""
    outputs = list(squeue_outputs)

    def squeue(argv):
        return ok(outputs.pop(0) if outputs else "")

    return FakeRunner([(["squeue"], squeue), (["sacct", "-c"], ok(final)),
                       (["sacct"], recorded_result("sacct_disabled"))])


def test_backoff_delays_double_up_to_the_cap():
    gen = backoff_delays(1.0, 60.0)
    assert [next(gen) for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    gen = backoff_delays(1.0, 0.5)
    assert [next(gen) for _ in range(3)] == [0.5, 0.5, 0.5]


def test_wait_backs_off_reports_changes_and_returns_terminal_states():
    polls = ["7|PENDING|0:00||Priority\n", "7|PENDING|0:00||Resources\n", "7|RUNNING|0:01|vm|None\n",
             "7|RUNNING|0:03|vm|None\n", "7|RUNNING|0:07|vm|None\n", "7|COMPLETING|0:15|vm|None\n"]
    runner = _sequence_runner(polls, "7|COMPLETED|0:0|00:00:15|vm|\n")
    clock = Clock()
    seen = []
    cli = SlurmCLI(runner=runner, max_poll_interval_s=4.0, sleep=clock.sleep, clock=clock)
    final = cli.wait(["7"], timeout_s=600, on_change=lambda st: seen.append(st.state.value))
    assert final["7"].state is JobState.COMPLETED and final["7"].exit_code == 0
    assert seen == ["PENDING", "RUNNING", "COMPLETING", "COMPLETED"]
    assert clock.sleeps == [1, 2, 4, 4, 4, 4]
    assert runner.commands().count("squeue") == 7


def test_wait_stops_polling_finished_jobs():
    outputs = ["1|RUNNING|0:01|vm|None\n2|RUNNING|0:01|vm|None\n", "2|RUNNING|0:02|vm|None\n", ""]
    jobcomp = {"1": "1|FAILED|2:0|00:00:01|vm|\n", "2": "2|COMPLETED|0:0|00:00:03|vm|\n"}

    def sacct_c(argv):
        ids = argv[-1].removeprefix("--jobs=").split(",")
        return ok("".join(jobcomp[i] for i in ids))

    runner = FakeRunner([(["squeue"], lambda argv: ok(outputs.pop(0))), (["sacct", "-c"], sacct_c),
                         (["sacct"], recorded_result("sacct_disabled"))])
    clock = Clock()
    final = SlurmCLI(runner=runner, sleep=clock.sleep, clock=clock).wait(["1", "2"])
    assert final["1"].exit_code == 2 and final["2"].state is JobState.COMPLETED
    squeue_calls = [c for c in runner.calls if c[0] == "squeue"]
    assert squeue_calls[-1][2] == "--jobs=2"


def test_wait_times_out():
    runner = FakeRunner([(["squeue"], ok("7|RUNNING|0:01|vm|None\n"))])
    clock = Clock()
    cli = SlurmCLI(runner=runner, max_poll_interval_s=60, sleep=clock.sleep, clock=clock)
    with pytest.raises(TimeoutError, match="7=RUNNING"):
        cli.wait(["7"], timeout_s=10)
    assert clock.now == pytest.approx(10)
    assert clock.sleeps == [1, 2, 4, 3]


def test_wait_survives_a_failed_poll():
    answers = [fail("slurm_load_jobs error: Socket timed out on send/recv operation\n"), ok("")]
    runner = FakeRunner([(["squeue"], lambda argv: answers.pop(0)),
                         (["sacct", "-c"], ok("7|COMPLETED|0:0|00:00:01|vm|\n")),
                         (["sacct"], recorded_result("sacct_disabled"))])
    clock = Clock()
    final = SlurmCLI(runner=runner, sleep=clock.sleep, clock=clock).wait(["7"], timeout_s=30)
    assert final["7"].state is JobState.COMPLETED


def test_wait_does_not_retry_without_slurm_commands():
    runner = FakeRunner([(["squeue"], FileNotFoundError(2, "No such file", "squeue"))])
    clock = Clock()
    with pytest.raises(BackendUnavailable):
        SlurmCLI(runner=runner, sleep=clock.sleep, clock=clock).wait(["1"])
    assert clock.sleeps == []
