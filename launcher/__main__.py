"""Entry point: ``python -m launcher`` (Hydra run/sweep) or a job-management subcommand.

    python -m launcher config=llama3_70b_p5 cluster.nodes=32 [dry_run=true]   # run / submit
    python -m launcher -m config=tiny_local parallelism.tp=1,2                  # Hydra sweep
    python -m launcher list | status | logs | cancel | wait ...               # manage runs
"""

from __future__ import annotations

import sys

from launcher.jobs import SUBCOMMANDS, run_subcommand


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(run_subcommand(sys.argv[1:]))
    from launcher.app import hydra_entry

    hydra_entry()


if __name__ == "__main__":
    main()
