"""Tier 1: PyslurmBackend's calls into pyslurm (a fake module: pyslurm cannot be built
against the Slurm 22.05 here) and select_backend's choice."""

from __future__ import annotations

import sys
import types

import pytest

from cluster.backend import BackendUnavailable, JobBackend, JobState, SubmitError
from cluster.pyslurm_backend import PyslurmBackend, pyslurm_version, select_backend
from cluster.slurm_cli import SlurmCLI
from tests.cluster.fakes import FakeRunner, ok


class RPCError(Exception):
    pass


def make_fake_pyslurm(version: str = "22.5.0", *, submit_error: str | None = None,
                      ctld_jobs: dict | None = None, db_jobs: list | None = None,
                      load_error: str = "Invalid job id specified") -> types.ModuleType:
    """Just the slice of pyslurm's object API (>= 23.2) the backend touches, recording calls."""
    mod = types.ModuleType("pyslurm")
    mod.calls = []
    mod.RPCError = RPCError
    mod.__version__ = version
    mod.version = lambda: version
    ctld_jobs = ctld_jobs or {}

    class JobSubmitDescription:
        def __init__(self, **kwargs):
            self.__dict__.update({"name": None, **kwargs})
            mod.calls.append(("JobSubmitDescription", kwargs))

        def load_sbatch_options(self, overwrite=False):
            mod.calls.append(("load_sbatch_options", overwrite))
            self.name = self.name or "from-header"

        def submit(self):
            mod.calls.append(("submit", self.script, self.name))
            if submit_error:
                raise RPCError(submit_error)
            return 4242

    class Job:
        def __init__(self, job_id):
            self.id = job_id

        @staticmethod
        def load(job_id):
            mod.calls.append(("Job.load", job_id))
            if job_id not in ctld_jobs:
                raise RPCError(load_error)
            return ctld_jobs[job_id]

        def cancel(self):
            mod.calls.append(("Job.cancel", self.id))

    class JobFilter:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class DbJobs:
        @staticmethod
        def load(db_filter=None):
            mod.calls.append(("db.Jobs.load", db_filter.kwargs))
            if db_jobs is None:
                raise RPCError("Unable to connect to database")
            return {job.id: job for job in db_jobs}  # a mapping, as in pyslurm >= 23.11

    mod.JobSubmitDescription = JobSubmitDescription
    mod.Job = Job
    mod.db = types.SimpleNamespace(Jobs=DbJobs, JobFilter=JobFilter)
    return mod


def ctld_job(state, exit_code=0, signal=0, reason="None", nodes="vm", run_time=65):
    return types.SimpleNamespace(state=state, exit_code=exit_code, exit_code_signal=signal, state_reason=reason,
                                 allocated_nodes=nodes, run_time=run_time)


def db_job(job_id, state, exit_code=0, nodes="vm", elapsed=3725):
    return types.SimpleNamespace(id=job_id, state=state, exit_code=exit_code, exit_code_signal=0,
                                 state_reason="None", nodelist=nodes, elapsed_time=elapsed)


def test_pyslurm_backend_is_a_job_backend():
    assert isinstance(PyslurmBackend(make_fake_pyslurm()), JobBackend)


def test_submit_loads_the_script_and_its_sbatch_header_and_overrides_the_name():
    ps = make_fake_pyslurm()
    job_id = PyslurmBackend(ps).submit("/fsx/runs/r1/job.sbatch", job_name="llama")
    assert job_id == "4242"
    assert ps.calls == [("JobSubmitDescription", {"script": "/fsx/runs/r1/job.sbatch"}),
                        ("load_sbatch_options", False),
                        ("submit", "/fsx/runs/r1/job.sbatch", "llama")]


def test_submit_refusal_becomes_submit_error_with_hint():
    ps = make_fake_pyslurm(submit_error="Invalid partition name specified")
    with pytest.raises(SubmitError) as info:
        PyslurmBackend(ps).submit("job.sbatch")
    assert "Invalid partition name specified" in str(info.value)
    assert "sinfo -s" in str(info.value)


def test_status_from_slurmctld_then_database():
    ps = make_fake_pyslurm(
        ctld_jobs={5: ctld_job("RUNNING", reason="None", run_time=65),
                   6: ctld_job("FAILED", exit_code=3, reason="NonZeroExitCode")},
        db_jobs=[db_job(1, "CANCELLED", nodes="p5-[1-2]"), db_job(2, "COMPLETED")])
    out = PyslurmBackend(ps).status(["5", "6", "1", "2", "3"])
    assert out["5"].state is JobState.RUNNING and out["5"].exit_code is None and out["5"].elapsed == "00:01:05"
    assert out["5"].reason is None
    assert out["6"].state is JobState.FAILED and out["6"].exit_code == 3 and out["6"].reason == "NonZeroExitCode"
    assert out["1"].state is JobState.CANCELLED and out["1"].nodes == "p5-[1-2]"
    assert out["2"].elapsed == "01:02:05"
    assert out["3"].state is JobState.UNKNOWN
    assert ("db.Jobs.load", {"ids": [1, 2, 3]}) in ps.calls


def test_status_without_slurmdbd_is_unknown_not_an_error():
    ps = make_fake_pyslurm(db_jobs=None)
    assert PyslurmBackend(ps).status(["9"])["9"].state is JobState.UNKNOWN


def test_status_with_an_unreachable_controller_is_a_backend_error_not_unknown():
    """A dead slurmctld is not a purged job: `wait` would otherwise poll UNKNOWN forever."""
    from cluster.backend import BackendError

    ps = make_fake_pyslurm(load_error="Unable to contact slurm controller (connect failure)", db_jobs=[])
    with pytest.raises(BackendError, match="controller is not reachable"):
        PyslurmBackend(ps).status(["5"])


def test_wait_with_an_unreachable_controller_exits_4(tmp_path, monkeypatch, capsys):
    import json

    from launcher import cli, jobs

    run = tmp_path / "run-1"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    (run / "job.json").write_text(json.dumps({"backend": "slurm", "slurm_backend": "pyslurm", "job_id": "5",
                                              "state": "RUNNING"}))
    ps = make_fake_pyslurm(load_error="Unable to contact slurm controller (connect failure)", db_jobs=[])
    monkeypatch.setattr(jobs, "_backend", lambda record: PyslurmBackend(ps))
    assert cli.run_subcommand(["wait", str(run), "--runs-root", str(tmp_path), "--timeout", "5"]) == 4
    assert "controller is not reachable" in capsys.readouterr().err


def test_cancel():
    ps = make_fake_pyslurm()
    PyslurmBackend(ps).cancel("17")
    assert ps.calls == [("Job.cancel", 17)]


def test_pyslurm_version_reads_module_version():
    assert pyslurm_version(make_fake_pyslurm("25.5.0")) == (25, 5, 0)


# ----------------------------------------------------------------------------- select_backend


def _no_pyslurm(name):
    raise ModuleNotFoundError("No module named 'pyslurm'")


def test_cli_when_asked():
    assert isinstance(select_backend("cli", import_module=_no_pyslurm), SlurmCLI)


def test_auto_without_pyslurm_is_cli_and_runs_nothing():
    runner = FakeRunner()
    assert isinstance(select_backend("auto", runner=runner, import_module=_no_pyslurm), SlurmCLI)
    assert runner.calls == []


def test_auto_with_matching_pyslurm_from_sys_modules(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyslurm", make_fake_pyslurm("25.5.1"))
    runner = FakeRunner([(["scontrol", "--version"], ok("slurm 25.05.3\n"))])
    assert isinstance(select_backend("auto", runner=runner), PyslurmBackend)
    assert runner.calls == [("scontrol", "--version")]


def test_auto_with_mismatched_pyslurm_is_cli():
    runner = FakeRunner([(["scontrol", "--version"], ok("slurm 22.05.8\n"))])
    backend = select_backend("auto", runner=runner, import_module=lambda name: make_fake_pyslurm("25.11.0"))
    assert isinstance(backend, SlurmCLI)


def test_auto_when_slurm_is_missing_is_cli():
    runner = FakeRunner([(["scontrol"], FileNotFoundError(2, "No such file", "scontrol"))])
    backend = select_backend("auto", runner=runner, import_module=lambda name: make_fake_pyslurm())
    assert isinstance(backend, SlurmCLI)


def test_explicit_pyslurm_missing_is_a_clear_error():
    with pytest.raises(BackendUnavailable) as info:
        select_backend("pyslurm", import_module=_no_pyslurm)
    text = str(info.value)
    assert "import pyslurm" in text and "cluster.slurm_backend=cli" in text


def test_explicit_pyslurm_with_wrong_slurm_is_a_clear_error():
    runner = FakeRunner([(["scontrol", "--version"], ok("slurm 22.05.8\n"))])
    with pytest.raises(BackendUnavailable, match=r"built for Slurm 25\.11 but the cluster runs Slurm 22\.05"):
        select_backend("pyslurm", runner=runner, import_module=lambda name: make_fake_pyslurm("25.11.0"))


def test_explicit_pyslurm_matching():
    runner = FakeRunner([(["scontrol", "--version"], ok("slurm 22.05.8\n"))])
    backend = select_backend("pyslurm", runner=runner, import_module=lambda name: make_fake_pyslurm("22.5.0"))
    assert isinstance(backend, PyslurmBackend)


def test_unknown_preference():
    with pytest.raises(ValueError, match="auto, cli, pyslurm"):
        select_backend("slurmrestd")
