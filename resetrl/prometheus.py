"""A Prometheus for one local run (`monitor.prometheus=true`): it scrapes the run's Ray metrics and stops with it.

It reads the same service-discovery file as deploy/monitoring/prometheus.yml (Ray rewrites it every few seconds
with the metrics address of every node), but the one in this run's own Ray session directory: the shared
/tmp/ray/prom_metrics_service_discovery.json points at whichever local cluster started last. The binary is the
first `prometheus` on PATH (Debian's `prometheus` package; `make test` installs it as root). Its data and log
stay in the run directory: RUN_DIR/monitoring/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from resetrl.net import free_port, port_is_free

SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # Ray writes it into its session directory
SCRAPE_INTERVAL = "5s"
# How often Ray's metrics agent exports what the processes recorded (Ray's metrics_report_interval_ms default).
RAY_EXPORT_INTERVAL_S = 10.0


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


def prometheus_config(service_discovery_file: str | Path) -> dict:
    """deploy/monitoring/prometheus.yml, pointed at one service-discovery file (tests/test_monitoring.py keeps
    the two alike)."""
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{
            "job_name": "ray",
            "file_sd_configs": [{"files": [str(service_discovery_file)], "refresh_interval": SCRAPE_INTERVAL}],
        }],
    }


def pick_port(preferred: int, host: str = "127.0.0.1") -> int:
    """`preferred` when it is free, else any free port (a second run on the machine still gets its Prometheus)."""
    return preferred if port_is_free(host, preferred) else free_port(host)


class LocalPrometheus:
    def __init__(self, run_path: Path, port: int, host: str = "127.0.0.1"):
        self.dir = run_path / "monitoring"
        self.host, self.port = host, port
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ray_session_dir: str | Path, timeout_s: float = 60.0) -> "LocalPrometheus":
        binary = find_prometheus()
        if binary is None:
            raise FileNotFoundError(
                "monitor.prometheus=true needs the `prometheus` binary on PATH (Debian/Ubuntu: apt-get install "
                "prometheus; or a release from prometheus.io); or set monitor.prometheus=false")
        self.dir.mkdir(parents=True, exist_ok=True)
        config_file = self.dir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(prometheus_config(Path(ray_session_dir) / SERVICE_DISCOVERY_FILE)))
        log = open(self.dir / "prometheus.log", "ab")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={self.host}:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with status {self.process.returncode}; see "
                                   f"{self.dir / 'prometheus.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not become ready on {self.url} within {timeout_s:.0f} s; see "
                                   f"{self.dir / 'prometheus.log'}")
            time.sleep(0.2)
        return self

    def wait_for_scrape(self, metric: str, after: float, timeout_s: float) -> bool:
        """Wait until Prometheus holds a sample of `metric` taken at or after the time `after` (seconds since the
        epoch); False at the timeout or if Prometheus is not running."""
        query = urllib.parse.urlencode({"query": f"max(timestamp({metric}))"})
        deadline = time.monotonic() + timeout_s
        while self.process is not None and self.process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/api/v1/query?{query}", timeout=5) as response:
                    result = json.loads(response.read())["data"]["result"]
                if result and float(result[0]["value"][1]) >= after:
                    return True
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(1.0)
        return False

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
