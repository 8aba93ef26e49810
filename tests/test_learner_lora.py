"""The learner with learner.lora against a real redis-server and real DeepSpeed (CPU, gloo), on the tiny preset
model: only the adapter trains, each version publishes the adapter alone, an engine serving it generates what the
learner's merged model generates, and checkpoints resume with the adapter and its optimizer state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resetrl.actors.engines import SamplingSettings, make_engine
from resetrl.config import ModelConfig, config_from_dict
from resetrl.learner.checkpoint import latest_checkpoint
from resetrl.learner.learner import Learner
from resetrl.learner.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from resetrl.models import resolve_model
from resetrl.queue import StreamQueue
from resetrl.record import ExperienceRecord, encode_experience
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys
from resetrl.weights import WEIGHTS_FILE

PROMPT_LEN, RESPONSE_LEN = 4, 8
LORA = {"rank": 8, "alpha": 16.0}
ADAPTER_PARAMS = 16384  # tests/test_lora.py: r x (in + out) over the tiny preset's 14 linear layers
PROMPTS = [[1, 9690, 198, 2683, 359], [5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model(ModelConfig(name="tiny-llama"))  # the tiny preset: SmolLM2's tokenizer, for the engines


def make_config(run_dir, lora=LORA, **learner):
    return config_from_dict({
        "run_name": "lora", "run_dir": str(run_dir),
        "rollout": {"group_size": 2, "max_new_tokens": RESPONSE_LEN},
        # a high learning rate: the tiny model's greedy tokens change within a step
        "learner": {"prompts_per_step": 2, "micro_batch_size": 2, "lr": 0.05, "read_block_ms": 100,
                    "max_staleness": 10, "lora": lora, **learner},
    })


def record(step: int, i: int) -> ExperienceRecord:
    rng = np.random.default_rng(step * 1000 + i)
    response = np.arange(PROMPT_LEN + RESPONSE_LEN) >= PROMPT_LEN
    advantage = 1.0 if i % 2 == 0 else -1.0
    return ExperienceRecord(
        record_id=f"s{step}-r{i}", prompt_id=f"s{step}-p{i // 2}", group_id=f"s{step}-g{i // 2}", method="grpo",
        policy_version=0, token_ids=rng.integers(1, 300, size=len(response)).astype(np.int32),
        prompt_length=PROMPT_LEN, loss_mask=response.astype(np.uint8),
        advantages=np.where(response, advantage, 0.0).astype(np.float32),
        behaviour_logprobs=np.where(response, -10.8, 0.0).astype(np.float32), reward=float(advantage > 0),
        temperature=1.0,
    )


def push_step(client, step: int) -> None:
    queue = StreamQueue(client, RunKeys("lora").experience, EXPERIENCE_GROUP, "producer")
    queue.put_many([encode_experience(record(step, i)) for i in range(4)])


def weights(learner) -> dict:
    return {k: v.detach().clone() for k, v in learner.engine.module.state_dict().items()}


def greedy_tokens(engine) -> list[list[int]]:
    return [s[0].token_ids for s in engine.generate(PROMPTS, 1, SamplingSettings(max_new_tokens=8, temperature=0.0))]


def merged_greedy(learner, tiny_path, folder) -> list[list[int]]:
    """What the learner's merged model generates (its RUN_DIR/final weights, in an engine without LoRA)."""
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes(learner.export_weights())
    engine = make_engine("hf", str(tiny_path))
    engine.load_weights(str(folder))
    return greedy_tokens(engine)


def test_a_lora_step_trains_the_adapter_only_and_publishes_it(redis_server, redis_client, tiny_path, tmp_path):
    learner = Learner(make_config(tmp_path / "run"), str(tiny_path), redis_server.url, str(tmp_path / "weights"))
    trainable = [name for name, p in learner.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # The optimizer holds the adapter alone (DeepSpeed's ZeRO-2 keeps one flat fp32 partition of what it trains).
    assert sum(p.numel() for p in learner.engine.optimizer.single_partition_of_fp32_groups) == ADAPTER_PARAMS
    before = weights(learner)

    push_step(redis_client, 1)
    metrics = learner.train_step(timeout_s=60)
    assert metrics["step"] == 1 and not metrics["skipped"]
    after = weights(learner)
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed and all(".lora_" in name for name in changed)  # the base weights never move
    assert any(".lora_B." in name for name in changed)  # B leaves zero: the policy changed

    version, folder = learner.channel.latest()
    published = f"{folder}/{WEIGHTS_FILE}"
    from safetensors.torch import load_file

    tensors = load_file(published)
    assert version == 1 and sum(t.numel() for t in tensors.values()) == ADAPTER_PARAMS
    # The engines serve it as an adapter and generate what the merged model generates.
    engine = make_engine("hf", str(tiny_path), lora=learner.cfg.learner.lora)
    base = greedy_tokens(engine)
    engine.load_weights(folder)
    expected = merged_greedy(learner, tiny_path, tmp_path / "merged")
    assert greedy_tokens(engine) == expected and expected != base

    exported = learner.export_adapter()
    assert sorted(exported) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    learner.close()


def test_merge_for_sync_publishes_the_merged_weights(redis_server, redis_client, tiny_path, tmp_path):
    learner = Learner(make_config(tmp_path / "run", lora={**LORA, "merge_for_sync": True}), str(tiny_path),
                      redis_server.url, str(tmp_path / "weights"))
    push_step(redis_client, 1)
    learner.train_step(timeout_s=60)
    _, folder = learner.channel.latest()
    engine = make_engine("hf", str(tiny_path))  # no adapter slot: plain weights under the model's own names
    engine.load_weights(folder)
    assert greedy_tokens(engine) == merged_greedy(learner, tiny_path, tmp_path / "merged")
    learner.close()


def test_resume_with_lora_continues_exactly(redis_server, redis_client, tiny_path, tmp_path):
    cfg = make_config(tmp_path / "run", checkpoint_every=2)
    first = Learner(cfg, str(tiny_path), redis_server.url, str(tmp_path / "w1"))
    for step in (1, 2, 3):
        push_step(redis_client, step)
        assert first.train_step(timeout_s=60)["step"] == step
        if step == 2:
            at_checkpoint = weights(first)
    after_step_3 = weights(first)
    assert latest_checkpoint(cfg.run_path / "checkpoints").name == "step-00000002"
    first.close()  # dies between checkpoints: step 3 is replayed

    with pytest.raises(ValueError, match=r"written with learner.lora=\{'rank': 8.*this run has learner.lora="
                                         r"\{'rank': 16"):
        Learner(make_config(tmp_path / "run", lora={"rank": 16, "alpha": 16.0}, checkpoint_every=2),
                str(tiny_path), redis_server.url, str(tmp_path / "w2"), resume=True)
    with pytest.raises(ValueError, match=r"this run has full fine-tuning \(learner.lora=null\)"):
        Learner(make_config(tmp_path / "run", lora=None, checkpoint_every=2), str(tiny_path), redis_server.url,
                str(tmp_path / "w2"), resume=True)

    second = Learner(cfg, str(tiny_path), redis_server.url, str(tmp_path / "w3"), resume=True)
    assert second.policy_version() == 2
    restored = weights(second)
    assert all(torch.equal(restored[k], at_checkpoint[k]) for k in at_checkpoint)
    # the checkpoint's adapter is published again for the engines
    from safetensors.torch import load_file

    version, folder = second.channel.latest()
    republished = load_file(f"{folder}/{WEIGHTS_FILE}")
    assert version == 2 and sum(t.numel() for t in republished.values()) == ADAPTER_PARAMS

    assert second.train_step(timeout_s=60)["step"] == 3  # step 3 again, from the replayed entries
    replayed = weights(second)
    # the same adapter, Adam moments, batch and RNG: the same weights, bit for bit
    assert all(torch.equal(replayed[k], after_step_3[k]) for k in after_step_3)
    second.finish()
    second.close()
