"""Rollout correction (algorithm.is_correction, learner.recompute_old_logprobs): the TIS/MIS weights on hand-computed
numbers, how the objective applies them, and a real learner step (redis-server, DeepSpeed on CPU, a tiny random
Llama) in each mode with its metrics checked against an independent forward of the same model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resetrl.algorithms.correction import IS_CORRECTIONS, rollout_correction
from resetrl.algorithms.losses import POLICY_LOSSES, token_logprobs
from resetrl.algorithms.objective import LossSettings, Shares, micro_batch_loss
from resetrl.registry import RegistryError

LOG = math.log
# One sequence, four positions: three trained tokens with ratios pi_learner / pi_rollout = 0.5, 1.5, 4.0, and an
# untrained position whose rollout log-prob is NaN (it must not reach any weight or statistic).
LEARNER = torch.tensor([[LOG(0.2), LOG(0.3), LOG(0.4), LOG(0.9)]])
ROLLOUT = torch.tensor([[LOG(0.4), LOG(0.2), LOG(0.1), float("nan")]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
MISMATCH_MEAN = (LOG(2) + LOG(1.5) + LOG(4)) / 3  # |log 0.5|, |log 1.5|, |log 4|


def test_token_tis_truncates_each_ratio_at_the_cap():
    out = rollout_correction(LEARNER, ROLLOUT, MASK, "tis", "token", cap=2.0)
    assert out.weights.flatten().tolist() == pytest.approx([0.5, 1.5, 2.0, 1.0])
    assert out.stats == pytest.approx({
        "logp_mismatch_mean": MISMATCH_MEAN, "logp_mismatch_max": LOG(4),
        "is_weight_mean": (0.5 + 1.5 + 2.0) / 3, "is_truncated_fraction": 1 / 3, "is_masked_fraction": 0.0,
    })


def test_token_mis_drops_the_tokens_above_the_cap_and_keeps_the_ratio_of_the_others():
    out = rollout_correction(LEARNER, ROLLOUT, MASK, "mis", "token", cap=2.0)
    assert out.weights.flatten().tolist() == pytest.approx([0.5, 1.5, 0.0, 1.0])
    assert out.stats["is_weight_mean"] == pytest.approx((0.5 + 1.5) / 3)
    assert out.stats["is_masked_fraction"] == pytest.approx(1 / 3) and out.stats["is_truncated_fraction"] == 0.0


def test_none_weighs_every_token_one_but_still_measures_the_mismatch():
    out = rollout_correction(LEARNER, ROLLOUT, MASK, "none")
    assert out.weights.flatten().tolist() == [1.0, 1.0, 1.0, 1.0]
    assert out.stats == pytest.approx({
        "logp_mismatch_mean": MISMATCH_MEAN, "logp_mismatch_max": LOG(4),
        "is_weight_mean": 1.0, "is_truncated_fraction": 0.0, "is_masked_fraction": 0.0,
    })


def test_sequence_level_uses_the_product_over_trained_tokens():
    # sequence 0: ratios 0.5 x 1.5 = 0.75 (its untrained last position has ratio 100: left out of the product);
    # sequence 1: ratios 2 x 1.5 = 3 > cap 2.
    learner = torch.tensor([[LOG(0.2), LOG(0.3), LOG(1.0)], [LOG(0.4), LOG(0.3), LOG(0.5)]])
    rollout = torch.tensor([[LOG(0.4), LOG(0.2), LOG(0.01)], [LOG(0.2), LOG(0.2), LOG(0.5)]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    tis = rollout_correction(learner, rollout, mask, "tis", "sequence", cap=2.0)
    assert tis.weights.flatten().tolist() == pytest.approx([0.75, 0.75, 1.0, 2.0, 2.0, 1.0])
    assert tis.stats["is_weight_mean"] == pytest.approx((0.75 * 2 + 2.0 * 2) / 4)
    assert tis.stats["is_truncated_fraction"] == pytest.approx(0.5)  # the two tokens of sequence 1, of four
    mis = rollout_correction(learner, rollout, mask, "mis", "sequence", cap=2.0)
    assert mis.weights.flatten().tolist() == pytest.approx([0.75, 0.75, 1.0, 0.0, 0.0, 1.0])
    assert mis.stats["is_masked_fraction"] == pytest.approx(0.5)
    assert mis.stats["logp_mismatch_max"] == pytest.approx(LOG(2))  # per token: the ratios 0.5 and 2


def test_a_long_sequence_product_cannot_overflow():
    learner = torch.full((1, 500), -1.0)
    rollout = torch.full((1, 500), -1.2)  # log-ratio sum 100: exp overflows float32
    mask = torch.ones(1, 500)
    assert rollout_correction(learner, rollout, mask, "tis", "sequence", 2.0).weights.max().item() == 2.0
    assert rollout_correction(learner, rollout, mask, "mis", "sequence", 2.0).weights.max().item() == 0.0


def test_weights_carry_no_gradient():
    learner = LEARNER.clone().requires_grad_(True)
    assert not rollout_correction(learner, ROLLOUT, MASK, "tis").weights.requires_grad


def test_bad_settings_say_what_to_use():
    with pytest.raises(RegistryError, match=r"algorithm\.is_correction.*did you mean 'tis'"):
        rollout_correction(LEARNER, ROLLOUT, MASK, "tiss")
    with pytest.raises(ValueError, match=r"algorithm\.is_level.*token, sequence"):
        rollout_correction(LEARNER, ROLLOUT, MASK, "tis", "group")
    with pytest.raises(ValueError, match=r"algorithm\.is_cap must be above 1"):
        rollout_correction(LEARNER, ROLLOUT, MASK, "tis", "token", cap=1.0)
    assert IS_CORRECTIONS.names() == ["mis", "none", "tis"]


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_every_policy_loss_is_positively_homogeneous_in_the_advantage_per_token(name):
    """The objective applies the weight as w * A: right only if l(w A) = w l(A) for w >= 0, token by token."""
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(2, 5, generator=generator) * 3
    behaviour = logprobs + torch.randn(2, 5, generator=generator) * 0.5  # ratios both sides of the clip range
    advantages = torch.randn(2, 5, generator=generator)
    for b in range(2):
        for t in range(5):
            only = torch.zeros(2, 5)
            only[b, t] = 1.0
            base, _ = POLICY_LOSSES[name](logprobs, behaviour, advantages, only, dual_clip=3.0)
            for w in (0.0, 0.5, 2.0):
                scaled, _ = POLICY_LOSSES[name](logprobs, behaviour, advantages * w, only, dual_clip=3.0)
                assert scaled.item() == pytest.approx(w * base.item(), abs=1e-6), (b, t, w)


SHARES = Shares(pg=1.0, pg_tokens=1.0, sft=0.0, micro_batches=1)


def _loss(settings, logprobs, old_logprobs=None, advantages=(1.0, 2.0, 1.0, 0.0)):
    return micro_batch_loss(settings, SHARES, logprobs, ROLLOUT.nan_to_num(0.0), torch.tensor([advantages]), MASK,
                            torch.zeros_like(MASK), old_logprobs=old_logprobs)


def test_tis_multiplies_each_tokens_policy_gradient_by_its_detached_weight():
    # pg loss, token mean, pi_old = this forward's own log-probs: ratio 1, loss -mean(w A), d loss / d logp = -w A / 3
    logprobs = LEARNER.clone().requires_grad_(True)
    loss, parts = _loss(LossSettings(policy_loss="pg", is_correction="tis"), logprobs)
    assert loss.item() == pytest.approx(-(0.5 * 1 + 1.5 * 2 + 2.0 * 1) / 3)
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.5 / 3, -3.0 / 3, -2.0 / 3, 0.0])
    assert parts["ratio_mean"] == pytest.approx(1.0)
    assert parts["is_weight_mean"] == pytest.approx(4 / 3) and parts["is_truncated_fraction"] == pytest.approx(1 / 3)
    assert parts["logp_mismatch_max"] == pytest.approx(LOG(4))


def test_mis_gives_a_masked_token_no_gradient():
    logprobs = LEARNER.clone().requires_grad_(True)
    loss, parts = _loss(LossSettings(policy_loss="ppo_clip", is_correction="mis"), logprobs)
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.5 / 3, -3.0 / 3, 0.0, 0.0])
    assert parts["is_masked_fraction"] == pytest.approx(1 / 3)


def test_without_a_correction_the_ratio_is_against_the_rollout_log_probs_as_before():
    logprobs = LEARNER.clone()
    loss, parts = _loss(LossSettings(policy_loss="pg"), logprobs)
    direct, _ = POLICY_LOSSES["pg"](logprobs, ROLLOUT.nan_to_num(0.0), torch.tensor([[1.0, 2.0, 1.0, 0.0]]), MASK)
    assert loss.item() == pytest.approx(direct.item())
    assert parts["ratio_mean"] == pytest.approx((0.5 + 1.5 + 4.0) / 3)
    assert parts["is_weight_mean"] == 1.0 and parts["logp_mismatch_mean"] == pytest.approx(MISMATCH_MEAN)


def test_a_recomputed_pi_old_is_the_ratio_denominator_and_the_weights_numerator():
    # pi_old differs from this forward by a factor 2 on every token: ratio 2, and weights from pi_old / pi_rollout
    logprobs = LEARNER.clone()
    old = LEARNER - LOG(2)  # ratios to the rollout: 0.25, 0.75, 2.0
    loss, parts = _loss(LossSettings(policy_loss="pg", is_correction="tis"), logprobs, old_logprobs=old)
    assert parts["ratio_mean"] == pytest.approx(2.0)
    assert parts["is_weight_mean"] == pytest.approx((0.25 + 0.75 + 2.0) / 3)
    assert loss.item() == pytest.approx(-(2.0 * (0.25 * 1 + 0.75 * 2 + 2.0 * 1)) / 3)
    _, plain = _loss(LossSettings(policy_loss="pg"), logprobs, old_logprobs=old)
    assert plain["ratio_mean"] == pytest.approx(2.0) and plain["is_weight_mean"] == 1.0


# ------------------------------------------------------------------ a real learner step


VOCAB, PROMPT_LEN, RESPONSE_LEN = 300, 4, 8
GAP = 1.3  # nats: a ratio of e^1.3 = 3.7, above the cap 2


def _records(model_dir):
    """Two GRPO groups of two records (32 response tokens). The rollout log-probs are the initial model's own,
    computed here, except on the 4 odd response tokens of each record of the second group, which are GAP lower:
    8 of 32 tokens have the ratio e^GAP, every other token ratio 1."""
    from transformers import AutoModelForCausalLM

    from resetrl.record import ExperienceRecord

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    length = PROMPT_LEN + RESPONSE_LEN
    response = np.arange(length) >= PROMPT_LEN
    records = []
    for i, advantage in enumerate((1.0, -1.0, 1.0, -1.0)):
        token_ids = np.random.default_rng(100 + i).integers(1, VOCAB, size=length)
        with torch.no_grad():
            ids = torch.tensor(token_ids[None])
            own = np.concatenate([[0.0], token_logprobs(model(input_ids=ids).logits, ids)[0].numpy()])
        gap = np.where((np.arange(length) % 2 == 1) & (i >= 2), GAP, 0.0)
        records.append(ExperienceRecord(
            record_id=f"rec-{i}", prompt_id=f"p{i // 2}", group_id=f"g{i // 2}", method="grpo", policy_version=0,
            token_ids=token_ids.astype(np.int32), prompt_length=PROMPT_LEN, loss_mask=response.astype(np.uint8),
            advantages=np.where(response, advantage, 0.0).astype(np.float32),
            behaviour_logprobs=np.where(response, own - gap, 0.0).astype(np.float32),
            reward=1.0 if advantage > 0 else 0.0, temperature=1.0,
        ))
    return records


# Hand-computed over the 32 trained tokens: 8 with ratio e^GAP (4 in each of the second group's two sequences),
# 24 with ratio 1. Per sequence: the first group's products are 1, the second group's e^(4 GAP) > 2.
EXPECTED = {
    ("none", "token"): {"is_weight_mean": 1.0, "is_truncated_fraction": 0.0, "is_masked_fraction": 0.0},
    ("tis", "token"): {"is_weight_mean": (24 * 1 + 8 * 2) / 32, "is_truncated_fraction": 8 / 32,
                       "is_masked_fraction": 0.0},
    ("tis", "sequence"): {"is_weight_mean": (16 * 1 + 16 * 2) / 32, "is_truncated_fraction": 16 / 32,
                          "is_masked_fraction": 0.0},
    ("mis", "token"): {"is_weight_mean": 24 / 32, "is_truncated_fraction": 0.0, "is_masked_fraction": 8 / 32},
    ("mis", "sequence"): {"is_weight_mean": 16 / 32, "is_truncated_fraction": 0.0, "is_masked_fraction": 16 / 32},
}


@pytest.mark.parametrize("mode, level, recompute", [
    ("none", "token", False), ("tis", "token", False), ("tis", "sequence", True), ("mis", "token", True),
    ("mis", "sequence", False),
])
def test_a_learner_step_reports_the_correction_metrics(redis_server, redis_client, tiny_model_dir, tmp_path,
                                                       mode, level, recompute):
    from resetrl.config import config_from_dict
    from resetrl.learner.learner import Learner
    from resetrl.queue import StreamQueue
    from resetrl.record import encode_experience
    from resetrl.run_state import EXPERIENCE_GROUP, RunKeys

    cfg = config_from_dict({
        "run_name": "corr",
        "rollout": {"group_size": 2, "max_new_tokens": RESPONSE_LEN},
        "algorithm": {"is_correction": mode, "is_level": level, "is_cap": 2.0},
        "learner": {"prompts_per_step": 2, "micro_batch_size": 2, "lr": 1e-3, "read_block_ms": 100,
                    "recompute_old_logprobs": recompute},
    })
    records = _records(tiny_model_dir)
    learner = Learner(cfg, str(tiny_model_dir), redis_server.url, weights_root=str(tmp_path / "weights"))
    try:
        queue = StreamQueue(redis_client, RunKeys("corr").experience, EXPERIENCE_GROUP, "test-producer")
        queue.put_many([encode_experience(r) for r in records])
        metrics = learner.train_step(timeout_s=60)
    finally:
        learner.close()
    assert not metrics["skipped"] and metrics["policy_version"] == 1 and metrics["grad_norm"] > 0
    expected = {"logp_mismatch_mean": 8 * GAP / 32, "logp_mismatch_max": GAP, **EXPECTED[(mode, level)]}
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-4), name
    # The PPO ratio: against the learner's own pi_old with a correction or a recompute (exactly 1 before the step),
    # else against the rollout's log-probs: 24 tokens of ratio 1 and 8 of e^GAP.
    if mode != "none" or recompute:
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    else:
        assert metrics["ratio_mean"] == pytest.approx((24 + 8 * math.exp(GAP)) / 32, abs=1e-4)
