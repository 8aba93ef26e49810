"""A learner of several ranks (learner.world_size > 1): real Ray actors, real DeepSpeed (ZeRO 2, gloo on CPU), a
real redis-server and the tiny random Llama.

The specification: W ranks trained on a batch take the step one rank takes on the same batch (same loss, same
weights within float tolerance), also when the ranks' shards hold unequal numbers of trained tokens or of
micro-batches (a rank with fewer runs idle ones); and a whole run with two learner ranks loses no prompt and trains
no record twice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from resetrl.config import ConfigError, config_from_dict, load_config
from resetrl.launch.learner_group import LearnerGroup
from resetrl.learner.learner import Learner
from resetrl.queue import StreamQueue
from resetrl.record import ExperienceRecord, encode_experience
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys
from resetrl.weights import WEIGHTS_FILE

REPO = Path(__file__).resolve().parent.parent
VOCAB, PROMPT_LEN = 300, 4


def make_config(run_name: str, world_size: int, tmp_path, checkpoint_every: int = 0, zero_stage: int = 2):
    return config_from_dict({
        "run_name": run_name, "run_dir": str(tmp_path / run_name),
        "rollout": {"group_size": 2, "max_new_tokens": 16},
        # 4 records a step, in micro-batches of at most 16 tokens: a row of a 4-token prompt and a 12-token response
        # fills one, so ranks hold several micro-batches, and (step 3) unequal numbers of them.
        "learner": {"prompts_per_step": 2, "max_tokens_per_micro_batch": 16, "lr": 1e-3, "read_block_ms": 100,
                    "max_staleness": 1, "zero_stage": zero_stage, "cpus": 1, "world_size": world_size,
                    "checkpoint_every": checkpoint_every},
    })


def record(i: int, response_len: int, advantage: float, step: int, supervised: bool = False,
           prompt: int | None = None) -> ExperienceRecord:
    prompt = i // 2 if prompt is None else prompt
    rng = np.random.default_rng(step * 100 + i)
    ids = rng.integers(1, VOCAB, size=PROMPT_LEN + response_len).astype(np.int32)
    ids[:PROMPT_LEN] = np.random.default_rng(step * 100 + 50 + prompt).integers(1, VOCAB, size=PROMPT_LEN)
    response = np.arange(len(ids)) >= PROMPT_LEN
    return ExperienceRecord(
        record_id=f"s{step}-r{i}", prompt_id=f"s{step}-p{prompt}", group_id=f"s{step}-g{prompt}", method="grpo",
        policy_version=step, token_ids=ids, prompt_length=PROMPT_LEN, loss_mask=response.astype(np.uint8),
        advantages=np.where(response, advantage, 0.0).astype(np.float32),
        behaviour_logprobs=np.where(response, -5.7, 0.0).astype(np.float32), reward=float(advantage > 0),
        temperature=1.0, target_token_ids=ids[PROMPT_LEN:].copy() if supervised else None,
    )


# A prompt's records go to one rank, the longest prompt first (learner/packing.py): in step 1 one rank gets 8
# trained tokens, the other 20, so a per-rank token mean would weigh the first rank's tokens 2.5x too much. Step 2
# adds a supervised record to one rank only. Step 3: one prompt of 3 records (3 micro-batches on its rank) and one
# of 1 (1 micro-batch, then 2 idle ones), against 4 micro-batches on one rank.
STEPS = [
    [record(0, 3, 1.0, 0), record(1, 5, -1.0, 0), record(2, 8, 0.5, 0), record(3, 12, -0.5, 0)],
    [record(0, 12, -1.0, 1), record(1, 2, 1.0, 1), record(2, 6, 1.0, 1, supervised=True), record(3, 9, -1.0, 1)],
    [record(0, 10, 1.0, 2, prompt=0), record(1, 10, -1.0, 2, prompt=0), record(2, 10, 0.5, 2, prompt=0),
     record(3, 10, -0.5, 2, prompt=1)],
]
MICRO_BATCHES = [(3, 2), (3, 2), (4, 3)]  # per step: (one rank, rank 0 of two; rank 1 has 1, then idle ones)


def push(client, run_name: str, records: list[ExperienceRecord]) -> None:
    queue = StreamQueue(client, RunKeys(run_name).experience, EXPERIENCE_GROUP, "test-producer")
    queue.put_many([encode_experience(r) for r in records])


@pytest.fixture()
def local_ray():
    # A cluster of this test's own (2 CPUs: one per learner rank); other local clusters are left alone.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


def test_records_per_step_need_not_split_into_micro_batches_or_ranks(tmp_path):
    # micro-batches are packed by tokens and ranks take whole prompts (learner/packing.py): any numbers go
    cfg = load_config(None, ["rollout.group_size=2", "learner.prompts_per_step=2", "learner.micro_batch_size=3",
                             "learner.world_size=4"])
    assert cfg.records_per_step == 4 and cfg.learner.world_size == 4
    with pytest.raises(ConfigError, match="learner.max_tokens_per_micro_batch"):
        load_config(None, ["learner.max_tokens_per_micro_batch=0"])
    assert make_config("ok", 2, tmp_path).learner.world_size == 2


# ZeRO-3 gathers parameters in every forward: a rank's idle micro-batches must keep it in step with the other's.
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_take_the_step_one_rank_takes(local_ray, redis_server, redis_client, tiny_model_dir, tmp_path,
                                                zero_stage):
    one = Learner(make_config("one", 1, tmp_path, zero_stage=zero_stage), str(tiny_model_dir), redis_server.url,
                  weights_root=str(tmp_path / "w1"))
    group = LearnerGroup(make_config("two", 2, tmp_path, zero_stage=zero_stage), str(tiny_model_dir),
                         redis_server.url, str(tmp_path / "w2"))
    try:
        for step, records in enumerate(STEPS, start=1):
            push(redis_client, "one", records)
            push(redis_client, "two", records)
            single = one.train_step(timeout_s=60)
            pair = ray.get(group.train_step.remote(timeout_s=120))
            assert single["step"] == pair["step"] == step and not pair["skipped"]
            assert pair["samples_trained"] == 4 and pair["loss_tokens"] == single["loss_tokens"]
            assert (single["micro_batches"], pair["micro_batches"]) == MICRO_BATCHES[step - 1]
            for name in ("loss", "pg_loss", "sft_loss", "clip_fraction", "ratio_mean", "approx_kl", "grad_norm"):
                assert pair[name] == pytest.approx(single[name], rel=1e-5, abs=1e-7), name
            assert pair["reward_mean"] == single["reward_mean"]
        assert ray.get(group.policy_version.remote()) == 3
        # Rank 0 alone read and acknowledged: nothing left in the stream, nothing pending.
        queue = StreamQueue(redis_client, RunKeys("two").experience, EXPERIENCE_GROUP, "x")
        assert queue.depth() == 0 and queue.pending_count() == 0

        accounting = ray.get(group.accounting.remote())
        assert accounting["records_trained"] == 12 and accounting["duplicates_trained"] == 0

        published = load_file(f"{_latest(redis_client, 'two')}/{WEIGHTS_FILE}")
        # what the single rank published (its module's own tensors are partitioned away under ZeRO-3)
        expected = load_file(f"{_latest(redis_client, 'one')}/{WEIGHTS_FILE}")
        initial = load_file(str(tiny_model_dir / "model.safetensors"))
        assert set(published) == set(expected)
        for name, tensor in published.items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)
        assert any(not torch.equal(published[name], initial[name]) for name in published)
    finally:
        group.kill()
        one.close()


def test_two_ranks_resume_from_their_checkpoint(local_ray, redis_server, redis_client, tiny_model_dir, tmp_path):
    """Two ranks checkpoint step 1 and are killed; two new ranks resume (ZeRO partitions, optimizer moments) and take
    step 2 exactly as one uninterrupted rank does."""
    one = Learner(make_config("one", 1, tmp_path), str(tiny_model_dir), redis_server.url,
                  weights_root=str(tmp_path / "w1"))
    cfg = make_config("two", 2, tmp_path, checkpoint_every=1)
    first = LearnerGroup(cfg, str(tiny_model_dir), redis_server.url, str(tmp_path / "w2"))
    try:
        for records in STEPS[:2]:
            push(redis_client, "one", records)
            one.train_step(timeout_s=60)
        push(redis_client, "two", STEPS[0])
        assert ray.get(first.train_step.remote(timeout_s=120))["step"] == 1
        assert (tmp_path / "two" / "checkpoints" / "step-00000001" / "rng-rank1.json").is_file()
    finally:
        first.kill()
    push(redis_client, "two", STEPS[1])
    resumed = LearnerGroup(cfg, str(tiny_model_dir), redis_server.url, str(tmp_path / "w3"), resume=True)
    try:
        assert ray.get(resumed.policy_version.remote()) == 1
        assert ray.get(resumed.train_step.remote(timeout_s=120))["step"] == 2
        published = load_file(f"{_latest(redis_client, 'two')}/{WEIGHTS_FILE}")
        expected = one.engine.module.state_dict()
        for name, tensor in published.items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)
    finally:
        resumed.kill()
        one.close()


def _latest(client, run_name: str) -> str:
    return client.hget(RunKeys(run_name).weights, "path").decode()


@pytest.mark.slow
def test_a_run_with_two_learner_ranks_loses_nothing(tmp_path):
    from resetrl.launch.driver import train

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", "rollout.engine=hf", "total_steps=2", "learner.world_size=2",
        "learner.cpus=0.5", "ray.include_dashboard=false", "tensorboard=false",
    ])
    started = time.monotonic()
    summary = train(cfg, summary_path=tmp_path / "summary.json")
    print(f"two-rank tiny run: {time.monotonic() - started:.0f} s")
    assert summary["steps"] == 2 and summary["policy_version"] == 2
    assert summary["prompts_lost"] == 0 and summary["duplicates_trained"] == 0
    assert summary["samples_trained"] >= 2 * 8  # 2 steps x 2 prompts x group of 4
    assert summary["samples_generated"] == (summary["samples_trained"] + summary["queue_dropped_stale"]
                                            + summary["samples_left_in_queue"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["learner_pid"] > 0
