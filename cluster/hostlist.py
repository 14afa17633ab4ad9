"""Expand Slurm hostlists (``ip-10-1-[2-4,7],login1``) without ``scontrol``.

Used inside the srun step, where a container may not ship Slurm's binaries, to derive the
rendezvous head from the step's *current* node list (it changes when HyperPod replaces a node).
"""

from __future__ import annotations

import re
import sys

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(hostlist: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in hostlist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced brackets in hostlist {hostlist!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end():]
    out: list[str] = []
    for rng in m.group(1).split(","):
        r = _RANGE.match(rng.strip())
        if not r:
            raise ValueError(f"bad range {rng!r} in hostlist item {item!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            out.extend(_expand_one(f"{prefix}{n:0{width}d}{suffix}"))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """All host names, in Slurm's order."""
    hosts: list[str] = []
    for item in _split_top(hostlist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("--first", "--all"):
        print("usage: python -m cluster.hostlist --first|--all HOSTLIST", file=sys.stderr)
        return 2
    try:
        hosts = expand_hostlist(args[1])
    except ValueError as exc:
        print(f"hostlist: {exc}", file=sys.stderr)
        return 2
    if not hosts:
        print("hostlist: empty host list", file=sys.stderr)
        return 2
    print(hosts[0] if args[0] == "--first" else "\n".join(hosts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
