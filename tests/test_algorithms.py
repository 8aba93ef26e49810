"""Advantage estimators and policy losses, checked against numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resetrl.algorithms.advantages import ADVANTAGE_ESTIMATORS, grpo_advantages
from resetrl.algorithms.losses import (
    POLICY_LOSSES,
    aggregate,
    aggregation_count,
    k3_kl,
    pg_loss,
    ppo_clip_loss,
    token_logprobs,
)
from resetrl.registry import Registry, RegistryError
from resetrl.learner.batching import collate, micro_batches
from resetrl.record import ExperienceRecord


def approx(values, abs=1e-5):
    return pytest.approx(values, abs=abs)


# ---------------------------------------------------------------- advantages


def test_grpo_is_a_z_score_with_the_unbiased_std():
    # mean 0.25; deviations 0.75, -0.25 x3; unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5
    advantages = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert advantages.tolist() == approx([1.5, -0.5, -0.5, -0.5])


def test_grpo_two_samples():
    # mean 1, deviations +-1, unbiased std sqrt(2)
    assert grpo_advantages(torch.tensor([2.0, 0.0])).tolist() == approx([1 / math.sqrt(2), -1 / math.sqrt(2)])


@pytest.mark.parametrize("rewards", [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0], [0.3, 0.3, 0.3], [0.7]])
def test_a_group_with_equal_rewards_has_zero_advantage(rewards):
    for std_normalize in (True, False):
        advantages = grpo_advantages(torch.tensor(rewards), std_normalize=std_normalize)
        assert advantages.tolist() == [0.0] * len(rewards)


def test_dr_grpo_only_subtracts_the_mean():
    assert grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), std_normalize=False).tolist() == approx(
        [0.75, -0.25, -0.25, -0.25]
    )
    # the registered estimators are batched: rewards [N] and a group id per reward
    assert ADVANTAGE_ESTIMATORS["group_centered"](torch.tensor([2.0, 0.0]), [0, 0]).tolist() == approx([1.0, -1.0])
    assert ADVANTAGE_ESTIMATORS["group_zscore"](torch.tensor([2.0, 0.0]), ["a", "a"]).tolist() == approx(
        [1 / math.sqrt(2), -1 / math.sqrt(2)]
    )


def test_estimators_and_losses_are_chosen_through_registries():
    assert isinstance(ADVANTAGE_ESTIMATORS, Registry) and isinstance(POLICY_LOSSES, Registry)
    assert ADVANTAGE_ESTIMATORS.names() == ["group_centered", "group_zscore"]
    assert POLICY_LOSSES.names() == ["pg", "ppo_clip"]
    assert POLICY_LOSSES["pg"] is pg_loss and POLICY_LOSSES.get("ppo_clip") is ppo_clip_loss
    message = r"unknown policy loss 'ppo_clp' \(algorithm.policy_loss\); did you mean 'ppo_clip'"
    with pytest.raises(RegistryError, match=message):
        POLICY_LOSSES["ppo_clp"]
    with pytest.raises(RegistryError, match="unknown advantage estimator 'rloo'"):
        ADVANTAGE_ESTIMATORS["rloo"]


def test_grpo_rejects_a_batch_of_groups():
    with pytest.raises(ValueError, match="one group"):
        grpo_advantages(torch.zeros(2, 3))


# ---------------------------------------------------------------- token log-probs


def test_token_logprobs_score_the_next_token_at_the_temperature():
    # vocab 2; position 0 logits [0, ln 3] -> p = [1/4, 3/4]; position 1 logits [0, 0] -> p = [1/2, 1/2];
    # the last position predicts past the sequence and is not used (garbage logits).
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [100.0, -100.0]]])
    ids = torch.tensor([[0, 1, 0]])
    assert token_logprobs(logits, ids)[0].tolist() == approx([math.log(0.75), math.log(0.5)])
    # T = 2: position 0 logits [0, ln 3 / 2] -> p(1) = sqrt(3) / (1 + sqrt(3)) = 0.6339746
    out = token_logprobs(logits, ids, temperature=torch.tensor([2.0]))
    assert out[0].tolist() == approx([math.log(0.6339746), math.log(0.5)])
    assert token_logprobs(logits, ids, temperature=2.0).tolist() == out.tolist()


# ---------------------------------------------------------------- PPO clip


def _ppo(ratios, advantages, mask=None, **kwargs):
    logprobs = torch.tensor([ratios]).log().requires_grad_()
    mask = torch.ones_like(logprobs) if mask is None else torch.tensor([mask], dtype=torch.float32)
    loss, stats = ppo_clip_loss(logprobs, torch.zeros_like(logprobs), torch.tensor([advantages]), mask, **kwargs)
    loss.backward()
    return loss.item(), stats, logprobs.grad[0].tolist()


def test_ppo_clip_on_hand_computed_tokens():
    # eps 0.2; per token l = max(-A rho, -A clip(rho, 0.8, 1.2)):
    #   A=+1 rho=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)     A=+1 rho=0.5 -> max(-0.5, -0.8) = -0.5
    #   A=-1 rho=1.5 -> max( 1.5,  1.2) =  1.5               A=-1 rho=0.5 -> max( 0.5,  0.8) =  0.8 (clipped)
    #   A=+2 rho=1.0 -> -2
    # token mean = (-1.2 - 0.5 + 1.5 + 0.8 - 2) / 5 = -0.28; clip fraction 2/5; mean ratio 1.0
    loss, stats, grad = _ppo([1.5, 0.5, 1.5, 0.5, 1.0], [1.0, 1.0, -1.0, -1.0, 2.0])
    assert loss == approx(-0.28)
    assert stats["clip_fraction"] == approx(0.4)
    assert stats["ratio_mean"] == approx(1.0)
    assert stats["ratio_max"] == approx(1.5)
    # d l / d logp = -A rho / 5 where unclipped, 0 where clipped
    assert grad == approx([0.0, -0.1, 0.3, 0.0, -0.4])


def test_clip_higher_lets_positive_tokens_rise_further():
    # A=+1: rho 1.25 is clipped at 1.2 with eps_high 0.2, not with eps_high 0.28; rho 1.3 is clipped at 1.28
    loss, stats, _ = _ppo([1.25, 1.3], [1.0, 1.0])
    assert loss == approx((-1.2 - 1.2) / 2) and stats["clip_fraction"] == approx(1.0)
    loss, stats, _ = _ppo([1.25, 1.3], [1.0, 1.0], clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss == approx((-1.25 - 1.28) / 2) and stats["clip_fraction"] == approx(0.5)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    # c = 3: A=-1 rho=5 -> standard max(5, 1.2) = 5, capped at -c A = 3; A=-1 rho=2 -> 2 (under the cap);
    # A=+1 rho=5 -> max(-5, -1.2) = -1.2 (dual clip only touches A < 0). Mean (3 + 2 - 1.2) / 3.
    loss, stats, grad = _ppo([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0], dual_clip=3.0)
    assert loss == approx((3.0 + 2.0 - 1.2) / 3)
    assert stats["dual_clip_fraction"] == approx(1 / 3)
    assert grad == approx([0.0, 2.0 / 3, 0.0])  # the capped token gets no gradient
    loss, _, _ = _ppo([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0])
    assert loss == approx((5.0 + 2.0 - 1.2) / 3)


def test_masked_tokens_count_nowhere_even_when_not_finite():
    # the third token is masked out and its behaviour log-prob is NaN: it must not reach loss, stats or gradient
    logprobs = torch.tensor([[math.log(1.5), 0.0, 0.0]], requires_grad=True)
    behaviour = torch.tensor([[0.0, 0.0, float("nan")]])
    loss, stats = ppo_clip_loss(logprobs, behaviour, torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    loss.backward()
    assert loss.item() == approx((-1.2 - 2.0) / 2)
    assert stats["ratio_mean"] == approx(1.25)
    assert logprobs.grad[0].tolist() == approx([0.0, -1.0, 0.0])


def test_zero_advantages_give_zero_loss():
    loss, stats, grad = _ppo([1.7, 0.3, 1.0], [0.0, 0.0, 0.0])
    assert loss == 0.0 and grad == [0.0, 0.0, 0.0]


def test_aggregations():
    # per-token losses [[1, 2, 3], [4, 5, 6]], masks [[1, 1, 0], [1, 0, 0]]:
    # token_mean = (1 + 2 + 4) / 3; seq_mean_token_sum with norm 4 = mean(3 / 4, 4 / 4) = 0.875;
    # seq_mean_token_mean = mean((1 + 2) / 2, 4 / 1) = 2.75
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(values, mask, "token_mean").item() == approx(7 / 3)
    assert aggregate(values, mask, "seq_mean_token_sum", norm_length=4).item() == approx(0.875)
    assert aggregate(values, mask, "seq_mean_token_mean").item() == approx(2.75)
    # through the PPO loss: at ratio 1 the per-token loss is -A
    loss, _ = ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), -values, mask, aggregation="seq_mean_token_sum",
                            norm_length=4)
    assert loss.item() == approx(0.875)
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(values, mask, "seq_mean_token_sum")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(values, mask, "sum")
    assert POLICY_LOSSES["ppo_clip"] is ppo_clip_loss


def test_seq_mean_token_mean_skips_sequences_without_trained_tokens():
    # rows: [1, 2] both trained -> 1.5; [7, 9] none trained (and a NaN there must not leak); [3, 5] one trained -> 5.
    # mean over the 2 rows with trained tokens: (1.5 + 5) / 2 = 3.25 (not / 3)
    values = torch.tensor([[1.0, 2.0], [7.0, float("nan")], [3.0, 5.0]])
    mask = torch.tensor([[1, 1], [0, 0], [0, 1]])
    assert aggregate(values, mask, "seq_mean_token_mean").item() == approx(3.25)
    assert aggregate(values, torch.zeros(3, 2), "seq_mean_token_mean").item() == 0.0
    # the counts the aggregations divide by: 3 tokens, 3 rows, 2 rows with a trained token
    counts = [aggregation_count(mask, a) for a in ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")]
    assert counts == [3, 3, 2]
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregation_count(mask, "sum")


def test_micro_batches_weighted_by_aggregation_count_give_the_batch_aggregate():
    # the batch of the test above split into micro-batches {row 0, row 1} and {row 2}:
    # 1.5 * 1/2 + 5 * 1/2 = 3.25, the whole batch's seq_mean_token_mean
    values = torch.tensor([[1.0, 2.0], [7.0, 8.0], [3.0, 5.0]])
    mask = torch.tensor([[1, 1], [0, 0], [0, 1]])
    total = aggregation_count(mask, "seq_mean_token_mean")
    parts = [(values[:2], mask[:2]), (values[2:], mask[2:])]
    combined = sum(aggregate(v, m, "seq_mean_token_mean") * aggregation_count(m, "seq_mean_token_mean") / total
                   for v, m in parts)
    assert combined.item() == approx(aggregate(values, mask, "seq_mean_token_mean").item())


# ---------------------------------------------------------------- KL


def test_k3_kl_on_hand_computed_tokens():
    # logp = ln 0.5, ref = ln 0.25: 0.5 - ln 0.5 - 1 = 0.1931472
    # logp = ln 0.25, ref = ln 0.5:   2 - ln 2   - 1 = 0.3068528;   mean 0.25;   equal log-probs: 0
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), -1.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -1.0]])
    assert k3_kl(logprobs[:, :1], ref[:, :1], torch.ones(1, 1)).item() == approx(0.1931472)
    assert k3_kl(logprobs, ref, torch.tensor([[1.0, 1.0, 0.0]])).item() == approx(0.25)
    assert k3_kl(logprobs, ref, torch.tensor([[0.0, 0.0, 1.0]])).item() == 0.0


# ---------------------------------------------------------------- batching


def _record(token_ids, prompt_length, loss_mask, advantages, behaviour, temperature=1.0):
    return ExperienceRecord(
        record_id=f"r{token_ids[0]}", prompt_id="p", group_id="g", method="grpo", policy_version=0,
        token_ids=np.array(token_ids, dtype=np.int32), prompt_length=prompt_length,
        loss_mask=np.array(loss_mask, dtype=np.uint8), advantages=np.array(advantages, dtype=np.float32),
        behaviour_logprobs=np.array(behaviour, dtype=np.float32), reward=1.0, temperature=temperature,
    )


def test_collate_pads_right_and_shifts_per_token_values_to_next_token_positions():
    a = _record([5, 6, 7, 8], 2, [0, 0, 1, 1], [0, 0, 0.5, 0.5], [0, 0, -1, -2])
    # b has a NaN behaviour log-prob on its (untrained) prompt token: it must become 0
    b = _record([9, 10, 11], 1, [0, 1, 1], [0, -1, -1], [float("nan"), -3, -4], temperature=0.7)
    batch = collate([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # position t describes token t+1: a trains tokens 2, 3 -> positions 1, 2; b trains tokens 1, 2 -> positions 0, 1
    assert batch.loss_mask.tolist() == [[0, 1, 1], [1, 1, 0]]
    assert batch.advantages.tolist() == [[0, 0.5, 0.5], [-1, -1, 0]]
    assert batch.behaviour_logprobs.tolist() == [[0, -1, -2], [-3, -4, 0]]
    assert batch.temperatures.tolist() == approx([1.0, 0.7])
    assert batch.num_loss_tokens == 4 and batch.num_sequences == 2


def test_collated_positions_line_up_with_token_logprobs():
    # logits that put all mass on the true next token give log-prob 0 exactly where the loss mask is set
    a = _record([3, 1, 4, 1, 5], 2, [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0])
    batch = collate([a])
    logits = torch.full((1, 5, 8), -1e4)
    for t in range(4):
        logits[0, t, batch.input_ids[0, t + 1]] = 0.0
    logprobs = token_logprobs(logits, batch.input_ids)
    assert logprobs.shape == batch.loss_mask.shape == (1, 4)
    assert logprobs[batch.loss_mask > 0].tolist() == approx([0.0, 0.0, 0.0])


def test_micro_batches_group_similar_lengths():
    records = [_record([i] * n, 1, [0] + [1] * (n - 1), [0.0] * n, [0.0] * n) for i, n in enumerate([6, 2, 5, 3])]
    batches = micro_batches(records, micro_batch_size=2)
    assert [b.input_ids.shape for b in batches] == [(2, 3), (2, 6)]
    assert batches[0].input_ids[:, 0].tolist() == [1, 3]  # the records of length 2 and 3
    assert sum(b.num_loss_tokens for b in batches) == 1 + 2 + 4 + 5
