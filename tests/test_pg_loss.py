"""The unclipped policy gradient (RRPO/SRPO's default in the reference code), by hand."""

from __future__ import annotations

import math

import pytest
import torch

from resetrl.algorithms.losses import POLICY_LOSSES, pg_loss, ppo_clip_loss


def approx(values, abs=1e-5):
    return pytest.approx(values, abs=abs)


def test_on_policy_loss_is_minus_the_mean_advantage_over_trained_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0, -0.5]])
    mask = torch.tensor([[0, 1, 1, 1]])
    loss, stats = pg_loss(logprobs, logprobs.clone(), advantages, mask)
    # ratio 1 everywhere; trained tokens 1..3: (-1 - 1 + 0.5) / 3
    assert float(loss) == approx(-0.5)
    assert stats == approx({"clip_fraction": 0.0, "dual_clip_fraction": 0.0, "ratio_mean": 1.0, "ratio_max": 1.0,
                            "approx_kl": 0.0})


def test_gradient_at_ratio_one_is_the_reinforce_gradient():
    behaviour = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0, -0.5]])
    mask = torch.tensor([[0, 1, 1, 1]])
    logprobs = behaviour.clone().requires_grad_(True)
    loss, _ = pg_loss(logprobs, behaviour, advantages, mask)
    loss.backward()
    # d/dlogp of -A * exp(logp - b) / 3 at logp = b: -A / 3 on trained tokens
    assert logprobs.grad[0].tolist() == approx([0.0, -1 / 3, -1 / 3, 0.5 / 3])

    reinforce_logprobs = behaviour.clone().requires_grad_(True)
    (-(advantages * reinforce_logprobs * mask).sum() / mask.sum()).backward()
    assert torch.allclose(logprobs.grad, reinforce_logprobs.grad)


def test_off_policy_ratios_are_not_clipped():
    behaviour = torch.tensor([[-1.0, -1.0]])
    logprobs = behaviour + torch.tensor([[math.log(2.0), math.log(0.5)]])  # ratios 2 and 0.5
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.tensor([[1, 1]])
    loss, stats = pg_loss(logprobs, behaviour, advantages, mask)
    # per token -A * ratio: -2 and +0.5 -> mean -0.75
    assert float(loss) == approx(-0.75)
    # k3: (2 - 1 - ln 2) + (0.5 - 1 + ln 2) = 0.5 over 2 tokens
    assert stats == approx({"clip_fraction": 0.0, "dual_clip_fraction": 0.0, "ratio_mean": 1.25, "ratio_max": 2.0,
                            "approx_kl": 0.25})
    # PPO clip on the same tokens: max(-2, -1.2) = -1.2 and max(0.5, 0.8) = 0.8 -> mean -0.2
    clipped, clipped_stats = ppo_clip_loss(logprobs, behaviour, advantages, mask)
    assert float(clipped) == approx(-0.2)
    assert set(stats) == set(clipped_stats)


def test_seq_mean_token_sum_aggregation():
    logprobs = torch.zeros(2, 4)
    advantages = torch.tensor([[1.0] * 4, [-0.5] * 4])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    loss, _ = pg_loss(logprobs, logprobs, advantages, mask, aggregation="seq_mean_token_sum", norm_length=4)
    # row sums -2 and +1.5, each / 4 -> -0.5 and 0.375; mean -0.0625
    assert float(loss) == approx(-0.0625)


def test_registered_as_pg_and_ignores_clip_arguments():
    assert POLICY_LOSSES["pg"] is pg_loss
    behaviour = torch.tensor([[-1.0, -1.0]])
    logprobs = behaviour + torch.tensor([[math.log(2.0), math.log(0.5)]])
    args = (logprobs, behaviour, torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 1]]))
    plain, _ = pg_loss(*args)
    with_clip_args, _ = POLICY_LOSSES["pg"](*args, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0)
    assert float(with_clip_args) == float(plain)


def test_masked_positions_cannot_leak_nan_and_an_empty_mask_gives_zero():
    logprobs = torch.tensor([[float("nan"), -1.0]])
    loss, stats = pg_loss(logprobs, torch.tensor([[-1.0, -1.0]]), torch.tensor([[5.0, 2.0]]), torch.tensor([[0, 1]]))
    assert float(loss) == approx(-2.0)
    assert stats["ratio_max"] == approx(1.0)
    loss, stats = pg_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 3))
    assert float(loss) == 0.0
    assert stats["ratio_max"] == 0.0 and stats["ratio_mean"] == 0.0


# ---------------------------------------------------------------- seq_mean_token_mean: the reference's default loss


def _reference_srpo_loss(logprobs, advantages_per_sequence, response_mask, suffix_start):
    """The RRPO/SRPO reference code's default loss, written out: -mean_i[A_i * mean_{t in suffix_i} log pi(y_t)],
    suffix_i = response tokens at or after suffix_start[i]; no ratio, no behaviour log-probs."""
    suffix_mask = response_mask.clone()
    for i, start in enumerate(suffix_start):
        suffix_mask[i, :start] = 0
    suffix_mean = (logprobs * suffix_mask).sum(-1) / suffix_mask.sum(-1).clamp(min=1)
    return -(advantages_per_sequence * suffix_mean).mean()


def test_seq_mean_token_mean_on_policy_has_the_reference_gradient():
    # Row 0 a G1 sample trained on all 4 tokens (A = 1.5); row 1 a G2 continuation whose first 2 response tokens
    # are the kept prefix (A = -0.5); row 2 a G2 continuation with a 3-token prefix (A = 2).
    behaviour = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.7, -1.1, -0.4], [-0.3, -0.9, -2.2, -0.6]])
    per_sequence = torch.tensor([1.5, -0.5, 2.0])
    response_mask = torch.ones(3, 4)
    suffix_start = [0, 2, 3]
    loss_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    advantages = per_sequence[:, None] * loss_mask

    ours_logprobs = behaviour.clone().requires_grad_(True)
    loss, _ = pg_loss(ours_logprobs, behaviour, advantages, loss_mask, aggregation="seq_mean_token_mean")
    loss.backward()
    reference_logprobs = behaviour.clone().requires_grad_(True)
    _reference_srpo_loss(reference_logprobs, per_sequence, response_mask, suffix_start).backward()

    # d/dlogp_t = -A_i / (3 |suffix_i|) on suffix tokens: -1.5/12 = -0.125; 0.5/6 = 0.0833333; -2/3 = -0.6666667
    assert ours_logprobs.grad.flatten().tolist() == approx(
        [-0.125] * 4 + [0.0, 0.0, 1 / 12, 1 / 12] + [0.0, 0.0, 0.0, -2 / 3]
    )
    assert torch.allclose(ours_logprobs.grad, reference_logprobs.grad)
    # the values differ: ours at ratio 1 is -mean_i A_i = -(1.5 - 0.5 + 2) / 3 = -1
    assert loss.item() == approx(-1.0)


def test_seq_mean_token_mean_off_policy_by_hand():
    # row 0: ratios 2 and 0.5 (A = 1) -> -(2 + 0.5) / 2 = -1.25; row 1: ratio 1.5 on its one trained token (A = -2)
    # -> +3; row 2: nothing trained, left out of the mean. Loss (-1.25 + 3) / 2 = 0.875.
    behaviour = torch.full((3, 2), -1.0)
    logprobs = behaviour + torch.tensor([[math.log(2.0), math.log(0.5)], [0.0, math.log(1.5)], [5.0, 5.0]])
    advantages = torch.tensor([[1.0, 1.0], [-2.0, -2.0], [3.0, 3.0]])
    mask = torch.tensor([[1, 1], [0, 1], [0, 0]])
    loss, stats = pg_loss(logprobs, behaviour, advantages, mask, aggregation="seq_mean_token_mean")
    assert float(loss) == approx(0.875)
    assert stats["ratio_max"] == approx(2.0)  # the untrained row's ratio e^5 is not counted
