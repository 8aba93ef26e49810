"""SRL, SuperRL and repair math on hand-made examples (pure functions: no Ray, Redis or DeepSpeed)."""

from __future__ import annotations

import difflib

import numpy as np
import pytest
import torch

from resetrl.algorithms.losses import supervised_loss
from resetrl.algorithms.repair import diff_mask, diff_spans, repair_prompt
from resetrl.algorithms.shaping import group_has_signal
from resetrl.algorithms.srl import parse_step, srl_instances, srl_prompt, step_similarity_reward
from resetrl.algorithms.superrl import batch_gate, gate_loss_weights, prompt_gate, uncertainty_weights

# ---- SRL -------------------------------------------------------------------------------------------------------


def test_n_expert_steps_make_n_minus_1_instances():
    steps = ["a = 2 + 3 = 5", "b = 5 * 4 = 20", "c = 20 - 1 = 19"]
    instances = srl_instances(steps)
    assert [(i.step, i.previous_steps, i.target) for i in instances] == [
        (2, ("a = 2 + 3 = 5",), "b = 5 * 4 = 20"),
        (3, ("a = 2 + 3 = 5", "b = 5 * 4 = 20"), "c = 20 - 1 = 19"),
    ]
    assert srl_instances(["only one"]) == [] and srl_instances([]) == []


def test_instance_prompt_shows_the_previous_steps_and_asks_for_the_next():
    text = srl_prompt("What is x?", ("first", "second"))
    assert "Step 1: first\nStep 2: second" in text and "step 3" in text and "</think>" in text


def test_similarity_reward_scores_the_text_after_think():
    # "abcd" vs "abce": 3 matching characters, 2 * 3 / (4 + 4) = 0.75
    assert step_similarity_reward("<think>scratch</think> abcd", "abce") == pytest.approx(0.75)
    assert step_similarity_reward("<think>x</think>b = 5 * 4 = 20", "b = 5 * 4 = 20") == 1.0
    # only the text after the last </think> counts; whitespace is normalised
    assert step_similarity_reward("<think>a</think>zzz</think>  b =\n5", "b = 5") == 1.0
    expected = difflib.SequenceMatcher(None, "x = 7", "x = 9").ratio()
    assert step_similarity_reward("<think>t</think>x = 7", "x = 9") == pytest.approx(expected) == pytest.approx(0.8)


def test_malformed_answers_score_minus_one():
    assert step_similarity_reward("no think tags at all", "abc") == -1.0
    assert step_similarity_reward("<think>only thinking</think>   ", "abc") == -1.0
    assert parse_step("no tags", require_think=True) is None
    # for models that never write the tags, the whole response can be the step
    assert parse_step(" abc ", require_think=False) == "abc"
    assert step_similarity_reward("abc", "abc", require_think=False) == 1.0


def test_dynamic_sampling_keeps_instances_whose_rewards_differ():
    assert not group_has_signal([-1.0, -1.0, -1.0, -1.0], eps=1e-4)
    assert not group_has_signal([0.5, 0.5 + 1e-6], eps=1e-4)
    assert group_has_signal([0.5, 0.6], eps=1e-4)


# ---- SuperRL ---------------------------------------------------------------------------------------------------


def test_gate_is_one_when_any_rollout_has_positive_reward():
    assert prompt_gate([0.0, 0.0, 1.0, 0.0]) == 1
    assert prompt_gate([0.0, 0.0, 0.0, 0.0]) == 0
    assert prompt_gate([-1.0, -0.5]) == 0


def test_advantage_variant_gates_on_a_positive_advantage():
    # all rollouts solved: reward gate 1, but no advantage is positive (all equal -> 0)
    assert prompt_gate([1.0, 1.0], [0.0, 0.0], mode="advantage") == 0
    assert prompt_gate([1.0, 0.0], [0.7, -0.7], mode="advantage") == 1
    with pytest.raises(ValueError, match="advantages"):
        prompt_gate([1.0], mode="advantage")


def test_batch_gate_switches_the_whole_batch():
    batch = [[0, 0], [1, 0], [0, 0], [0, 0]]  # 1 of 4 prompts solved
    assert batch_gate(batch, min_success=0.5) == 0
    assert batch_gate(batch, min_success=0.25) == 1


def test_gate_weights_are_the_fractions_of_prompts_on_pg_and_sft():
    assert gate_loss_weights(3, 1) == (0.75, 0.25)
    assert gate_loss_weights(0, 2) == (0.0, 1.0)
    assert gate_loss_weights(0, 0) == (1.0, 0.0)


def test_mixed_loss_is_c_pg_plus_one_minus_c_sft_averaged_over_prompts():
    # Two prompts: p0 solved (c = 1, L_PG = 0.4), p1 unsolved (c = 0, L_SFT = 2.0): mean = (0.4 + 2.0) / 2 = 1.2
    w_pg, w_sft = gate_loss_weights(pg_prompts=1, sft_prompts=1)
    assert w_pg * 0.4 + w_sft * 2.0 == pytest.approx(1.2)


def test_uncertainty_weights_match_the_formula_and_learn():
    log_sigma = torch.tensor([0.5, -0.25], requires_grad=True)
    w_pg, w_sft, reg = uncertainty_weights(log_sigma)
    loss = w_pg * 2.0 + w_sft * 3.0 + reg
    assert float(loss.detach()) == pytest.approx(np.exp(-1.0) * 2.0 + np.exp(0.5) * 3.0 + 0.25)
    loss.backward()
    # d/ds (exp(-2 s) L + s) = -2 exp(-2 s) L + 1
    assert log_sigma.grad.tolist() == pytest.approx([-2 * np.exp(-1.0) * 2.0 + 1, -2 * np.exp(0.5) * 3.0 + 1])
    # a term absent from the batch gets weight 0 and no regulariser
    w_pg, w_sft, reg = uncertainty_weights(log_sigma.detach(), has_pg=True, has_sft=False)
    assert float(w_sft) == 0.0 and float(reg) == pytest.approx(0.5)


def test_supervised_loss_is_the_weighted_token_mean_nll():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.4]]))
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    weights = torch.ones(2, 3)
    expected = -(np.log(0.25) + np.log(0.9) + np.log(0.1)) / 3
    assert float(supervised_loss(logprobs, weights, mask)) == pytest.approx(expected)
    assert float(supervised_loss(logprobs, 2 * weights, mask)) == pytest.approx(2 * expected)


# ---- repair (supervision internalization) ----------------------------------------------------------------------


def test_diff_spans_are_the_replaced_and_inserted_tokens_of_the_repair():
    failed = [1, 2, 3, 4, 5, 6, 7]
    repair = [1, 2, 9, 4, 5, 8, 8, 6, 7, 10]
    # 3 -> 9 (replace at 2), insert 8 8 at 5..7, append 10 at 9
    assert diff_spans(failed, repair) == [(2, 3), (5, 7), (9, 10)]
    assert diff_spans(failed, failed) == []
    assert diff_spans([1, 2, 3], [1, 3]) == []  # a pure deletion has no repair tokens


def test_diff_mask_gates_the_first_k_spans_or_2k_or_all():
    failed = [1, 2, 3, 4, 5, 6, 7]
    repair = [1, 2, 9, 4, 5, 8, 8, 6, 7, 10]
    assert diff_mask(failed, repair, k=1, mode="k").tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert diff_mask(failed, repair, k=1, mode="2k").tolist() == [0, 0, 1, 0, 0, 1, 1, 0, 0, 0]
    assert diff_mask(failed, repair, k=1, mode="all").tolist() == [0, 0, 1, 0, 0, 1, 1, 0, 0, 1]
    assert diff_mask(failed, failed, k=3).sum() == 0
    with pytest.raises(ValueError, match="span_mode"):
        diff_mask(failed, repair, k=1, mode="3k")


def test_repair_prompt_carries_the_attempt_and_the_reference_when_there_is_one():
    with_ref = repair_prompt("What is 2+2?", "2+2=5\nAnswer: 5", "2+2=4\nAnswer: 4")
    assert "2+2=5" in with_ref and "A correct solution, for reference:\n2+2=4" in with_ref
    assert "reference" not in repair_prompt("What is 2+2?", "2+2=5", None)
