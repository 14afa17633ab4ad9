"""Tier 1: pure parsing of real Slurm 22.05 output and the user-facing errors."""

from __future__ import annotations

import json

import pytest

from cluster.backend import (
    TERMINAL_STATES,
    JobState,
    JobStatus,
    SubmitError,
    pending_hint,
    normalize_state,
    submission_hint,
)
from cluster.slurm_cli import (
    format_seconds,
    normalize_elapsed,
    parse_exit_code,
    parse_sacct,
    parse_sbatch_parsable,
    parse_scontrol_record,
    parse_slurm_version,
    parse_squeue,
    status_from_scontrol,
)
from tests.cluster.fakes import recorded


@pytest.mark.parametrize("raw, expected", [
    ("PENDING", JobState.PENDING), ("RUNNING", JobState.RUNNING), ("COMPLETED", JobState.COMPLETED),
    ("CANCELLED by 0", JobState.CANCELLED), ("CANCELLED by 1000", JobState.CANCELLED),
    ("CANCELLED+", JobState.CANCELLED), ("FAILED", JobState.FAILED), ("TIMEOUT", JobState.TIMEOUT),
    ("NODE_FAIL", JobState.NODE_FAIL), ("OUT_OF_MEMORY", JobState.OUT_OF_MEMORY),
    ("OUT_OF_ME+", JobState.UNKNOWN),  # truncated without -P: we always pass -P
    ("PREEMPTED", JobState.PREEMPTED), ("REQUEUED", JobState.REQUEUED), ("BOOT_FAIL", JobState.BOOT_FAIL),
    ("DEADLINE", JobState.DEADLINE), ("SUSPENDED", JobState.SUSPENDED), ("COMPLETING", JobState.COMPLETING),
    ("PD", JobState.PENDING), ("R", JobState.RUNNING), ("CG", JobState.COMPLETING), ("CD", JobState.COMPLETED),
    ("CA", JobState.CANCELLED), ("OOM", JobState.OUT_OF_MEMORY), ("NF", JobState.NODE_FAIL),
    ("CONFIGURING", JobState.PENDING), ("REQUEUE_HOLD", JobState.REQUEUED), ("SPECIAL_EXIT", JobState.FAILED),
    ("STOPPED", JobState.SUSPENDED), ("RESIZING", JobState.RUNNING), ("running", JobState.RUNNING),
    ("", JobState.UNKNOWN), (None, JobState.UNKNOWN), ("SOMETHING_NEW", JobState.UNKNOWN),
])
def test_normalize_state(raw, expected):
    assert normalize_state(raw) is expected


def test_terminal_states():
    assert {s.value for s in TERMINAL_STATES} == {
        "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE"}
    assert JobStatus("1", JobState.FAILED, 3).terminal
    for state in (JobState.PENDING, JobState.RUNNING, JobState.COMPLETING, JobState.REQUEUED,
                  JobState.SUSPENDED, JobState.UNKNOWN):
        assert not JobStatus("1", state).terminal


def test_job_state_is_a_plain_string_for_json_and_comparisons():
    status = JobStatus("7", JobState.COMPLETED, 0)
    assert status.state == "COMPLETED"
    assert status.state in {"COMPLETED", "FAILED"}
    assert json.dumps({"state": status.state}) == '{"state": "COMPLETED"}'
    assert status.succeeded and not JobStatus("7", JobState.COMPLETED, 1).succeeded


@pytest.mark.parametrize("text, expected", [
    ("0:0", (0, 0)), ("1:0", (1, 0)), ("3:0", (3, 0)), ("0:15", (0, 15)), ("0:9", (0, 9)),
    ("137", (137, 0)), ("", (None, None)), (None, (None, None)), ("n/a", (None, None)),
])
def test_parse_exit_code(text, expected):
    assert parse_exit_code(text) == expected


@pytest.mark.parametrize("stdout, job_id", [
    ("42\n", "42"), ("42;ci\n", "42"), ("  1234567;hyperpod-cluster \n", "1234567"), ("17_3\n", "17_3"),
])
def test_parse_sbatch_parsable(stdout, job_id):
    assert parse_sbatch_parsable(stdout) == job_id


@pytest.mark.parametrize("stdout", ["", "\n", "Submitted batch job 42\n"])
def test_parse_sbatch_parsable_rejects_non_ids(stdout):
    with pytest.raises(ValueError):
        parse_sbatch_parsable(stdout)


@pytest.mark.parametrize("text, expected", [
    ("0:00", "00:00:00"), ("0:02", "00:00:02"), ("1:02:03", "01:02:03"), ("2-01:02:03", "2-01:02:03"),
    ("00:01:13", "00:01:13"), ("", None), ("INVALID", "INVALID"),
])
def test_normalize_elapsed(text, expected):
    assert normalize_elapsed(text) == expected


def test_format_seconds():
    assert format_seconds(0) == "00:00:00"
    assert format_seconds(3725) == "01:02:05"
    assert format_seconds(90061) == "1-01:01:01"
    assert format_seconds(None) is None


def test_parse_slurm_version():
    assert parse_slurm_version(recorded()["version"]) == (22, 5, 8)
    assert parse_slurm_version("slurm 23.11.10") == (23, 11, 10)
    assert parse_slurm_version("25.5.0") == (25, 5, 0)  # pyslurm spells the minor without 0
    with pytest.raises(ValueError):
        parse_slurm_version("no version here")


def test_parse_squeue_real_output():
    rec = recorded()
    ids = rec["ids"]
    statuses = parse_squeue(rec["squeue"]["stdout"])
    assert set(statuses) == {ids["running"], ids["pending"]}
    running = statuses[ids["running"]]
    assert running.state is JobState.RUNNING and running.nodes == "vm" and running.reason is None
    assert running.elapsed == "00:00:02" and running.exit_code is None
    pending = statuses[ids["pending"]]
    assert pending.state is JobState.PENDING and pending.nodes is None


def test_parse_squeue_keeps_reason_with_delimiters_and_skips_garbage():
    out = parse_squeue("12|PENDING|0:00||(ReqNodeNotAvail, UnavailableNodes:vm[1|2])\nnot a line\n")
    assert out["12"].reason == "(ReqNodeNotAvail, UnavailableNodes:vm[1|2])"
    assert list(out) == ["12"]


def test_parse_sacct_jobcomp_real_output():
    rec = recorded()
    ids = rec["ids"]
    statuses = parse_sacct(rec["sacct_jobcomp"]["stdout"])
    assert statuses[ids["completed"]] == JobStatus(ids["completed"], JobState.COMPLETED, 0, None, "vm",
                                                   statuses[ids["completed"]].elapsed, 0)
    assert statuses[ids["failed"]].state is JobState.FAILED and statuses[ids["failed"]].exit_code == 3
    assert statuses[ids["running"]].state is JobState.CANCELLED
    assert ids["pending"] not in statuses  # never ran: no jobcomp record while pending


def test_parse_sacct_slurmdbd_style_output():
    # As printed by sacct -X -n -P with slurmdbd (Slurm 22.05): CANCELLED carries the uid,
    # an OOM-killed job has signal 9 / exit 0:125 variants, Reason is filled in.
    stdout = ("101|COMPLETED|0:0|00:10:02|p5-st-1-[1-4]|None\n"
              "102|CANCELLED by 1000|0:15|00:00:31|p5-st-1-1|None\n"
              "103|OUT_OF_MEMORY|0:125|00:01:00|p5-st-1-2|OutOfMemory\n"
              "104|TIMEOUT|0:0|01:00:00|p5-st-1-3|TimeLimit\n"
              "105|PENDING|0:0|00:00:00|None assigned|Resources\n"
              "106|NODE_FAIL|1:0|00:03:00|p5-st-1-4|NodeDown\n")
    out = parse_sacct(stdout)
    assert out["101"].nodes == "p5-st-1-[1-4]" and out["101"].elapsed == "00:10:02"
    assert out["102"].state is JobState.CANCELLED and out["102"].signal == 15
    assert out["103"].state is JobState.OUT_OF_MEMORY and out["103"].reason == "OutOfMemory"
    assert out["104"].state is JobState.TIMEOUT and out["104"].reason == "TimeLimit"
    assert out["105"].state is JobState.PENDING and out["105"].reason == "Resources"
    assert out["106"].exit_code == 1


def test_parse_sacct_last_record_of_a_requeued_job_wins_and_steps_are_ignored():
    # jobcomp keeps one record per run; a requeue leaves a PENDING record first.
    stdout = "14|PENDING|0:0|00:00:01|vm|\n14|COMPLETED|0:0|00:00:05|vm|\n14.batch|COMPLETED|0:0|00:00:05|vm|\n"
    out = parse_sacct(stdout)
    assert list(out) == ["14"] and out["14"].state is JobState.COMPLETED


def test_parse_scontrol_record_real_output():
    fields = parse_scontrol_record(recorded()["scontrol_completed"]["stdout"])
    assert fields["JobState"] == "COMPLETED"
    assert fields["ExitCode"] == "0:0"
    assert fields["TRES"] == "cpu=2,mem=1000M,node=1,billing=2"
    assert fields["AllocNode:Sid"] == "localhost:2820"
    assert fields["StdOut"].endswith("/ok.sh_3.out")
    assert fields["Power"] == ""


def test_parse_scontrol_record_values_with_spaces():
    fields = parse_scontrol_record("JobId=9 JobName=a b JobState=RUNNING Command=/fsx/my runs/job.sbatch "
                                   "WorkDir=/fsx/x=1/y StdOut=/fsx/my runs/logs/a_9.out")
    assert fields["JobName"] == "a b"
    assert fields["Command"] == "/fsx/my runs/job.sbatch"
    assert fields["WorkDir"] == "/fsx/x=1/y"
    assert fields["StdOut"] == "/fsx/my runs/logs/a_9.out"


@pytest.mark.parametrize("key, state, exit_code, reason, signal", [
    ("scontrol_completed", JobState.COMPLETED, 0, None, 0),
    ("scontrol_failed", JobState.FAILED, 3, "NonZeroExitCode", 0),
    ("scontrol_cancelled", JobState.CANCELLED, 0, None, 15),
    ("scontrol_running", JobState.RUNNING, None, None, None),
    ("scontrol_pending", JobState.PENDING, None, None, None),
])
def test_status_from_scontrol_real_output(key, state, exit_code, reason, signal):
    st = status_from_scontrol(parse_scontrol_record(recorded()[key]["stdout"]))
    assert (st.state, st.exit_code, st.reason, st.signal) == (state, exit_code, reason, signal)
    assert st.job_id.isdigit()


# Messages that need slurmdbd cannot be produced by the test cluster; these are Slurm's
# own strings (slurm_errno.c), as sbatch prints them.
ACCOUNTING_REFUSALS = {
    "invalid_account": "sbatch: error: Batch job submission failed: Invalid account or account/partition "
                       "combination specified\n",
    "invalid_qos": "sbatch: error: Batch job submission failed: Invalid qos specification\n",
    "qos_policy": "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit "
                  "limit, user's size and/or time limits)\n",
}

EXPECTED_HINT_WORDS = {
    "gpus_per_node_without_gres": "GRES",
    "typed_gres_without_gres": "GRES",
    "invalid_partition": "sinfo -s",
    "too_many_nodes_exclusive": "node count",
    "too_many_cpus": "CPUs",
    "time_limit_exceeds_partition": "time limit",
    "malformed_time": "time limit",
    "memory_unavailable": "--mem=0",
    "invalid_constraint": "--constraint",
    "invalid_nodelist": "--nodelist",
    "container_without_pyxis": "pyxis",
    "invalid_account": "sacctmgr show assoc",
    "invalid_qos": "QOS",
    "qos_policy": "sacctmgr show qos",
}


def _all_refusals() -> dict[str, str]:
    real = {case: entry["stderr"] for case, entry in recorded()["sbatch"].items()}
    return {**real, **ACCOUNTING_REFUSALS}


@pytest.mark.parametrize("case", sorted(EXPECTED_HINT_WORDS))
def test_every_common_refusal_gets_a_hint(case):
    stderr = _all_refusals()[case]
    hint = submission_hint(stderr)
    assert hint is not None, f"no hint for {stderr!r}"
    assert EXPECTED_HINT_WORDS[case].lower() in hint.lower()


def test_all_recorded_refusals_are_covered():
    assert set(recorded()["sbatch"]) <= set(EXPECTED_HINT_WORDS)


def test_unknown_refusal_has_no_hint():
    assert submission_hint("sbatch: error: Batch job submission failed: Something new\n") is None


def test_submit_error_text_is_user_facing():
    stderr = recorded()["sbatch"]["invalid_partition"]["stderr"]
    err = SubmitError("sbatch refused job.sbatch (exit 1):", stderr, submission_hint(stderr))
    text = str(err)
    assert text.splitlines()[0] == "sbatch refused job.sbatch (exit 1):"
    assert "sbatch: error: Batch job submission failed: Invalid partition name specified" in text
    assert "Hint: that partition does not exist" in text
    assert str(SubmitError("refused", "", None)) == "refused"


def test_pending_hint():
    assert "never start" in pending_hint("PartitionTimeLimit")
    assert pending_hint("(ReqNodeNotAvail, UnavailableNodes:vm)") is not None
    assert pending_hint("Resources") is None and pending_hint(None) is None
