"""SRL, SuperRL and repair through the real stack: `resetrl train` on the tiny preset with problems that carry
expert solutions (multilingual-gsm-symbolic's GSM8K problems), HF engine, real Ray, Redis and DeepSpeed.

The tiny random model solves nothing, so: SRL is run without the <think> requirement and without dynamic
sampling (its rewards are similarities in [0, 1], never all equal); every SuperRL prompt goes to SFT on the
expert solution; every repair prompt is tried and none is accepted (the accepted path is in test_expert_rollout).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.test_end_to_end import REPO, _env, _run_processes, _train_command

pytest.importorskip("multilingual_gsm_symbolic")

GSM = ("data.source=multilingual_gsm_symbolic", "data.size=20", "rollout.engine=hf", "learner.prompts_per_step=1",
       "ray.include_dashboard=false")


def _own_leftovers(before: set[int], tmp_path: Path, session_dir: str | None, grace_s: float = 20.0) -> list[str]:
    """Processes of *this* run still alive: its Ray session's processes and its redis-server (which runs in the
    run directory). Other runs on a shared machine start and stop Ray and Redis at the same time; not ours."""
    session = Path(session_dir).name if session_dir else None

    def ours(pid: int) -> str | None:
        try:
            proc = psutil.Process(pid)
            text = " ".join(proc.cmdline())
            if (session and session in text) or proc.cwd().startswith(str(tmp_path)):
                return text[:160]
        except psutil.Error:
            pass
        return None

    deadline = time.monotonic() + grace_s
    while True:
        alive = [text for pid in _run_processes() - before if (text := ours(pid))]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def train(tmp_path, *overrides: str) -> dict:
    before = _run_processes()
    result = subprocess.run(_train_command(tmp_path, *GSM, *overrides), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert _own_leftovers(before, tmp_path, summary.get("ray_session_dir")) == []
    assert summary["samples_generated"] == (summary["samples_trained"] + summary["queue_dropped_stale"]
                                            + summary["samples_left_in_queue"])
    return summary


def test_srl_then_rlvr_trains_on_step_similarity_then_switches(tmp_path):
    summary = train(
        tmp_path, "algorithm.name=srl", "algorithm.srl.require_think=false", "algorithm.srl.dynamic_sampling=false",
        "algorithm.srl.instances_per_prompt=1", "algorithm.srl.curriculum=srl_then_rlvr",
        "algorithm.srl.switch_after_steps=1", "total_steps=3",
    )
    counters = summary["counters"]
    assert summary["steps"] == 3 and summary["method"] == "srl"
    assert counters["srl_instances"] >= 1 and counters["srl_rlvr_prompts"] >= 1  # both phases ran
    assert summary["srl_malformed_rate"] == 0.0 and 0.0 < summary["srl_similarity_mean"] < 1.0


def test_superrl_trains_on_the_expert_solution_when_rewards_are_sparse(tmp_path):
    summary = train(tmp_path, "algorithm.name=superrl", "total_steps=2")
    counters = summary["counters"]
    assert summary["steps"] == 2 and summary["method"] == "superrl"
    assert summary["superrl_sft_fraction"] == 1.0  # the random model solves nothing: every prompt is SFT
    assert counters["superrl_sft_prompts"] >= 2 * 4  # 4 SFT records (one per prompt) fill each step
    assert summary["samples_trained"] == 2 * 4


def test_repair_sends_failures_back_for_repair(tmp_path):
    summary = train(tmp_path, "algorithm.name=repair", "learner.micro_batch_size=5", "total_steps=2")
    counters = summary["counters"]
    assert summary["steps"] == 2 and summary["method"] == "repair"
    assert counters["repairs_attempted"] >= 2 and summary["repair_success_rate"] is not None
