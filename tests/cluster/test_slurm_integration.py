"""Tier 2: SlurmCLI against a real single-node Slurm 22.05 (tests/slurm_cluster.py).

No slurmdbd here, so these also prove the fallbacks: after a job leaves squeue its state
comes from ``sacct -c`` (the jobcomp file) or ``scontrol show job``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster.backend import JobState, SubmitError
from cluster.pyslurm_backend import select_backend
from cluster.slurm_cli import CommandResult, SlurmCLI, run_command

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(90)]


def write_script(directory: Path, name: str, body: str, *sbatch: str) -> Path:
    """A batch script that runs in ``directory`` and logs to ``directory/<name>_<id>.out``."""
    header = [f"#SBATCH --chdir={directory}", f"#SBATCH --output={directory}/%x_%j.out", *[f"#SBATCH {o}" for o in sbatch]]
    path = directory / f"{name}.sbatch"
    path.write_text("#!/bin/bash\n" + "\n".join(header) + "\n" + body)
    return path


def wait_for_state(cli: SlurmCLI, job_id: str, state: JobState, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while cli.status([job_id])[job_id].state is not state:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never reached {state}: {cli.status([job_id])}")
        time.sleep(0.3)


@pytest.fixture
def cli(slurm) -> SlurmCLI:
    return SlurmCLI(max_poll_interval_s=1.0, first_poll_interval_s=0.5)


def test_srun_with_two_tasks_completes(cli, tmp_path):
    script = write_script(tmp_path, "two", 'srun bash -c \'echo "task $SLURM_PROCID of $SLURM_NTASKS"\'\n',
                          "--ntasks=2")
    job_id = cli.submit(str(script), job_name="two-tasks")
    assert job_id.isdigit()
    seen = []
    final = cli.wait([job_id], timeout_s=60, on_change=lambda st: seen.append(st.state))
    status = final[job_id]
    assert status.state is JobState.COMPLETED, status
    assert status.exit_code == 0 and status.succeeded
    assert seen[-1] is JobState.COMPLETED
    log = (tmp_path / f"two-tasks_{job_id}.out").read_text()
    assert sorted(log.split("\n")[:2]) == ["task 0 of 2", "task 1 of 2"]
    assert cli.stdout_path(job_id) == str(tmp_path / f"two-tasks_{job_id}.out")


def test_status_after_the_job_left_squeue_comes_from_jobcomp(cli, tmp_path, slurm):
    job_id = cli.submit(str(write_script(tmp_path, "quick", "true\n")))
    cli.wait([job_id], timeout_s=60)
    assert slurm.run("squeue", "--noheader", f"--jobs={job_id}").stdout.strip() == ""

    calls: list[tuple[str, ...]] = []

    def recording(argv):
        calls.append(tuple(argv))
        return run_command(argv)

    fresh = SlurmCLI(runner=recording)
    status = fresh.status([job_id])[job_id]
    assert status.state is JobState.COMPLETED and status.exit_code == 0
    assert [c[:2] for c in calls] == [("squeue", "--noheader"), ("sacct", "-X"), ("sacct", "-c")]
    assert f"JobId={job_id} " in slurm.jobcomp_path.read_text()


def test_status_from_scontrol_when_jobcomp_is_unavailable(cli, tmp_path):
    job_id = cli.submit(str(write_script(tmp_path, "exit5", "exit 5\n")))
    cli.wait([job_id], timeout_s=60)

    def no_jobcomp(argv):
        if tuple(argv[:2]) == ("sacct", "-c"):  # as on a login node that cannot read the file
            return CommandResult(tuple(argv), 0, "", "")
        return run_command(argv)

    status = SlurmCLI(runner=no_jobcomp).status([job_id])[job_id]
    assert status.state is JobState.FAILED
    assert status.exit_code == 5 and status.reason == "NonZeroExitCode"


def test_failing_script_is_failed_with_its_exit_code(cli, tmp_path):
    job_id = cli.submit(str(write_script(tmp_path, "fails", "echo about to fail >&2\nexit 3\n")))
    status = cli.wait([job_id], timeout_s=60)[job_id]
    assert status.state is JobState.FAILED
    assert status.exit_code == 3 and not status.succeeded


def test_cancel_a_sleeping_job(cli, tmp_path):
    job_id = cli.submit(str(write_script(tmp_path, "sleeper", "sleep 300\n")))
    wait_for_state(cli, job_id, JobState.RUNNING)
    cli.cancel(job_id)
    status = cli.wait([job_id], timeout_s=30)[job_id]
    assert status.state is JobState.CANCELLED
    cli.cancel(job_id)  # cancelling a finished job is not an error


def test_bad_partition_is_refused_with_sbatch_message_and_hint(cli, tmp_path):
    script = write_script(tmp_path, "nopart", "true\n", "--partition=nope")
    with pytest.raises(SubmitError) as info:
        cli.submit(str(script))
    text = str(info.value)
    assert "sbatch: error: Batch job submission failed: Invalid partition name specified" in text
    assert "Hint:" in text and "sinfo -s" in text


def test_gpus_on_a_cluster_without_gres_is_refused_with_hint(cli, tmp_path, slurm):
    script = write_script(tmp_path, "gpus", "true\n", "--gpus-per-node=8")
    with pytest.raises(SubmitError) as info:
        cli.submit(str(script))
    assert "Invalid generic resource (gres) specification" in str(info.value)
    assert "GRES" in info.value.hint


def test_time_limit_above_partition_maximum_is_refused(cli, tmp_path, slurm):
    script = write_script(tmp_path, "long", "true\n", f"--partition={slurm.short_partition}", "--time=01:00:00")
    with pytest.raises(SubmitError, match="Requested time limit is invalid") as info:
        cli.submit(str(script))
    assert "partition" in info.value.hint


def test_wait_backs_off_and_times_out(tmp_path, slurm):
    sleeps: list[float] = []

    def recording_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    cli = SlurmCLI(max_poll_interval_s=2.0, sleep=recording_sleep)
    job_id = cli.submit(str(write_script(tmp_path, "slow", "sleep 300\n")))
    try:
        with pytest.raises(TimeoutError, match=job_id):
            cli.wait([job_id], timeout_s=4)
        assert sleeps[:2] == [1.0, 2.0] and max(sleeps) <= 2.0 and sum(sleeps) == pytest.approx(4.0, abs=0.5)
    finally:
        cli.cancel(job_id)
    sleeps.clear()
    assert cli.wait([job_id], timeout_s=30)[job_id].state is JobState.CANCELLED
    assert all(s <= 2.0 for s in sleeps)


def test_requeue_restarts_the_job(cli, tmp_path):
    script = write_script(tmp_path, "again", "echo run $SLURM_RESTART_COUNT\nsleep 300\n", "--requeue")
    job_id = cli.submit(str(script))
    wait_for_state(cli, job_id, JobState.RUNNING)
    cli.requeue(job_id, start_now=True)
    try:
        deadline = time.monotonic() + 30
        while (cli.job_info(job_id) or {}).get("Restarts") != "1" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert (cli.job_info(job_id) or {}).get("Restarts") == "1"
        wait_for_state(cli, job_id, JobState.RUNNING)
    finally:
        cli.cancel(job_id)
    assert cli.wait([job_id], timeout_s=30)[job_id].state is JobState.CANCELLED


def test_batched_status_over_several_jobs(cli, tmp_path):
    ids = [cli.submit(str(write_script(tmp_path, f"b{i}", f"exit {i}\n"))) for i in range(3)]
    final = cli.wait(ids, timeout_s=60)
    assert [final[j].exit_code for j in ids] == [0, 1, 2]
    assert [final[j].state for j in ids] == [JobState.COMPLETED, JobState.FAILED, JobState.FAILED]


def test_auto_backend_here_is_the_cli(slurm):
    assert isinstance(select_backend("auto"), SlurmCLI)


def test_hostile_paths_reach_sbatch_unmangled(cli, tmp_path):
    odd = tmp_path / "a'; echo pwned #"
    odd.mkdir()
    script = odd / "odd $(touch x).sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --chdir={tmp_path}\n#SBATCH --output={tmp_path}/odd_%j.out\necho fine\n")
    job_id = cli.submit(str(script), job_name="odd name; rm -rf x")
    assert cli.wait([job_id], timeout_s=60)[job_id].state is JobState.COMPLETED
    info = cli.job_info(job_id) or {}
    assert info.get("JobName") == "odd name; rm -rf x"
    assert info.get("Command") == str(script)
    assert not (tmp_path / "x").exists()
