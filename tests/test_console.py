"""The console (resetrl/console.py) and where worker output goes (resetrl/worker_logs.py).

The whole run under a pseudo-terminal (no engine lines, a display that updates) is in tests/test_monitoring.py,
which shares one tiny run between its checks; these are the parts that need no run: the key numbers, one plain
line per step off a terminal, and a real worker process's output routed to its role's file.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from rich.console import Console

from resetrl.console import RunDisplay, key_numbers, run_end_lines
from resetrl.worker_logs import LOG_FILE_ENV, LOG_LEVEL_ENV, WARNINGS_FILE, WarningFollower

SCALARS = {  # as the driver passes them: namespaced (resetrl/metrics.py)
    "learner/reward_mean": 0.3125, "learner/policy_version": 3.0, "learner/version_lag": 0.5, "learner/loss": -0.01234,
    "rollout/reset_rate": 0.75, "rollout/g2_success_rate": 0.25, "system/queue_depth_prompts": 4.0,
}
STATS = {"samples_generated": 96, "tokens_generated": 1500, "samples_dropped_stale": 2, "weight_loads": 4,
         "weight_load_seconds": 1.0}


def test_key_numbers_read_namespaced_scalars_and_counters():
    evals = [{"policy_version": 0, "accuracy": 0.125}, {"policy_version": 3, "accuracy": 0.375}]
    numbers = key_numbers(SCALARS, STATS, {"prompts": 4, "experience": 0}, evals, elapsed=12.0)
    assert numbers == {
        "reward": "0.312",  # 0.3125 to 3 places (round half to even)
        "held-out acc": "37.5% at v3 (v0: 12.5%)",
        "samples/s": "8.00",  # 96 / 12
        "tokens/s": "125.0",  # 1500 / 12
        "queues": "prompts 4 experience 0",
        "policy": "v3 lag 0.50",
        "loss": "-0.0123",
        "stale drops": "2",
        "resets": "75% of prompts, G2 success 25%",
        "weight load": "0.25 s",  # 1.0 s over 4 loads
    }


def test_key_numbers_leave_out_what_the_run_does_not_have_yet():
    numbers = key_numbers(None, {}, None, None, elapsed=0.0)
    assert numbers == {"stale drops": "0"}
    # Flat names (no namespace) are found too; a GRPO run has no reset numbers.
    assert "resets" not in key_numbers({"reward_mean": 1.0}, {}, None, None, 1.0)
    assert key_numbers({"reward_mean": 1.0}, {}, None, None, 1.0)["reward"] == "1.000"


def test_off_a_terminal_the_display_prints_one_line_per_step(tmp_path):
    out = io.StringIO()
    display = RunDisplay(3, tmp_path, header="tiny: grpo", out=Console(file=out, force_terminal=False, width=200))
    assert not display.live_mode
    with display:
        for step in (1, 2, 3):
            for _ in range(4):  # polls between steps print nothing
                display.update(step - 1, stats=STATS, elapsed=float(step))
            display.update(step, stats=STATS, elapsed=float(step), scalars=SCALARS, step_ended=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "tiny: grpo"
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert len(lines) == 4
    assert "reward 0.312" in steps[0] and steps[2].endswith("0:00:03")


def test_actor_warnings_are_followed_into_the_console(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / WARNINGS_FILE).write_text("rollout-0 WARNING resetrl.old: from an earlier run\n")
    out = io.StringIO()
    display = RunDisplay(2, tmp_path, out=Console(file=out, force_terminal=False, width=200))
    with open(logs / WARNINGS_FILE, "a") as handle:
        handle.write("rollout-1 WARNING resetrl.actors: verifier timed out\nrollout-1 ERROR resetrl.x: half a li")
    with display:
        display.update(0, stats={}, elapsed=1.0)
    printed = out.getvalue()
    assert "verifier timed out" in printed
    assert "earlier run" not in printed and "half a li" not in printed  # old news; a line still being written
    with open(logs / WARNINGS_FILE, "a") as handle:
        handle.write("ne\n")
    assert WarningFollower(tmp_path).new_lines() == []  # a new follower starts at the end
    assert display.follower.new_lines() == ["rollout-1 ERROR resetrl.x: half a line"]


def test_a_worker_process_writes_to_its_role_file_and_still_to_its_own_output(tmp_path):
    """route_worker_output is what Ray runs in each actor's process before the actor starts (the job's
    worker_process_setup_hook): Python logging, a C-level write to fd 2 and print all land in the role's file,
    the process's original stdout still gets them (Ray's worker log), and resetrl's warnings reach warnings.log."""
    log_file = tmp_path / "logs" / "rollout-7.log"
    script = textwrap.dedent("""
        import logging, os
        from resetrl.worker_logs import route_worker_output
        route_worker_output()
        print("plain print", flush=True)
        os.write(2, b"raw write to fd 2\\n")
        logging.getLogger("vllm.engine").info("engine INFO line")
        logging.getLogger("resetrl.actors.x").warning("our own warning")
        logging.getLogger("resetrl.actors.x").debug("too verbose")
    """)
    env = {**os.environ, LOG_FILE_ENV: str(log_file), LOG_LEVEL_ENV: "INFO"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = log_file.read_text()
    for line in ("plain print", "raw write to fd 2", "engine INFO line", "our own warning"):
        assert line in text, (line, text)
        assert line in result.stdout  # tee: Ray's own worker log keeps them too
    assert "too verbose" not in text
    assert (tmp_path / "logs" / WARNINGS_FILE).read_text().splitlines() == [
        "rollout-7 WARNING resetrl.actors.x: our own warning"]


def test_a_worker_without_a_role_is_left_alone(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != LOG_FILE_ENV}
    result = subprocess.run(
        [sys.executable, "-c", "from resetrl.worker_logs import route_worker_output as r; r(); print('here')"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "here\n"
    assert list(Path(tmp_path).iterdir()) == []


def test_the_end_of_a_run_says_what_changed_and_where_to_look(tmp_path):
    summary = {"reward_mean_first": 0.25, "reward_mean_last": 0.5, "eval_accuracy_first": 0.125,
               "eval_accuracy_last": 0.3125, "eval_curve": [{"problems": 32}], "plots_dir": str(tmp_path / "plots"),
               "run_dir": str(tmp_path)}
    assert run_end_lines(summary) == [
        "reward (training batch) 0.250 -> 0.500",
        "held-out accuracy 12.5% -> 31.2% on 32 held-out problems",
        f"plots: {tmp_path / 'plots'}",
        f"logs: {tmp_path / 'logs'}",
    ]
