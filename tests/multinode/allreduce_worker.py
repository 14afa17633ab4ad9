"""One gloo rank started by torchrun inside a multi-node test job: prints one JSON line with where
it runs, the all_reduce result, and the remote ends of its TCP connections (from /proc), which
show whether the traffic crossed the node addresses."""

from __future__ import annotations

import datetime
import json
import os
import socket

import torch
import torch.distributed as dist


def _addr(hexaddr: str) -> str:
    ip_hex, _ = hexaddr.split(":")
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 16:  # tcp6: four little-endian words; only IPv4-mapped addresses are of interest
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntoa(raw[12:]) if raw[:12] == b"\0" * 10 + b"\xff\xff" else socket.inet_ntop(
            socket.AF_INET6, raw)
    return socket.inet_ntoa(raw[::-1])


def tcp_remote_addresses() -> list[str]:
    """Remote addresses of this process's established TCP connections."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    remote = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[3] == "01" and fields[9] in inodes:  # 01 = ESTABLISHED
                    remote.add(_addr(fields[2]))
    return sorted(remote)


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    host = socket.gethostname()
    print(json.dumps({"rank": rank, "world": world, "host": host, "addr": socket.gethostbyname(host),
                      "master_addr": os.environ.get("MASTER_ADDR"), "sum": value.item(),
                      "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "remote": tcp_remote_addresses()}),
          flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
