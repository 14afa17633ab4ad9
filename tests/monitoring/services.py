"""Real Prometheus and Pushgateway (Debian packages) on loopback, started and stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(size: int) -> int:
    """A base port with ``size`` consecutive free ports above it (best effort)."""
    for _ in range(50):
        base = free_port()
        if base + size > 65000:
            continue
        socks = []
        try:
            for p in range(base, base + size):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


class Service:
    def __init__(self, argv: list[str], ready_url: str, workdir: Path, name: str):
        self.log = workdir / f"{name}.log"
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, cwd=workdir,
                                     start_new_session=True)
        try:
            _wait_http(ready_url, self.proc, 20, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._fh.close()


class Pushgateway(Service):
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([shutil.which("prometheus-pushgateway") or "prometheus-pushgateway",
                          f"--web.listen-address=127.0.0.1:{self.port}"], f"{self.url}/-/ready", workdir,
                         "pushgateway")


    def groups(self) -> list[dict]:
        """Every pushed group: [{"labels": {...}, <metric name>: ...}, ...]."""
        with urllib.request.urlopen(f"{self.url}/api/v1/metrics", timeout=10) as resp:
            return json.loads(resp.read())["data"]


class Prometheus(Service):
    def __init__(self, config_text: str, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(config_text)
        (workdir / "tsdb").mkdir(exist_ok=True)
        super().__init__([shutil.which("prometheus") or "prometheus", f"--config.file={config}",
                          f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                         f"{self.url}/-/ready", workdir, "prometheus")

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Prometheus refused {path} {params}: {exc.read().decode()[:500]}") from None
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: Optional[float] = None) -> list[dict]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self._get("/api/v1/query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match, "start": start, "end": end})

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["activeTargets"]

    def rules(self) -> list[dict]:
        return self._get("/api/v1/rules")["groups"]


def wait_for(predicate, timeout_s: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
