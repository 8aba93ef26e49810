"""Watching a run (issue "A run you can watch"): the console, the Ray dashboard, Prometheus and the Grafana queries.

One tiny run serves every live check (it is the expensive part, ~3 minutes on 2 cores): `resetrl train` on the tiny
preset with a reset method (so the reset panels have data), the Ray object-store weight channel (weight-sync
seconds), held-out evaluation every step, a local Prometheus (monitor.prometheus) and Ray token auth, started in a
pseudo-terminal as a person would. While it trains, the Ray state API and a headless Chromium (Debian's `chromium`,
when installed) look at its actors; when it has ended, the terminal transcript, the plots and logs it left, and a
Prometheus reopened on the data the run's Prometheus scraped are checked. `make test` installs the prometheus and
chromium binaries as root with apt; elsewhere the checks that need one skip and say so.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from resetrl.net import free_port
from resetrl.prometheus import LocalPrometheus, find_prometheus, prometheus_config
from resetrl.plots import read_plotted_series

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "resetrl-dashboard.json"
STEPS = 5
ROLES = ("rollout-0", "rollout-1", "learner-rank0", "evaluator")
# Lines that must never reach the terminal: vLLM's log format, Ray's worker-output prefix, DeepSpeed's, and the
# engine messages the issue saw at every weight update.
ENGINE_LINES = re.compile(r"(INFO|WARNING|DEBUG) \d\d-\d\d \d\d:\d\d:\d\d|\(\w+ pid=\d+\)|\[(INFO|WARNING)\] |"
                          r"Failed to load weights|Reloading and processing weights|reset prefix cache|"
                          r"Loading safetensors checkpoint shards")


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


# ---- the files, no run needed ------------------------------------------------------------------------------------

def test_deployed_prometheus_config_is_the_one_a_local_run_writes():
    deployed = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert deployed == prometheus_config("/tmp/ray/prom_metrics_service_discovery.json")


def test_dashboard_has_a_panel_for_everything_a_run_is_watched_for():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("reward", "held-out accuracy", "throughput", "queue depths", "lag", "staleness", "resets", "loss",
                  "gradient norm", "weight sync"):
        assert topic in titles, topic
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert dashboard["uid"] == "resetrl"
    assert [var["name"] for var in dashboard["templating"]["list"]] == ["datasource"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    for _title, expr in dashboard_queries():
        assert re.findall(r"ray_resetrl_\w+", expr), expr  # resetrl's metrics, as Ray exports them
    # Grafana provisioning: the datasource name the Ray dashboard asks for, and the folder compose mounts.
    datasource = yaml.safe_load((MONITORING / "grafana-datasource.yml").read_text())["datasources"][0]
    assert datasource["name"] == "Prometheus" and datasource["url"] == "${PROMETHEUS_URL}"
    providers = yaml.safe_load((MONITORING / "grafana-dashboards.yml").read_text())["providers"]
    assert {p["options"]["path"] for p in providers} == {"/var/lib/grafana/dashboards/resetrl",
                                                          "/tmp/ray/session_latest/metrics/grafana/dashboards"}


# ---- one watched run ---------------------------------------------------------------------------------------------

def _state_api(dashboard: str, env: dict) -> dict:
    """The cluster's actors and jobs through Ray's state API, from a process with the run's token."""
    script = ("import json, sys\nfrom ray.util.state import list_actors, list_jobs\n"
              "actors = list_actors(address=sys.argv[1], detail=True, limit=1000, raise_on_missing_output=False)\n"
              "jobs = list_jobs(address=sys.argv[1], detail=True)\n"
              "print(json.dumps({'actors': [{'name': a.name, 'class_name': a.class_name, 'repr_name': a.repr_name,"
              " 'state': a.state} for a in actors], 'jobs': [{'metadata': j.metadata} for j in jobs]}))")
    result = subprocess.run([sys.executable, "-c", script, dashboard], env=env, capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        return {"actors": [], "jobs": []}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _browser_page_text(url: str, cookie: dict, wanted: list[str], timeout_s: float) -> str:
    """Load `url` in headless Chromium (a cookie set first) and return the page's text once it shows every string
    in `wanted`, or what it shows at the timeout. Driven over the DevTools protocol (websockets)."""
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="resetrl-chromium-")
    browser = subprocess.Popen(
        [shutil.which("chromium"), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ws_url = None
        for line in browser.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
            if "DevTools listening on" in line:
                ws_url = line.split("on ", 1)[1].strip()
                break
        assert ws_url, "chromium did not start its DevTools endpoint"
        port = urllib.parse.urlparse(ws_url).port
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(p for p in pages if p["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            ids = iter(range(1, 10**6))

            def call(method: str, **params):
                message_id = next(ids)
                ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
                while True:
                    reply = json.loads(ws.recv(timeout=60))
                    if reply.get("id") == message_id:
                        return reply.get("result", {})

            call("Network.enable")
            call("Network.setCookie", url=url, **cookie)
            call("Page.navigate", url=url)
            deadline, text = time.monotonic() + timeout_s, ""
            while time.monotonic() < deadline:
                text = call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                            returnByValue=True).get("result", {}).get("value", "")
                if all(name in text for name in wanted):
                    break
                time.sleep(2)
            return text
    finally:
        browser.kill()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    pexpect = pytest.importorskip("pexpect", reason="pexpect runs the console in a pseudo-terminal: pip install "
                                  "pexpect")
    tmp = tmp_path_factory.mktemp("watched")
    run_name, token = f"watch-{uuid.uuid4().hex[:6]}", secrets.token_hex(24)
    dashboard_port, prometheus_port = free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONUNBUFFERED": "1",
           "TERM": "xterm-256color"}
    args = ["-m", "resetrl.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
            "--summary", str(tmp / "summary.json"), f"run_name={run_name}", f"run_dir={tmp / 'run'}",
            f"total_steps={STEPS}", "algorithm.name=rrpo", "learner.weight_channel=ray_object_store",
            "eval.holdout=2", "eval.every=1", f"ray.dashboard_port={dashboard_port}",
            f"monitor.prometheus={'true' if find_prometheus() else 'false'}",
            f"monitor.prometheus_port={prometheus_port}",
            # top_p < 1 makes the vLLM engine log a warning of our own (actors/engines/vllm_engine.py) in the rollout
            # actors: it must reach the console, unlike the engine's own lines.
            "rollout.top_p=0.95"]
    started = time.time()
    child = pexpect.spawn(sys.executable, args, cwd=str(REPO), env=env, encoding="utf-8", codec_errors="replace",
                          dimensions=(60, 160), timeout=None)
    transcript = _Transcript()
    child.logfile_read = transcript
    reader = threading.Thread(target=lambda: child.expect(pexpect.EOF, timeout=1200), daemon=True)
    reader.start()  # keeps draining the terminal, so the run never blocks on a full pty

    names = {f"{run_name}/{role}" for role in ROLES}
    actors, jobs, deadline = [], [], time.monotonic() + 600
    while child.isalive() and time.monotonic() < deadline:
        state = _state_api(dashboard, env)
        actors, jobs = [a for a in state["actors"] if a["state"] == "ALIVE"], state["jobs"]
        if names <= {a["name"] for a in actors}:
            break
        time.sleep(3)
    browser = None
    if shutil.which("chromium") is None:
        browser_skip = "no chromium on PATH (Debian: apt-get install chromium; `make test` does it as root)"
    elif not child.isalive():
        browser_skip = None
    else:
        browser_skip = None
        browser = _browser_page_text(f"{dashboard}/#/actors", {"name": "ray-authentication-token", "value": token},
                                     sorted(names), timeout_s=120)
    reader.join(timeout=1200)
    child.close()
    ended = time.time()
    (tmp / "console.txt").write_text(transcript.text())  # for a person reading a failure
    yield {"run_dir": tmp / "run", "summary_path": tmp / "summary.json", "run_name": run_name,
           "transcript": transcript.text(), "exit_status": child.exitstatus, "actors": actors, "jobs": jobs,
           "names": names,
           "browser": browser, "browser_skip": browser_skip, "started": started, "ended": ended}


class _Transcript:
    """pexpect's logfile_read: everything the terminal received."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, data: str) -> None:
        self.parts.append(data)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.parts)


def _plain(transcript: str) -> str:
    """The terminal transcript without escape sequences (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r", "\n", transcript)


def _engine(watched_run) -> str:
    return json.loads(watched_run["summary_path"].read_text())["engine"]  # vllm where installed, else hf


def test_the_run_succeeds(watched_run):
    assert watched_run["exit_status"] == 0, _plain(watched_run["transcript"])[-4000:]
    summary = json.loads(watched_run["summary_path"].read_text())
    assert summary["steps"] == STEPS and summary["eval_accuracy_first"] is not None


def test_console_shows_a_live_display_and_no_engine_output(watched_run):
    text = _plain(watched_run["transcript"])
    leaked = sorted({line.strip()[:160] for line in text.splitlines() if ENGINE_LINES.search(line)})
    assert leaked == [], leaked
    # Redrawn in place: the progress bar passed through several steps of the total, with the panel's numbers.
    counts = {int(n) for n in re.findall(rf"\b(\d+)/{STEPS}\b", text)}
    assert {0, STEPS} <= counts and len(counts) >= 3, counts
    assert text.count("\x1b[") > 0 or "\x1b[" in watched_run["transcript"]  # a terminal display, not plain lines
    assert not re.search(rf"^step 1/{STEPS} \|", text, re.M)  # the plain one-line-per-step form is for pipes
    for label in ("reward", "held-out acc", "samples/s", "tokens/s", "queues", "resets", "weight load"):
        assert label in text, label
    # Our own warnings still show, here one a rollout actor's vLLM engine logs (top_p < 1), via RUN_DIR/logs.
    if _engine(watched_run) == "vllm":
        assert re.search(r"rollout-\d WARNING resetrl\.\S+: top_p = 0\.95", text), text[-3000:]
    assert "held-out accuracy" in text and f"plots: {watched_run['run_dir'] / 'plots'}" in text


def test_engine_output_went_to_the_role_logs(watched_run):
    logs = watched_run["run_dir"] / "logs"
    for role in ROLES:
        assert (logs / f"{role}.log").is_file(), role
    rollout = (logs / "rollout-0.log").read_text(errors="replace")
    if _engine(watched_run) == "vllm":
        assert re.search(r"INFO \d\d-\d\d", rollout), rollout[:2000]  # vLLM's own lines, at monitor.log_level INFO
        assert "top_p = 0.95" in rollout  # and the actor's own warning, which also went to the console
    assert "deepspeed" in (logs / "learner-rank0.log").read_text(errors="replace").lower()


def test_state_api_lists_the_runs_actors_by_name(watched_run):
    by_name = {actor["name"]: actor for actor in watched_run["actors"]}
    assert watched_run["names"] <= set(by_name), sorted(by_name)
    run = watched_run["run_name"]
    assert by_name[f"{run}/rollout-0"]["class_name"] == "RolloutActor"
    assert by_name[f"{run}/learner-rank0"]["class_name"] == "Learner"
    assert by_name[f"{run}/evaluator"]["class_name"] == "Evaluator"
    # The repr (the dashboard's Repr column): role, engine, policy version.
    engine = _engine(watched_run)
    assert re.fullmatch(rf"RolloutActor\(rollout-0, engine={engine}, policy v\d+\)",
                        by_name[f"{run}/rollout-0"]["repr_name"])
    assert re.fullmatch(r"Learner\(learner-rank0 of 1, DeepSpeed ZeRO-2, policy v\d+\)",
                        by_name[f"{run}/learner-rank0"]["repr_name"])
    assert f"engine={engine}" in by_name[f"{run}/evaluator"]["repr_name"]


def test_the_job_metadata_names_the_run_and_its_config(watched_run):
    ours = [job["metadata"] for job in watched_run["jobs"]
            if (job["metadata"] or {}).get("resetrl_run") == watched_run["run_name"]]
    assert len(ours) == 1, watched_run["jobs"]
    config = json.loads(ours[0]["resetrl_config"])
    assert config["run_name"] == watched_run["run_name"] and config["algorithm"]["name"] == "rrpo"
    assert ours[0]["resetrl_run_dir"] == str(watched_run["run_dir"]) and ours[0]["resetrl_method"] == "rrpo"


def test_the_dashboards_actors_page_shows_the_named_actors(watched_run):
    if watched_run["browser_skip"]:
        pytest.skip(watched_run["browser_skip"])
    assert watched_run["browser"] is not None, "the run ended before the browser could look"
    for name in sorted(watched_run["names"]):
        assert name in watched_run["browser"], (name, watched_run["browser"][:3000])


def test_every_grafana_query_has_data_in_prometheus(watched_run, tmp_path):
    if find_prometheus() is None:
        pytest.skip("no prometheus binary on PATH (Debian: apt-get install prometheus; `make test` does it as root)")
    run_dir = watched_run["run_dir"]
    assert (run_dir / "monitoring" / "data").is_dir(), "the run did not start its Prometheus"
    # Reopen what the run's Prometheus scraped (it stopped with the run) and ask it every dashboard query.
    prometheus = LocalPrometheus(run_dir, free_port()).start(tmp_path)
    try:
        exported = sorted(name for name in _api(prometheus.url, "label/__name__/values")
                          if name.startswith("ray_resetrl_"))
        missing = []
        for title, expr in dashboard_queries():
            result = _api(prometheus.url, "query_range", query=expr, start=watched_run["started"],
                          end=watched_run["ended"] + 30, step=5)["result"]
            if not any(series["values"] for series in result):
                hints = {name: difflib.get_close_matches(name, exported, n=3, cutoff=0.5)
                         for name in re.findall(r"ray_resetrl_\w+", expr) if name not in exported}
                missing.append(f"{title}: `{expr}` has no data; not exported: {hints}")
        assert not missing, "\n".join(missing) + f"\nthe run exported: {exported}"
    finally:
        prometheus.stop()


def _api(base: str, path: str, **params):
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def test_the_run_drew_its_plots(watched_run):
    plots = watched_run["run_dir"] / "plots"
    names = {png.name for png in plots.glob("*.png")}
    assert {"reward.png", "heldout_accuracy.png", "throughput.png", "queues.png", "resets.png"} <= names, names
    summary = json.loads(watched_run["summary_path"].read_text())
    reward = read_plotted_series(plots / "reward.png")
    assert [value for _step, value in next(iter(reward.values()))] == pytest.approx(summary["reward_curve"])
    accuracy = read_plotted_series(plots / "heldout_accuracy.png")["held-out accuracy"]
    assert [(p["policy_version"], p["accuracy"]) for p in summary["eval_curve"]] == accuracy
