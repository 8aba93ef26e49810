"""Held-out evaluation (config section `eval`): the split, the evaluator on a real engine, the summary curve; and
the generation budget (total_tokens) that bench/algorithms.py compares methods at."""

from __future__ import annotations

import pytest
import torch

from resetrl.config import ModelConfig, load_config
from resetrl.data import build_prompts, split_holdout
from resetrl.evaluation import eval_summary
from resetrl.models import resolve_model
from resetrl.record import PromptRecord
from resetrl.run_state import RunKeys
from resetrl.verifiers import register
from resetrl.weights import SharedFolderWeightChannel


@register("test-answer-is-yes")
def _answer_is_yes(response_text: str, prompt: PromptRecord) -> float:
    # Independent of what the random model writes: accuracy is exactly the share of problems whose answer is "yes".
    return 1.0 if prompt.answer == "yes" else 0.0


def test_split_holdout_keeps_the_last_problems_out_of_training():
    prompts = build_prompts(load_config(None, ["data.size=10"]).data)
    train, held_out = split_holdout(prompts, 3)
    assert [p.prompt_id for p in held_out] == [p.prompt_id for p in prompts[-3:]]
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in held_out}
    assert len(train) == 7
    assert split_holdout(prompts, 0) == (prompts, [])
    with pytest.raises(ValueError, match=r"eval\.holdout \(10\) must be smaller than the 10 problems"):
        split_holdout(prompts, 10)


def test_split_holdout_drops_training_repeats_of_held_out_questions():
    def problem(index: int, question: str) -> PromptRecord:
        return PromptRecord(prompt_id=f"p{index}", question=question, answer="1", task="basic_arithmetic")

    prompts = [problem(0, "1 + 0"), problem(1, "2 - 1"), problem(2, "1 + 0"), problem(3, "3 - 2"), problem(4, "1 + 0")]
    train, held_out = split_holdout(prompts, 1)
    assert [p.prompt_id for p in held_out] == ["p4"]
    assert [p.prompt_id for p in train] == ["p1", "p3"]


def test_eval_summary_puts_each_version_at_its_generated_tokens():
    results = [{"policy_version": 0, "accuracy": 0.1}, {"policy_version": 2, "accuracy": 0.3},
               {"policy_version": 3, "accuracy": 0.4}]
    summary = eval_summary(results, tokens_generated_by_step=[100, 250, 400])
    assert [point["tokens_generated"] for point in summary["eval_curve"]] == [0, 250, 400]
    assert summary["eval_accuracy_first"] == 0.1 and summary["eval_accuracy_last"] == 0.4


def test_evaluator_scores_held_out_problems_and_follows_published_weights(tmp_path, redis_server, redis_client):
    from resetrl.actors.evaluator import Evaluator

    cfg = load_config(None, [
        "run_name=evaltest", "model.name=tiny-llama", "rollout.engine=hf", "rollout.max_new_tokens=8",
        "algorithm.verifier=test-answer-is-yes", "eval.holdout=4",
    ])
    model_path = str(resolve_model(ModelConfig(name="tiny-llama")))
    problems = [PromptRecord(prompt_id=f"p{i}", question=f"Calculate {i} + 1.", answer=answer,
                             task="basic_arithmetic") for i, answer in enumerate(["yes", "no", "no", "no"])]
    evaluator = Evaluator(cfg, model_path, redis_server.url, str(tmp_path / "weights"), problems)
    try:
        first = evaluator.evaluate()
        assert first["policy_version"] == 0 and first["problems"] == 4
        assert first["accuracy"] == pytest.approx(0.25)
        assert 0 < first["response_len_mean"] <= 8

        # A newer published policy is loaded before the next evaluation, and the result says which one it scored.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(1.5)
        channel = SharedFolderWeightChannel(tmp_path / "weights", redis_client, RunKeys("evaltest"))
        channel.publish(model.state_dict(), version=3)
        second = evaluator.evaluate()
        assert second["policy_version"] == 3
        assert evaluator.engine.model.model.embed_tokens.weight.detach().allclose(model.model.embed_tokens.weight)
    finally:
        evaluator.close()


def test_generation_budget_stops_at_the_first_step_end_over_total_tokens():
    from resetrl.launch.train_loop import generation_budget_spent

    budget = load_config(None, ["total_tokens=1000"])
    assert not generation_budget_spent(budget, [])
    assert not generation_budget_spent(budget, [400, 999])
    assert generation_budget_spent(budget, [400, 999, 1000])
    assert not generation_budget_spent(load_config(None, []), [10**9])  # no budget: total_steps alone decides
