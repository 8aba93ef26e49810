"""The learner's supervised path (SuperRL's SFT records, repaired trajectories) with real Redis and DeepSpeed.

Records that carry target_token_ids are trained with the token-mean NLL (no importance ratio) and mixed with the
policy-gradient records: loss = w_pg L_PG + w_sft L_SFT, with SuperRL's weights = fractions of prompts on each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resetrl.algorithms.losses import token_logprobs
from resetrl.config import config_from_dict
from resetrl.learner.learner import Learner
from resetrl.queue import StreamQueue
from resetrl.record import ExperienceRecord, encode_experience
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys, read_stats

VOCAB, PROMPT_LEN, RESPONSE_LEN = 300, 4, 8


@pytest.fixture()
def make_learner(redis_server, redis_client, tiny_model_dir, tmp_path):
    learners = []

    def build(algorithm: dict, lr: float = 1e-3):
        cfg = config_from_dict({
            "run_name": "sft", "rollout": {"group_size": 2, "max_new_tokens": RESPONSE_LEN},
            "learner": {"prompts_per_step": 2, "micro_batch_size": 2, "lr": lr, "read_block_ms": 100},
            "algorithm": algorithm,
        })
        learner = Learner(cfg, str(tiny_model_dir), redis_server.url, weights_root=str(tmp_path / "weights"))
        learners.append(learner)
        return learner

    yield build
    for learner in learners:
        learner.close()


def pg_record(i: int, prompt: str, advantage: float) -> ExperienceRecord:
    ids = np.random.default_rng(i).integers(1, VOCAB, size=PROMPT_LEN + RESPONSE_LEN).astype(np.int32)
    response = np.arange(len(ids)) >= PROMPT_LEN
    return ExperienceRecord(
        record_id=f"pg-{i}", prompt_id=prompt, group_id=prompt, method="superrl", policy_version=0, token_ids=ids,
        prompt_length=PROMPT_LEN, loss_mask=response.astype(np.uint8),
        advantages=np.where(response, advantage, 0).astype(np.float32),
        behaviour_logprobs=np.where(response, -5.7, 0).astype(np.float32), reward=1.0, temperature=1.0,
    )


def sft_record(i: int, prompt: str, mask=None) -> ExperienceRecord:
    ids = np.random.default_rng(100 + i).integers(1, VOCAB, size=PROMPT_LEN + RESPONSE_LEN).astype(np.int32)
    loss_mask = (np.arange(len(ids)) >= PROMPT_LEN).astype(np.uint8)
    if mask is not None:
        loss_mask[PROMPT_LEN:] = mask
    return ExperienceRecord(
        record_id=f"sft-{i}", prompt_id=prompt, group_id=f"{prompt}/sft", method="superrl-sft", policy_version=0,
        token_ids=ids, prompt_length=PROMPT_LEN, loss_mask=loss_mask, advantages=loss_mask.astype(np.float32),
        behaviour_logprobs=np.zeros(len(ids), np.float32), reward=0.0, temperature=1.0,
        target_token_ids=ids[PROMPT_LEN:].copy(),
    )


def push(client, records):
    StreamQueue(client, RunKeys("sft").experience, EXPERIENCE_GROUP, "producer").put_many(
        [encode_experience(r) for r in records])


def nll(model, records) -> float:
    """Token-mean NLL over the records' loss-masked tokens, computed by hand with the model."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            ids = torch.tensor(r.token_ids, dtype=torch.long)[None]
            logprobs = token_logprobs(model(input_ids=ids).logits, ids)[0]
            mask = torch.tensor(r.loss_mask[1:] > 0)
            total += float(-logprobs[mask].sum())
            count += int(mask.sum())
    return total / count


def test_superrl_step_mixes_pg_and_sft_by_the_fraction_of_prompts(make_learner, redis_client):
    learner = make_learner({"name": "superrl"})
    # p0 solved (c = 1): two PG records; p1 and p2 unsolved (c = 0): one SFT record each -> w = (1/3, 2/3).
    records = [pg_record(0, "p0", 1.0), pg_record(1, "p0", -1.0), sft_record(0, "p1"), sft_record(1, "p2")]
    expected_sft = nll(learner.engine.module, records[2:])
    push(redis_client, records)
    metrics = learner.train_step(timeout_s=60)
    assert metrics["pg_weight"] == pytest.approx(1 / 3) and metrics["sft_weight"] == pytest.approx(2 / 3)
    assert metrics["sft_loss"] == pytest.approx(expected_sft, rel=1e-4)
    assert metrics["loss"] == pytest.approx(metrics["pg_loss"] / 3 + 2 * metrics["sft_loss"] / 3, rel=1e-4)
    stats = read_stats(redis_client, RunKeys("sft"))
    assert stats["tokens_trained"] == 4 * RESPONSE_LEN
    assert stats["records_trained_suffix_only"] == 0


def test_sft_steps_lower_the_nll_of_the_expert_tokens_only_where_masked(make_learner, redis_client):
    learner = make_learner({"name": "superrl"}, lr=1e-2)
    gate = np.array([0, 0, 1, 1, 1, 0, 0, 0], dtype=np.uint8)  # like a repair's diff span
    records = [sft_record(i, f"p{i}", mask=gate) for i in range(4)]
    before = nll(learner.engine.module, records)
    for step in range(3):
        again = [ExperienceRecord(**{**r.__dict__, "record_id": f"{r.record_id}.{step}", "policy_version": step})
                 for r in records]
        push(redis_client, again)
        metrics = learner.train_step(timeout_s=60)
        assert metrics["sft_weight"] == 1.0 and metrics["pg_weight"] == 0.0
    assert nll(learner.engine.module, records) < before - 0.5
    assert read_stats(redis_client, RunKeys("sft"))["tokens_trained"] == 3 * 4 * 3  # 3 gated tokens per record


def test_uncertainty_weights_are_learned_beside_the_model(make_learner, redis_client):
    learner = make_learner({"name": "superrl", "superrl": {"weighting": "uncertainty", "uncertainty_lr": 0.1}})
    push(redis_client, [pg_record(0, "p0", 1.0), pg_record(1, "p0", -1.0), sft_record(0, "p1"), sft_record(1, "p2")])
    metrics = learner.train_step(timeout_s=60)
    assert metrics["pg_weight"] == 1.0 and metrics["sft_weight"] == 1.0  # exp(-2 * 0) before the first update
    # L_SFT (~5.7) is large: d/ds_sft = -2 L_SFT + 1 < 0, so Adam raises s_sft (down-weights the SFT term)
    assert metrics["log_sigma_sft"] == pytest.approx(0.1, rel=1e-3)
    assert metrics["loss"] == pytest.approx(metrics["pg_loss"] + metrics["sft_loss"], rel=1e-4)


def test_a_supervised_record_whose_target_is_not_its_response_is_rejected(make_learner, redis_client):
    learner = make_learner({"name": "superrl"})
    bad = sft_record(0, "p1")
    bad.target_token_ids = bad.target_token_ids[::-1].copy()
    push(redis_client, [bad])
    assert learner.train_step(timeout_s=1) is None
    assert read_stats(redis_client, RunKeys("sft"))["records_rejected"] == 1
