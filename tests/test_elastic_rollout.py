"""Elastic rollout workers: `resetrl scale` grows and shrinks a running job without losing or repeating a prompt.

- a retired RolloutActor (real HF engine on the tiny random Llama, real redis-server, no Ray) takes no new
  prompts, finishes every prompt its consumer holds, and leaves its consumer removable;
- `resetrl scale` refuses a count below 1 and a run that is not running;
- the whole thing through the real stack: `resetrl train` (tiny preset, 1 worker), `resetrl scale --workers 2`,
  the second worker generates, `resetrl scale --workers 1`, `resetrl stop`: the job ends after its current step
  with every prompt accounted for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from resetrl.actors.rollout_actor import RolloutActor
from resetrl.cli import app
from resetrl.config import ModelConfig, config_from_dict
from resetrl.models import resolve_model
from resetrl.queue import StreamQueue
from resetrl.record import PromptRecord, decode_experience, encode_prompt
from resetrl.run_state import (
    EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys, read_heartbeats, read_stats, request_retire,
)

REPO = Path(__file__).resolve().parent.parent


def config(run_name: str):
    return config_from_dict({
        "run_name": run_name, "seed": 0,
        "model": {"name": "tiny-llama"},
        "rollout": {"engine": "hf", "group_size": 2, "prompts_per_batch": 2, "max_new_tokens": 4},
        "learner": {"prompts_per_step": 1, "micro_batch_size": 2},
    })


def test_a_retired_worker_finishes_the_prompts_it_holds_and_takes_no_new_ones(redis_server, redis_client, tmp_path):
    cfg = config("retire")
    keys = RunKeys(cfg.run_name)
    prompts = StreamQueue(redis_client, keys.prompts, PROMPT_GROUP, "driver")
    prompts.ensure_group()
    experience = StreamQueue(redis_client, keys.experience, EXPERIENCE_GROUP, "learner")
    experience.ensure_group()
    prompts.put_many([encode_prompt(PromptRecord(f"p{i}", f"{i} + 1", str(i + 1), "basic_arithmetic"))
                      for i in range(6)])
    actor = RolloutActor(cfg, 3, str(resolve_model(ModelConfig(name="tiny-llama"))), redis_server.url,
                         str(tmp_path / "weights"))
    assert read_heartbeats(redis_client, keys)[3]["state"] == "starting"
    # The worker holds 3 prompts it has not finished (what a busy worker holds when `resetrl scale` retires it).
    held = actor.prompts.read(count=3)
    assert prompts.consumers() == {"rollout-3": 3}

    request_retire(redis_client, keys, 3)
    totals = actor.run()

    assert totals["prompts"] == 3 and totals["samples"] == 3 * 2
    assert prompts.consumers() == {"rollout-3": 0}  # nothing left pending under its name...
    assert prompts.depth() == 3  # ...and the 3 it never took are still queued for the others
    trained_for = {decode_experience(entry.payload).prompt_id for entry in experience.read(count=100)}
    assert trained_for == {"p0", "p1", "p2"} == {f"p{i}" for i in range(len(held))}
    beat = read_heartbeats(redis_client, keys)[3]
    assert beat["state"] == "retired" and beat["consumer"] == "rollout-3" and beat["pid"] == os.getpid()
    assert (beat["prompts"], beat["samples"], beat["tokens"]) == (3, 6, totals["tokens"]) and beat["tokens_per_s"] > 0
    assert time.time() - beat["last_seen"] < 60
    assert read_stats(redis_client, keys)["prompts_done"] == 3
    assert prompts.remove_consumer("rollout-3") == 0 and prompts.consumers() == {}
    actor.close()


def test_remove_consumer_keeps_one_that_still_holds_prompts(redis_client):
    queue = StreamQueue(redis_client, "test:prompts", PROMPT_GROUP, "rollout-1")
    queue.ensure_group()
    queue.put_many([b"a", b"b"])
    queue.read(count=1)
    # XGROUP DELCONSUMER would drop the held entry from the group's pending list: it must stay reclaimable.
    assert queue.remove_consumer("rollout-1") == 1
    assert queue.consumers() == {"rollout-1": 1}


def test_scale_and_stop_refuse_fewer_than_one_worker_and_a_run_that_is_not_running(redis_server, redis_client):
    runner = CliRunner()
    result = runner.invoke(app, ["scale", "--workers", "0", "--redis-url", redis_server.url, "--run-name", "x"])
    assert result.exit_code == 2 and "at least 1 rollout worker" in result.output
    result = runner.invoke(app, ["scale", "--workers", "2", "--redis-url", redis_server.url, "--run-name", "nope"])
    assert result.exit_code == 1 and "no running job 'nope'" in result.output
    assert redis_client.get(RunKeys("nope").desired_workers) is None
    result = runner.invoke(app, ["stop", "--redis-url", redis_server.url, "--run-name", "nope"])
    assert result.exit_code == 1 and "no running job 'nope'" in result.output
    assert redis_client.get(RunKeys("nope").finish) is None


# ---- through the real stack -----------------------------------------------------------------------------------

def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resetrl.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _wait_until(what: str, check, proc: subprocess.Popen, log: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        if proc.poll() is not None:
            pytest.fail(f"{what}: the job ended first (exit {proc.returncode})\n" + log.read_text()[-4000:])
        time.sleep(1.0)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s\n" + log.read_text()[-4000:])


def _status(run_dir: Path) -> dict | None:
    result = _cli("status", "--run-dir", str(run_dir))
    return json.loads(result.stdout) if result.returncode == 0 else None


# A cap the job never reaches: the test ends it with `resetrl stop` once the added worker has generated and retired,
# however fast the machine is (with a fixed count of 60 steps, a fast CI machine finished the job before the newcomer
# had started). One prompt per engine call, so the first worker leaves queued prompts for the newcomer.
_STEPS = 100_000


# ~100 s on 2 cores; in the default suite because the issue asks CI to show elastic scaling loses nothing.
def test_scale_up_then_down_on_a_running_job(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    command = [
        sys.executable, "-m", "resetrl.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
        "--summary", str(tmp_path / "summary.json"), f"run_dir={run_dir}", "rollout.engine=hf",
        "rollout.num_workers=1", "rollout.prompts_per_batch=1", f"total_steps={_STEPS}", "tensorboard=false",
    ]
    # Output to a file, not a pipe: nothing has to keep reading it while the test waits on `resetrl status`.
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_until("the first optimizer step", lambda: f"step 1/{_STEPS}" in log.read_text(), proc, log,
                    timeout_s=600)

        up = _cli("scale", "--workers", "2", "--run-dir", str(run_dir))
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout) == {"run_name": "tiny", "workers_desired": 2, "workers_running": 1}

        def second_worker_generated():
            report = _status(run_dir)
            if not report or report["workers_alive"] != 2:
                return None
            newcomer = next(w for w in report["workers"] if w["index"] == 1)
            return report if newcomer["samples"] > 0 else None

        report = _wait_until("2 workers alive, the new one generating", second_worker_generated, proc, log)
        assert report["worker_count"] == 2 and report["workers_desired"] == 2
        assert [w["consumer"] for w in report["workers"]] == ["rollout-0", "rollout-1"]
        assert all(w["version_lag"] >= 0 and w["state"] == "running" for w in report["workers"])
        # It started from the learner's weights, not the initial ones (the run is past step 1).
        assert next(w for w in report["workers"] if w["index"] == 1)["policy_version"] >= 1
        assert report["tokens_per_s"] > 0 and report["samples_per_s"] > 0

        down = _cli("scale", "--workers", "1", "--run-dir", str(run_dir))
        assert down.returncode == 0, down.stderr

        def retired():
            report = _status(run_dir)
            return report if report and "rollout-1" not in report["prompt_consumers"] else None

        report = _wait_until("worker 1 retired and its consumer removed", retired, proc, log)
        assert report["worker_count"] == 1 and [w["index"] for w in report["workers"]] == [0]

        stopping = _cli("stop", "--run-dir", str(run_dir))
        assert stopping.returncode == 0, stopping.stderr
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:  # a failed test leaves nothing running: Ctrl-C to the run's group
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log.read_text()[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())

    assert summary["ended_by"] == "resetrl stop" and 1 < summary["steps"] < _STEPS
    assert [point["workers"] for point in summary["worker_count_history"]] == [1, 2, 1]
    assert summary["workers_added"] == 1 and summary["workers_removed"] == 1 and summary["workers_failed"] == 0
    assert summary["counters"]["workers_added"] == 1 and summary["counters"]["workers_removed"] == 1
    [retiree] = summary["workers_retired"]
    assert retiree["index"] == 1 and retiree["totals"]["prompts"] > 0
    assert retiree["pending_prompts_left"] == 0 and retiree["consumer_removed"]
    assert summary["prompts_lost"] == 0, summary
    assert summary["duplicates_trained"] == 0, summary
    assert summary["counters"]["actor_starts"] == 2  # one initial worker plus the added one, no restarts
