"""Chaos: a real `resetrl train` (tiny preset: Ray, embedded redis-server, DeepSpeed, HF engines; 2 rollout workers,
durable Redis, a checkpoint every 2 steps, the ray_object_store weight channel) while a fault injector SIGKILLs a
rollout actor, the run's redis-server and the learner at different points. Nothing in the test restarts anything:
Ray restarts the actors and the learner, the driver restarts its redis-server (docs/design.md, "What a crash
replays"). The run must exit 0 with every step done, and its ledger must show every fed prompt settled, none lost,
none trained twice. The default suite runs the short plan (one fault of each kind); the slow plan repeats them and
adds the evaluator. Each run prints CHAOS-FIGURES for the README's Reliability table.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from safetensors import safe_open

from resetrl.net import free_port

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


class ChaosRun:
    """A `resetrl train` subprocess whose output lines are read by a thread, so waits can time out."""

    def __init__(self, run_dir: Path, summary: Path, total_steps: int, *overrides: str):
        self.run_dir, self.total_steps = run_dir, total_steps
        command = [sys.executable, "-m", "resetrl.cli", "train", "--summary", str(summary),
                   "--config", str(REPO / "configs" / "tiny.yaml"), f"run_dir={run_dir}", "rollout.engine=hf",
                   f"total_steps={total_steps}", "rollout.num_workers=2", "queue.durable=true",
                   "learner.checkpoint_every=2", "learner.max_staleness=0", "learner.weight_channel=ray_object_store",
                   "queue.claim_idle_ms=5000", f"ray.dashboard_port={free_port()}", *overrides]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: str, timeout_s: float = 600) -> tuple[float, re.Match]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"the run ended (exit {self.proc.wait()}) before /{pattern}/:\n{self.output[-6000:]}")
            if match := re.search(pattern, line):
                return time.monotonic(), match
        pytest.fail(f"/{pattern}/ did not appear within {timeout_s:.0f} s:\n{self.output[-6000:]}")

    def wait_for_step(self, step: int | None = None) -> tuple[float, int]:
        """The next `step N/total` line (of step `step`, or of any step); its time and N."""
        number = r"\d+" if step is None else str(step)
        at, match = self.wait_for(rf"\bstep ({number})/{self.total_steps}\b")
        return at, int(match.group(1))

    def finish(self, timeout_s: float = 600) -> int:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        time.sleep(0.5)  # the reader thread drains the pipe
        return self.proc.returncode

    def stop(self) -> None:
        """A failed test leaves nothing running: Ctrl-C to the run's group, then SIGKILL."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def info(self) -> dict:
        return json.loads((self.run_dir / "run.json").read_text())

    def processes(self) -> list[psutil.Process]:
        driver = psutil.Process(self.proc.pid)
        return [driver, *driver.children(recursive=True)]

    def find(self, title: str) -> psutil.Process:
        """The run's process whose command line (a process title, for Ray workers and redis-server) holds `title`."""
        for process in self.processes():
            try:
                if title in " ".join(process.cmdline()):
                    return process
            except psutil.Error:  # gone meanwhile
                pass
        pytest.fail(f"no process of the run is titled {title!r}")


def victim(run: ChaosRun, target: str) -> psutil.Process:
    info = run.info()
    if target == "rollout":
        return psutil.Process(info["actor_pids"][0])
    if target == "learner":
        return psutil.Process(info["learner_pid"])
    if target == "redis":
        # redis-server rewrites its process title to "redis-server 127.0.0.1:PORT"
        return run.find(f"redis-server 127.0.0.1:{info['redis_url'].rsplit(':', 1)[1].split('/')[0]}")
    if target == "evaluator":
        return run.find("ray::Evaluator")
    raise ValueError(target)


def listeners(run: ChaosRun) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket the run's processes listen on."""
    found = set()
    for process in run.processes():
        try:
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((process.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def run_chaos(tmp_path: Path, total_steps: int, plan: list[tuple[int, str]], *overrides: str) -> dict:
    """Run, kill `target` once the line of step `after` appears for each (after, target) of `plan`, and check."""
    summary_path = tmp_path / "summary.json"
    run = ChaosRun(tmp_path / "run", summary_path, total_steps, *overrides)
    faults = []
    try:
        run.wait_for_step(1)
        exposed = {entry for entry in listeners(run) if entry[1] not in LOOPBACK}
        for after, target in plan:
            if after > 1:
                run.wait_for_step(after)
            process = victim(run, target)
            process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            back_at, step = run.wait_for_step()
            faults.append({"target": target, "after_step": after, "next_step": step,
                           "recovery_s": round(back_at - killed_at, 1)})
        assert run.finish() == 0, run.output[-6000:]
    finally:
        run.stop()
    assert "Traceback" not in run.output, run.output[-6000:]
    summary = json.loads(summary_path.read_text())
    ledger = summary["ledger"]
    settled = ledger["trained"] + ledger["dropped_stale"] + ledger["dropped_no_signal"] + ledger["dead_lettered"]
    kill_figures = " ".join(f"{f['target']}@{f['after_step']}:{f['recovery_s']}s" for f in faults)
    print(f"\nCHAOS-FIGURES steps={summary['steps']}/{total_steps} faults={len(faults)} {kill_figures} "
          f"ledger={json.dumps(ledger)} learner_restarts={summary['learner_restarts']} "
          f"redis_restarts={summary['redis_restarts']} actor_starts={summary['counters'].get('actor_starts')} "
          f"records_duplicate={summary['counters'].get('records_duplicate', 0)} "
          f"wall_s={summary['wall_seconds']}")
    assert summary["steps"] == total_steps
    assert ledger["lost"] == 0 and ledger["trained_twice"] == 0, ledger
    assert ledger["in_flight"] == 0 and settled == ledger["fed"] > 0, ledger  # every fed prompt is settled
    kills = {target: sum(t == target for _, t in plan) for _, target in plan}
    assert len(summary["learner_restarts"]) == kills.get("learner", 0)
    assert len(summary["redis_restarts"]) == kills.get("redis", 0)
    assert summary["counters"]["actor_starts"] == 2 + kills.get("rollout", 0)
    # RUN_DIR/final holds the final weights, though the channel (ray_object_store) keeps none in a folder
    with safe_open(str(tmp_path / "run" / "final" / "model.safetensors"), "pt") as final:
        assert "model.embed_tokens.weight" in set(final.keys())
    assert not exposed, f"listening beyond loopback: {sorted(exposed)}"
    return summary


def test_a_run_survives_a_rollout_actor_its_redis_and_its_learner_killed(tmp_path):
    # A tiny step takes about a second: the learner is killed 3 steps before the end, after step 9 (its newest
    # checkpoint is step 8's, so step 9 is trained again from the replayed experience).
    run_chaos(tmp_path, 12, [(2, "rollout"), (5, "redis"), (9, "learner")])


@pytest.mark.slow
def test_a_longer_run_survives_every_fault_twice_and_a_killed_evaluator(tmp_path):
    plan = [(2, "rollout"), (4, "redis"), (7, "learner"), (10, "evaluator"), (12, "rollout"), (15, "learner"),
            (17, "redis")]
    summary = run_chaos(tmp_path, 20, plan, "eval.holdout=4", "eval.every=2")
    assert summary["eval_curve"][-1]["policy_version"] == 20  # the restarted evaluator scored the final policy
