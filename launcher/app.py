"""``python -m launcher config=<preset> [overrides]``: compose, validate, render, submit or run.

Exit codes (also in the README): 0 success / dry run / submitted, 1 the job failed,
2 configuration error (nothing written or submitted), 3 Slurm refused the job,
4 Slurm unreachable or another backend error.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cluster.local import LocalExecutor, local_command, render_launch_script
from cluster.sbatch import STEP_SCRIPT, JobPlan, job_name_slug, render_sbatch, render_step
from launcher import console
from configs.loading import dump_config, explicit_model_fields, to_root
from launcher.manifest import PROJECT_ROOT, build_manifest
from launcher.rundir import (CONFIG_FILE, MANIFEST_FILE, create_run_dir, new_run_dir_path,
                             read_job_record, remove_run_dir, write_job_record)
from configs.schema import RootConfig, register_configs
from configs.errors import ConfigError, Problem

EXIT_OK, EXIT_JOB_FAILED, EXIT_CONFIG, EXIT_REJECTED, EXIT_BACKEND = 0, 1, 2, 3, 4

register_configs()
TASK_STARTED = False  # set once Hydra composed the config and called us


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def render_files(root: RootConfig, run_dir: Path, workdir: str, argv: list[str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Every file of a new run directory, by name (pure apart from the manifest's probes)."""
    from monitoring.launch import run_files as monitoring_files

    files = {CONFIG_FILE: dump_config(root), MANIFEST_FILE: build_manifest(argv, _overrides()),
             **monitoring_files(root, run_dir)}
    if root.cluster.kind == "local":
        files["launch.sh"] = render_launch_script(local_command(root.cluster, str(run_dir / CONFIG_FILE),
                                                                root.resilience.max_restarts), workdir)
        return files, ("launch.sh",)
    plan = JobPlan(run_name=root.run_name, run_dir=str(run_dir), workdir=workdir, cluster=root.cluster,
                   max_restarts=root.resilience.max_restarts, watchdog=root.resilience.watchdog)
    files["job.sbatch"] = render_sbatch(plan)
    files[STEP_SCRIPT] = render_step(plan)
    return files, ("job.sbatch", STEP_SCRIPT)


def with_dependency(root: RootConfig, depends_on: str) -> tuple[RootConfig, list[str]]:
    """Resolve ``depends_on`` (a run dir, run name or Slurm job id) to ``--dependency=afterok:<id>``.

    On a dry run an unresolvable dependency is a warning (rendered without it), not an error."""
    from launcher.jobs import UsageError, resolve_run

    if root.cluster.kind == "local":
        raise ConfigError([Problem("depends_on", depends_on, "dependencies need a Slurm cluster; a local run "
                                   "starts at once (run the stages one after the other instead)")])
    job_id = depends_on if depends_on.isdigit() else None
    problem = None
    if job_id is None:
        try:
            job_id = str(read_job_record(resolve_run(depends_on, root.runs_root)).get("job_id") or "")
            if not job_id:
                problem = Problem("depends_on", depends_on, "that run was never submitted to Slurm")
        except UsageError as exc:
            problem = Problem("depends_on", depends_on, str(exc))
    if problem is not None:
        if root.dry_run:
            return root, [f"warning (dry run; a real launch refuses it): {problem}; rendered without --dependency"]
        raise ConfigError([problem])
    dependency = f"afterok:{job_id}" if not root.cluster.dependency else f"{root.cluster.dependency},afterok:{job_id}"
    return replace(root, cluster=replace(root.cluster, dependency=dependency)), []


def launch(root: RootConfig, argv: list[str]) -> int:
    """Create the run directory, then run locally or submit. Returns the exit code."""
    dependency_notes: list[str] = []
    if root.depends_on:
        root, dependency_notes = with_dependency(root, root.depends_on)
    from configs.validate import validate
    from launcher.inputs import check_inputs
    from launcher.kernels import resolve as resolve_kernels
    from launcher.sizing import apply_predictor

    root, kernels, kernel_files, kernel_notes = resolve_kernels(root)  # cluster.transformer_engine
    validate(root)  # the rules that depend on the kernels (context parallelism needs TE, ...)
    root, predicted, notes = apply_predictor(root)  # parallelism=auto, fit check of manual layouts
    inputs, input_notes = check_inputs(root)  # data sources, init_from weights, tokenizer
    for note in dependency_notes + kernel_notes + notes + input_notes:
        console.info(note)
    workdir = root.cluster.workdir or str(PROJECT_ROOT)
    run_dir = new_run_dir_path(root.runs_root, root.run_name)
    files, executable = render_files(root, run_dir, workdir, argv)
    files.update(predicted)
    files.update(kernel_files)
    files.update(inputs)
    try:
        create_run_dir(run_dir, files, executable)
    except OSError as exc:  # nothing half-written: the directory is renamed into place only when complete
        raise ConfigError([Problem("runs_root", root.runs_root, f"cannot hold run directories ({exc.strerror or exc}: "
                                   f"{exc.filename or run_dir}); set runs_root=<a writable directory> (on a cluster: "
                                   "one every node sees, e.g. /fsx/runs)")]) from None
    if root.dry_run:
        console.info(f"dry run: rendered {len(files)} files, submitted nothing")
        for name in sorted(files):
            console.info(f"  {run_dir / name}")
        write_job_record(run_dir, {"backend": "dry-run", "state": "NOT_SUBMITTED", "run_name": root.run_name})
        return EXIT_OK
    if root.cluster.kind == "local":
        return _run_local(root, run_dir, workdir)
    return _submit_slurm(root, run_dir)


def _run_local(root: RootConfig, run_dir: Path, workdir: str) -> int:
    record = {"backend": "local", "run_name": root.run_name, "state": "RUNNING", "started": time.time()}
    console.info(f"run directory: {run_dir}")

    def started(pid: int) -> None:
        record["pid"] = pid
        write_job_record(run_dir, record)

    command = local_command(root.cluster, str(run_dir / CONFIG_FILE), root.resilience.max_restarts)
    rc = LocalExecutor(run_dir, workdir).run(command, on_start=started, watchdog=root.resilience.watchdog)
    cancelled = read_job_record(run_dir).get("state") == "CANCELLED" or rc == 130  # `cancel` or Ctrl-C
    record.update(state="CANCELLED" if cancelled else ("COMPLETED" if rc == 0 else "FAILED"),
                  exit_code=rc, ended=time.time())
    write_job_record(run_dir, record)
    if cancelled:
        console.error(f"local run cancelled; log: {run_dir / 'logs' / 'local.out'}")
        return EXIT_JOB_FAILED
    if rc != 0:
        console.error(f"local run failed with exit status {rc}; log: {run_dir / 'logs' / 'local.out'}")
        return EXIT_JOB_FAILED
    console.info(f"local run completed; log: {run_dir / 'logs' / 'local.out'}")
    return EXIT_OK


def _submit_slurm(root: RootConfig, run_dir: Path) -> int:
    from cluster.backend import BackendError, SubmitError
    from cluster.pyslurm_backend import select_backend

    try:
        backend = select_backend(root.cluster.slurm_backend)
        job_id = backend.submit(str(run_dir / "job.sbatch"), job_name=job_name_slug(root.run_name))
    except SubmitError as exc:
        remove_run_dir(run_dir)
        console.error(f"Slurm refused the job (nothing was submitted, run directory removed):\n{exc}")
        field_hint = config_hint(str(exc), root)
        if field_hint:
            console.error(f"In the config: {field_hint}")
        return EXIT_REJECTED
    except BackendError as exc:
        remove_run_dir(run_dir)
        console.error(f"could not reach Slurm: {exc}")
        return EXIT_BACKEND
    write_job_record(run_dir, {"backend": "slurm", "slurm_backend": root.cluster.slurm_backend, "job_id": job_id,
                               "run_name": root.run_name, "state": "PENDING", "submitted": time.time()})
    console.info(f"submitted job {job_id}; run directory: {run_dir}")
    console.info(f"  status: python -m launcher status {run_dir}")
    console.info(f"  logs:   python -m launcher logs {run_dir} --follow")
    console.info(f"  cancel: python -m launcher cancel {run_dir}")
    return EXIT_OK


_CONFIG_HINTS = (
    ("generic resource", "set cluster.gpus_per_node_flag=false (nodes are allocated whole with --exclusive)"),
    ("partition", "set cluster.partition to one listed by `sinfo -s` (now {partition!r}), or null for the default"),
    ("account", "set cluster.account (now {account!r})"),
    ("qos", "set cluster.qos (now {qos!r})"),
    ("time limit", "lower cluster.time_limit (now {time_limit!r})"),
    ("--time", "fix cluster.time_limit (now {time_limit!r})"),
    ("node count", "lower cluster.nodes (now {nodes})"),
    ("processors requested", "lower cluster.nodes (now {nodes}) or cluster.gpus_per_node"),
    ("--container-", "set cluster.container_image=null, or use a cluster with pyxis"),
    ("node configuration is not available", "check cluster.nodes, cluster.gpus_per_node and cluster.extra_sbatch"),
)


def config_hint(error_text: str, root: RootConfig) -> str | None:
    """Which config field to change for a Slurm rejection (sbatch speaks in flags, users in fields)."""
    low = error_text.lower()
    for needle, hint in _CONFIG_HINTS:
        if needle.lower() in low:
            c = root.cluster
            return hint.format(partition=c.partition, account=c.account, qos=c.qos, time_limit=c.time_limit, nodes=c.nodes)
    return None


@hydra.main(config_path="../configs", config_name="launcher", version_base=None)
def hydra_entry(cfg: DictConfig) -> None:
    global TASK_STARTED
    TASK_STARTED = True
    try:
        root = to_root(cfg, explicit=explicit_model_fields(_overrides()))
    except ConfigError as exc:
        console.error(str(exc))
        console.error("nothing was written or submitted")
        sys.exit(EXIT_CONFIG)
    try:
        rc = launch(root, sys.argv[1:])
    except ConfigError as exc:
        console.error(str(exc))
        console.error("nothing was written or submitted")
        sys.exit(EXIT_CONFIG)
    if rc != EXIT_OK:
        sys.exit(rc)
