"""Real S3 endpoints on loopback for the tests: moto's server (a subprocess, stopped by PID) and a
small HTTP proxy in front of it that answers a seeded share of requests with 503 SlowDown, or goes
away for good (the endpoint then refuses connections) at the first request a test names."""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1; in-memory, so a restart loses every object."""

    def __init__(self, log_dir: Path, port: Optional[int] = None, env: Optional[dict[str, str]] = None):
        self.port = port or free_port()
        self.log_dir = log_dir
        self.env = env or {}
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"moto-{self.port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start listening within 20 s")

    def kill(self) -> None:
        """SIGKILL by PID (what a crashed S3 endpoint looks like to clients)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>injected</RequestId></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    """Forwards to ``upstream``; answers a seeded fraction of requests with 503 SlowDown instead.

    ``cut_when(method, path)``: at the first request it accepts, ``on_cut()`` runs (e.g. kill the
    S3 server), that request gets no answer, and the proxy stops listening: from then on the
    endpoint refuses connections, and connections already open are closed unanswered."""

    def __init__(self, upstream_port: int, fraction: float = 0.0, seed: int = 0,
                 cut_when: Optional[Callable[[str, str], bool]] = None, on_cut: Optional[Callable[[], None]] = None):
        self.upstream_port = upstream_port
        self.fraction = fraction
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.injected = 0
        self.forwarded = 0
        self.cut = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.cut.is_set() or (cut_when is not None and cut_when(self.command, self.path)):
                    proxy._cut(on_cut)
                    self.close_connection = True
                    return
                with proxy.lock:
                    inject = proxy.random.random() < proxy.fraction
                    if inject:
                        proxy.injected += 1
                    else:
                        proxy.forwarded += 1
                if inject:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(_SLOWDOWN if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                head = self.command == "HEAD"  # no body: keep the object's Content-Length
                for key, value in response.getheaders():
                    if key.lower() not in _HOP and (head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _cut(self, on_cut: Optional[Callable[[], None]]) -> None:
        with self.lock:
            if self.cut.is_set():
                return
            self.cut.set()
        if on_cut is not None:
            on_cut()
        threading.Thread(target=self._stop_listening, daemon=True).start()  # not from a handler thread

    def _stop_listening(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.cut.is_set():
            self._stop_listening()
