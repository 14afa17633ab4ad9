"""Record real Slurm output for the tier-1 tests.

    python -m tests.cluster.capture_fixtures          # writes tests/cluster/fixtures/slurm_<version>.json

Starts the single-node test cluster, makes sbatch refuse jobs in the common ways and
records stderr, and records squeue / sacct / sacct -c / scontrol output for jobs that
completed, failed, were cancelled and are pending. Messages that need slurmdbd
(invalid account / QOS) cannot be produced here; the tests spell those out by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.slurm_cluster import SHORT_PARTITION, SlurmHandle, start_slurm

FIXTURE_DIR = Path(__file__).parent / "fixtures"

SBATCH_REFUSALS: dict[str, list[str]] = {
    "gpus_per_node_without_gres": ["--gpus-per-node=8"],
    "typed_gres_without_gres": ["--gres=gpu:h100:8"],
    "invalid_partition": ["--partition=nope"],
    "too_many_nodes_exclusive": ["--exclusive", "--nodes=2"],
    "too_many_cpus": ["--nodes=5"],
    "time_limit_exceeds_partition": [f"--partition={SHORT_PARTITION}", "--time=01:00:00"],
    "malformed_time": ["--time=bogus"],
    "memory_unavailable": ["--mem=999999999"],
    "invalid_constraint": ["--constraint=nope"],
    "invalid_nodelist": ["--nodelist=nonode"],
    "container_without_pyxis": ["--container-image=/fsx/img.sqsh"],
}

SCRIPTS = {
    "plain": "#!/bin/bash\ntrue\n",
    "ok": "#!/bin/bash\n#SBATCH --ntasks=2\nsrun hostname\n",
    "fail": "#!/bin/bash\necho failing >&2\nexit 3\n",
    "sleep": "#!/bin/bash\nsleep 300\n",
}


def _run(handle: SlurmHandle, *argv: str) -> dict[str, object]:
    result = handle.run(*argv)
    return {"argv": list(argv), "returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}


def _sbatch(handle: SlurmHandle, script: Path, *args: str) -> str:
    result = handle.run("sbatch", "--parsable", f"--chdir={script.parent}", *args, str(script))
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return result.stdout.strip()


def _wait_until(done, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the test cluster did not reach the expected state")
        time.sleep(0.3)


def capture(handle: SlurmHandle, scratch: Path) -> dict[str, object]:
    scripts = {}
    for name, body in SCRIPTS.items():
        scripts[name] = scratch / f"{name}.sh"
        scripts[name].write_text(body)
    out: dict[str, object] = {"version": handle.run("sbatch", "--version").stdout.strip(), "sbatch": {}}
    for case, args in SBATCH_REFUSALS.items():
        out["sbatch"][case] = _run(handle, "sbatch", "--parsable", f"--chdir={scratch}",  # type: ignore[index]
                                   *args, str(scripts["plain"]))

    ok = _sbatch(handle, scripts["ok"], "--output=%x_%j.out")
    fail = _sbatch(handle, scripts["fail"])
    _wait_until(lambda: not handle.run("squeue", "--noheader", f"--jobs={ok},{fail}").stdout.strip())
    running = _sbatch(handle, scripts["sleep"])
    _wait_until(lambda: "RUNNING" in handle.run("squeue", "--noheader", f"--jobs={running}", "--format=%T").stdout)
    # all CPUs of the node while one is taken: stays pending
    pending = _sbatch(handle, scripts["sleep"], f"--cpus-per-task={handle.cpus}")
    time.sleep(2.5)  # let the running job accumulate elapsed time
    ids = [ok, fail, running, pending]
    out["ids"] = {"completed": ok, "failed": fail, "running": running, "pending": pending}
    fmt = "--format=JobID,State,ExitCode,Elapsed,NodeList,Reason"
    out["squeue"] = _run(handle, "squeue", "--noheader", f"--jobs={','.join(ids)}", "--format=%i|%T|%M|%N|%r")
    out["squeue_unknown_single"] = _run(handle, "squeue", "--noheader", "--jobs=99999", "--format=%i|%T|%M|%N|%r")
    out["sacct_disabled"] = _run(handle, "sacct", "-X", "-n", "-P", fmt, f"--jobs={','.join(ids)}")
    out["scontrol_running"] = _run(handle, "scontrol", "show", "job", "-o", running)
    out["scontrol_pending"] = _run(handle, "scontrol", "show", "job", "-o", pending)
    handle.run("scancel", running)
    _wait_until(lambda: "CANCELLED" in handle.run("sacct", "-c", "-n", "-P", "--format=State", f"--jobs={running}").stdout)
    out["sacct_jobcomp"] = _run(handle, "sacct", "-c", "-X", "-n", "-P", fmt, f"--jobs={','.join(ids)}")
    out["scontrol_completed"] = _run(handle, "scontrol", "show", "job", "-o", ok)
    out["scontrol_failed"] = _run(handle, "scontrol", "show", "job", "-o", fail)
    out["scontrol_cancelled"] = _run(handle, "scontrol", "show", "job", "-o", running)
    out["scontrol_unknown"] = _run(handle, "scontrol", "show", "job", "-o", "99999")
    out["scancel_finished"] = _run(handle, "scancel", ok)
    handle.run("scancel", pending)
    return out


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="slurm-capture-") as tmp:
        with start_slurm(Path(tmp) / "cluster") as handle:
            scratch = Path(tmp) / "jobs"
            scratch.mkdir()
            data = capture(handle, scratch)
    version = str(data["version"]).split()[-1]
    major_minor = ".".join(version.split(".")[:2])
    FIXTURE_DIR.mkdir(exist_ok=True)
    path = FIXTURE_DIR / f"slurm_{major_minor}.json"
    # Paths under the throw-away temp dir are replaced so the file is stable across runs.
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    text = text.replace(tmp, "/tmp/slurm-capture")
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
