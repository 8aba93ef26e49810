"""The RRPO/SRPO rollout strategy on a real engine (HF, tiny_hf random Llama) and the real SmolLM2 tokenizer.

The verifier is a rule of the test's own (reward 1 when the response has an even number of tokens), so fresh
groups mix successes and failures and every branch of the strategy is taken. No Ray, no Redis: the strategy is
plain code between the engine and the records.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from resetrl.actors.engines import SamplingSettings
from resetrl.methods import get_method
from resetrl.actors.trajectories import RolloutContext
from resetrl.config import config_from_dict
from resetrl.data import render_prompt
from resetrl.record import PromptRecord

from conftest import CallCounter  # noqa: E402  (tests/conftest.py: the real engine, calls recorded)


def even_length_reward(text: str, prompt: PromptRecord) -> float:
    return float(len(text.split()) % 2 == 0)


def run_strategy(tiny_hf, method: str, num_prompts: int = 6):
    engine, tokenizer = tiny_hf
    cfg = config_from_dict({
        "algorithm": {"name": method, "reset": {"step_delimiter": " ", "localisation_max_tokens": 16}},
        "rollout": {"max_new_tokens": 12},
    })
    counter = CallCounter(engine)
    ctx = RolloutContext(cfg, counter, tokenizer, even_length_reward,
                         SamplingSettings(max_new_tokens=12, temperature=1.0), policy_version=7, rng=random.Random(0))
    prompts = [PromptRecord(f"p{i}", f"What is {i} + {i}?", str(2 * i), "basic_arithmetic") for i in range(num_prompts)]
    ids = [render_prompt(tokenizer, cfg.data, p) for p in prompts]
    records = get_method(cfg.algorithm.name).rollout(ctx, prompts, [f"{p.prompt_id}@0-{i}" for i, p in enumerate(prompts)], ids)
    return cfg, ctx, counter, prompts, ids, records


@pytest.mark.parametrize("method", ["rrpo", "srpo"])
def test_each_prompt_gets_g1_plus_g2_or_a_fallback_group_of_the_same_size(tiny_hf, method):
    cfg, ctx, counter, prompts, ids, records = run_strategy(tiny_hf, method)
    for prompt in prompts:
        own = [r for r in records if r.prompt_id == prompt.prompt_id]
        assert len(own) == 8
        assert all(r.policy_version == 7 for r in own)
    assert ctx.stats["reset_prompts"] + ctx.stats["fallback_prompts"] == len(prompts)
    assert ctx.stats["reset_prompts"] > 0


@pytest.mark.parametrize("method", ["rrpo", "srpo"])
def test_stages_are_batched_over_all_prompts(tiny_hf, method):
    _cfg, ctx, counter, prompts, _ids, _records = run_strategy(tiny_hf, method)
    # Fresh rounds: G1 + 1 = 5, then one more per prompt still searching (12 at most: 8 rounds), as the reference
    # draws chains one by one; then one call topping up the fallback groups, one localisation call (SRPO) and one
    # continuation call.
    assert len(counter.calls) <= 8 + 1 + (2 if method == "srpo" else 1)
    assert counter.calls[0] == (len(prompts), 5)
    fresh_rounds = [call for call in counter.calls[1:] if call[1] == 1]
    assert all(size <= len(prompts) for size, _n in fresh_rounds)
    continuation_call = counter.calls[-1]
    assert continuation_call == (ctx.stats["resets"], 4)
    if method == "srpo":
        assert counter.calls[-2] == (ctx.stats["resets"], 1)
        assert ctx.stats["localisations"] == ctx.stats["resets"]


def test_g2_continues_from_the_parents_prefix_and_trains_on_the_suffix_only(tiny_hf):
    _cfg, ctx, _counter, _prompts, ids, records = run_strategy(tiny_hf, "rrpo")
    g2 = [r for r in records if "/g2." in r.group_id]
    assert g2 and len(g2) == 4 * ctx.stats["resets"]
    for group_id in {r.group_id for r in g2}:
        members = [r for r in g2 if r.group_id == group_id]
        # The four continuations share one context: prompt + the parent's steps 1..k-1.
        first_trained = [int(np.argmax(r.loss_mask)) for r in members]
        assert len(set(first_trained)) == 1
        context_length = first_trained[0]
        assert len({tuple(r.token_ids[:context_length]) for r in members}) == 1
        for r in members:
            assert r.loss_mask[:context_length].sum() == 0 and r.loss_mask[context_length:].all()
            assert (r.advantages[:context_length] == 0).all()
            assert (r.behaviour_logprobs[context_length:] < 0).all()
        # z-scored within G2 alone: the advantages sum to zero (or are all zero when the rewards are equal).
        advantages = np.array([r.advantages[-1] for r in members])
        assert abs(advantages.sum()) < 1e-4
    assert any(int(np.argmax(r.loss_mask)) > r.prompt_length for r in g2)  # some resets had a non-empty prefix


def test_g1_trains_on_the_whole_response_and_is_z_scored_alone(tiny_hf):
    _cfg, _ctx, _counter, _prompts, _ids, records = run_strategy(tiny_hf, "rrpo")
    g1 = [r for r in records if r.group_id.endswith("/g1")]
    for group_id in {r.group_id for r in g1}:
        members = [r for r in g1 if r.group_id == group_id]
        assert len(members) == 4
        for r in members:
            assert r.loss_mask[: r.prompt_length].sum() == 0 and r.loss_mask[r.prompt_length :].all()
            assert r.step_boundaries and r.step_boundaries[0] == r.prompt_length
        rewards = np.array([r.reward for r in members])
        advantages = np.array([r.advantages[-1] for r in members])
        if rewards.std() == 0:
            assert (advantages == 0).all()
        else:
            # The reference's population std (np.std, ddof 0): the reset methods' own choice.
            expected = (rewards - rewards.mean()) / (rewards.std(ddof=0) + 1e-6)
            assert np.allclose(advantages, expected, atol=1e-4)


def test_a_fallback_group_is_g1_plus_newly_sampled_chains(tiny_hf):
    """No failed parent: G1 plus g2_size new chains (the reference's "4 of G1 plus 4 new"), so the group's advantages
    are not all zero by construction when the new chains differ."""
    engine, tokenizer = tiny_hf
    cfg = config_from_dict({
        "algorithm": {"name": "rrpo", "reset": {"step_delimiter": " ", "max_fresh_samples": 5}},
        "rollout": {"max_new_tokens": 12},
    })
    draws = iter([1.0] * 5 + [1.0, 0.0, 1.0, 0.0])  # five successes (no parent), then the four new chains

    def scripted_reward(text, prompt):
        return next(draws)

    counter = CallCounter(engine)
    ctx = RolloutContext(cfg, counter, tokenizer, scripted_reward,
                         SamplingSettings(max_new_tokens=12, temperature=1.0), policy_version=0, rng=random.Random(0))
    prompt = PromptRecord("p0", "What is 1 + 1?", "2", "basic_arithmetic")
    ids = [render_prompt(tokenizer, cfg.data, prompt)]
    records = get_method("rrpo").rollout(ctx, [prompt], ["p0@0"], ids)
    assert counter.calls == [(1, 5), (1, 4)]  # five fresh, no parent: four new chains, never a reuse
    assert [r.reward for r in records] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    advantages = np.array([r.advantages[-1] for r in records])
    rewards = np.array([r.reward for r in records])
    expected = (rewards - rewards.mean()) / (rewards.std(ddof=0) + 1e-6)
    assert np.allclose(advantages, expected, atol=1e-5) and np.abs(advantages).max() > 0
    # The fifth fresh sample was drawn and never trained: counted as discarded.
    assert ctx.stats["samples_discarded"] == 1 and ctx.stats["tokens_discarded"] > 0


def test_the_parent_is_discarded_unless_train_parent(tiny_hf):
    engine, tokenizer = tiny_hf
    for train_parent, expected_records in ((False, 8), (True, 9)):
        cfg = config_from_dict({
            "algorithm": {"name": "rrpo", "reset": {"step_delimiter": " ", "train_parent": train_parent}},
            "rollout": {"max_new_tokens": 12},
        })
        draws = iter([0.0, 1.0, 1.0, 1.0, 1.0] + [1.0] * 4)  # the first sample fails: the parent

        def scripted_reward(text, prompt):
            return next(draws)

        ctx = RolloutContext(cfg, engine, tokenizer, scripted_reward,
                             SamplingSettings(max_new_tokens=12, temperature=1.0), policy_version=0, rng=random.Random(0))
        prompt = PromptRecord("p0", "What is 1 + 1?", "2", "basic_arithmetic")
        records = get_method("rrpo").rollout(ctx, [prompt], ["p0@0"], [render_prompt(tokenizer, cfg.data, prompt)])
        assert len(records) == expected_records == cfg.records_per_prompt
        g1 = [r for r in records if r.group_id.endswith("/g1")]
        assert (0.0 in [r.reward for r in g1]) == train_parent
        assert ctx.stats["samples_discarded"] == (0 if train_parent else 1)


def test_g2_continuations_get_the_response_budget_minus_their_prefix(tiny_hf):
    _cfg, ctx, _counter, _prompts, _ids, records = run_strategy(tiny_hf, "rrpo")
    for r in records:
        if "/g2." in r.group_id:
            prefix = int(np.argmax(r.loss_mask)) - r.prompt_length
            assert len(r.token_ids) - r.prompt_length <= 12, "prefix + continuation within max_new_tokens"
            assert len(r.token_ids) - r.prompt_length - prefix >= 1
