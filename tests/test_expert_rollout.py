"""The SRL, SuperRL and repair rollout strategies on a real engine (HF, tiny_hf random Llama) and tokenizer.

As in test_reset_rollout.py the verifier is a rule of the test's own (reward 1 when the response has an even
number of words), so groups mix successes and failures. No Ray, no Redis: strategies are plain code.
"""

from __future__ import annotations

import random

import numpy as np

from resetrl.actors.engines import SamplingSettings
from resetrl.methods.repair import repair_rollout
from resetrl.methods.srl import srl_rollout
from resetrl.methods.superrl import superrl_rollout
from resetrl.actors.trajectories import RolloutContext
from resetrl.config import config_from_dict
from resetrl.data import render_prompt
from resetrl.record import PromptRecord

from conftest import CallCounter  # noqa: E402  (tests/conftest.py: the real engine, calls recorded)

STEPS = ["Add 2 and 3 to get 5.", "Multiply 5 by 4 to get 20.", "Subtract 1 to get 19."]


def run(tiny_hf, strategy, algorithm: dict, verify=None, policy_version=3, with_steps=(True, True, False)):
    engine, tokenizer = tiny_hf
    cfg = config_from_dict({"algorithm": algorithm, "rollout": {"max_new_tokens": 10, "group_size": 4}})
    counter = CallCounter(engine)
    verify = verify or (lambda text, prompt: float(len(text.split()) % 2 == 0))
    ctx = RolloutContext(cfg, counter, tokenizer, verify, SamplingSettings(max_new_tokens=10, temperature=1.0),
                         policy_version=policy_version, rng=random.Random(0))
    prompts = [PromptRecord(f"p{i}", f"What is (2 + 3) * 4 - {i}?", str(20 - i), "t",
                            {"expert_steps": STEPS} if has else {}) for i, has in enumerate(with_steps)]
    ids = [render_prompt(tokenizer, cfg.data, p) for p in prompts]
    records = strategy(ctx, prompts, [f"{p.prompt_id}@0" for p in prompts], ids)
    return cfg, ctx, counter, prompts, ids, records


def test_srl_samples_every_instance_in_one_call_and_scores_similarity(tiny_hf):
    algorithm = {"name": "srl", "srl": {"dynamic_sampling": False, "require_think": False, "instances_per_prompt": 2}}
    cfg, ctx, counter, prompts, ids, records = run(tiny_hf, srl_rollout, algorithm)
    # 2 prompts with 3 expert steps -> 2 instances each, one call; the prompt without steps gets a GRPO group.
    assert counter.calls == [(4, 4), (1, 4)]
    srl = [r for r in records if r.method == "srl"]
    assert len(srl) == 16 and {r.group_id for r in srl} == {"p0@0/srl.2", "p0@0/srl.3", "p1@0/srl.2", "p1@0/srl.3"}
    assert all(0.0 <= r.reward <= 1.0 for r in srl)  # no </think> required: every answer is well-formed
    for r in srl:  # the instance prompt (problem + expert steps so far) is the context, not trained on
        assert r.loss_mask[: r.prompt_length].sum() == 0 and r.loss_mask[r.prompt_length:].all()
    assert "Add 2 and 3 to get 5." in tiny_hf[1].decode(srl[0].token_ids[: srl[0].prompt_length])
    assert ctx.stats["srl_prompts_without_expert"] == 1 and ctx.stats["srl_instances"] == 4


def test_srl_marks_answers_without_think_malformed_and_drops_instances_without_signal(tiny_hf):
    cfg, ctx, _, _, _, records = run(tiny_hf, srl_rollout, {"name": "srl"}, with_steps=(True, True))
    # The random model never writes </think>: every reward is -1, every instance has std 0 and is dropped.
    assert records == []
    assert ctx.stats["srl_malformed"] == ctx.stats["srl_samples"] == 16
    assert ctx.stats["srl_instances_dropped"] == 4
    assert ctx.stats["prompts_without_records"] == 2  # the driver feeds replacements


def test_srl_then_rlvr_switches_to_the_outcome_verifier_at_the_configured_version(tiny_hf):
    algorithm = {"name": "srl", "srl": {"curriculum": "srl_then_rlvr", "switch_after_steps": 3}}
    _, ctx, counter, _, _, records = run(tiny_hf, srl_rollout, algorithm, policy_version=3)
    assert counter.calls == [(3, 4)] and {r.method for r in records} == {"grpo"}
    assert ctx.stats["srl_rlvr_prompts"] == 3
    _, ctx, _, _, _, _ = run(tiny_hf, srl_rollout, {**algorithm, "srl": {**algorithm["srl"], "require_think": False}},
                             policy_version=2)
    assert ctx.stats["srl_rlvr_prompts"] == 0 and ctx.stats["srl_instances"] == 4


def test_superrl_sends_the_expert_solution_when_no_rollout_succeeds(tiny_hf):
    _, ctx, counter, prompts, ids, records = run(tiny_hf, superrl_rollout, {"name": "superrl"}, verify=lambda t, p: 0.0)
    assert counter.calls == [(3, 4)]
    sft = [r for r in records if r.method == "superrl-sft"]
    assert [r.prompt_id for r in sft] == ["p0", "p1"]  # p2 has no expert solution: keeps its PG group
    assert ctx.stats["superrl_sft_prompts"] == 2 and ctx.stats["superrl_prompts_without_expert"] == 1
    tokenizer = tiny_hf[1]
    for r in sft:
        assert r.prompt_length == len(ids[0]) and list(r.token_ids[: r.prompt_length]) == ids[int(r.prompt_id[1])]
        assert np.array_equal(r.target_token_ids, r.token_ids[r.prompt_length:])
        assert r.loss_mask[r.prompt_length:].all() and not r.loss_mask[: r.prompt_length].any()
        text = tokenizer.decode(r.target_token_ids, skip_special_tokens=True)
        assert text == "\n".join(STEPS) + f"\nAnswer: {20 - int(r.prompt_id[1])}"
        assert r.target_token_ids[-1] == tokenizer.eos_token_id
    assert len([r for r in records if r.method == "superrl"]) == 4


def test_superrl_writes_the_expert_steps_in_the_configured_step_format(tiny_hf):
    # The chain testbed's policy closes each step with </step>: an expert target with newlines would teach it a
    # format its verifier and step checker never see.
    _, _, _, _, _, records = run(tiny_hf, superrl_rollout, {"name": "superrl", "superrl": {"step_end": "</step>"}},
                                 verify=lambda t, p: 0.0, with_steps=(True,))
    [sft] = [r for r in records if r.method == "superrl-sft"]
    text = tiny_hf[1].decode(sft.target_token_ids, skip_special_tokens=True)
    assert text == "".join(step + "</step>" for step in STEPS) + "Answer: 20"


def test_superrl_trains_pg_when_a_rollout_succeeds(tiny_hf):
    _, ctx, _, _, _, records = run(tiny_hf, superrl_rollout, {"name": "superrl"}, verify=lambda t, p: 1.0)
    assert {r.method for r in records} == {"superrl"} and len(records) == 12
    assert ctx.stats["superrl_sft_prompts"] == 0 and ctx.stats["superrl_prompts"] == 3


def test_repair_sends_failures_back_in_one_call_and_gates_accepted_repairs_to_the_diff(tiny_hf):
    calls = {"n": 0}

    def verify(text, prompt):  # the fresh samples fail, the repairs (scored after the first 12) succeed
        calls["n"] += 1
        return 0.0 if calls["n"] <= 12 else 1.0

    _, ctx, counter, _, ids, records = run(tiny_hf, repair_rollout, {"name": "repair", "repair": {"span_mode": "all"}},
                                           verify=verify)
    assert counter.calls == [(3, 4), (3, 1)]  # G fresh per prompt, then every repair in one call
    assert ctx.stats["repairs_attempted"] == 3 and ctx.stats["repairs_accepted"] == 3
    repairs = [r for r in records if r.method == "repair"]
    assert len(repairs) == 3 - ctx.stats["repairs_without_diff"]
    for r in repairs:
        # trained as an answer to the *original* prompt, on the differing tokens only
        assert list(r.token_ids[: r.prompt_length]) in ids
        assert np.array_equal(r.target_token_ids, r.token_ids[r.prompt_length:])
        assert 0 < r.loss_mask.sum() <= r.num_response_tokens and not r.loss_mask[: r.prompt_length].any()
        assert (r.advantages[r.loss_mask > 0] == 1.0).all()
    assert len([r for r in records if r.method == "grpo"]) == 12
