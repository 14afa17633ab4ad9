"""Entry point: ``python -m launcher`` (Hydra run/sweep) or a job-management subcommand.

    python -m launcher config=llama3_70b_p5 cluster.nodes=32 [dry_run=true]   # run / submit
    python -m launcher -m config=tiny_local parallelism.tp=1,2                  # Hydra sweep
    python -m launcher list | status | logs | cancel | wait ...               # manage runs
"""

from __future__ import annotations

import sys

from launcher.cli import SUBCOMMANDS, run_subcommand


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(run_subcommand(sys.argv[1:]))
    from launcher import app

    try:
        app.hydra_entry()
    except SystemExit as exc:
        # Hydra exits 1 when composing fails (unknown key, bad type, unknown preset): that is a
        # configuration error, reported like ours with exit status 2.
        if exc.code == 1 and not app.TASK_STARTED:
            sys.exit(app.EXIT_CONFIG)
        raise


if __name__ == "__main__":
    main()
