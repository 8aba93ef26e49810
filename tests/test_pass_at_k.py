"""pass@k of the held-out evaluation (eval.samples = n answers per problem): Chen et al. 2021's unbiased estimator on
hand-computed numbers, the summary and metric shapes, and the Evaluator on a real engine with a verifier whose
correct answers per problem are known."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest

from resetrl.evaluation import eval_scalars, eval_summary, pass_at_k, pass_at_k_curve
from resetrl.metrics import namespaced
from resetrl.record import PromptRecord
from resetrl.verifiers import register


def test_pass_at_k_is_one_minus_the_chance_that_k_draws_miss_every_correct_answer():
    # n = 4 answers, c = 1 correct: pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6; pass@3 = 1 - C(3,3)/C(4,3) = 1 - 1/4
    assert [pass_at_k(4, 1, k) for k in (1, 2, 3, 4)] == pytest.approx([1 / 4, 1 / 2, 3 / 4, 1.0])
    # c = 2: pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6; three draws cannot all miss two correct of four
    assert [pass_at_k(4, 2, k) for k in (1, 2, 3, 4)] == pytest.approx([1 / 2, 5 / 6, 1.0, 1.0])
    assert [pass_at_k(4, 0, k) for k in (1, 4)] == [0.0, 0.0]
    assert [pass_at_k(4, 4, k) for k in (1, 4)] == [1.0, 1.0]
    # n = 10, c = 3, k = 5: 1 - C(7,5)/C(10,5) = 1 - 21/252
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)


def test_pass_at_k_is_unbiased_where_the_plug_in_formula_is_not():
    # Enumerate every way to draw k of the n answers: pass@k is the fraction of draws holding a correct one.
    n, c, k = 5, 2, 3
    answers = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(answers, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))  # 9/10
    assert pass_at_k(n, c, k) != pytest.approx(1 - (1 - c / n) ** k)  # 0.784


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="n=4, c=5, k=1"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="n=4, c=1, k=5"):
        pass_at_k(4, 1, 5)


def test_the_curve_averages_each_k_over_problems():
    # problems with 0, 1, 2 and 4 of 4 answers correct (values above)
    curve = pass_at_k_curve([0, 1, 2, 4], 4)
    assert curve == pytest.approx({1: (0 + 1 / 4 + 1 / 2 + 1) / 4, 2: (0 + 1 / 2 + 5 / 6 + 1) / 4,
                                   3: (0 + 3 / 4 + 1 + 1) / 4, 4: 3 / 4})
    assert list(curve) == [1, 2, 3, 4]


def test_curve_points_keep_pass_at_k_and_the_metrics_get_one_scalar_per_k():
    point = {"policy_version": 2, "accuracy": 0.4375, "pass_at_k": {1: 0.4375, 2: 7 / 12}, "problems": 4}
    summary = eval_summary([point], tokens_generated_by_step=[10, 25])
    assert summary["eval_curve"][0]["pass_at_k"] == {1: 0.4375, 2: 7 / 12}
    assert namespaced(eval=eval_scalars(summary["eval_curve"][0])) == {
        "eval/accuracy": 0.4375, "eval/pass@1": 0.4375, "eval/pass@2": 7 / 12, "eval/problems": 4.0,
        "eval/tokens_generated": 25.0,
    }


_calls: dict[str, int] = defaultdict(int)


@register("test-first-c-answers-correct")
def _first_c_correct(response_text: str, prompt: PromptRecord) -> float:
    # The first int(answer) answers scored for a problem are correct, the rest wrong: c per problem is known
    # whatever the random model writes (the evaluator scores a problem's answers in order, one call each).
    _calls[prompt.prompt_id] += 1
    return 1.0 if _calls[prompt.prompt_id] <= int(prompt.answer) else 0.0


def test_the_evaluator_reports_pass_at_1_to_n(tmp_path, redis_server):
    from resetrl.actors.evaluator import Evaluator
    from resetrl.config import ModelConfig, load_config
    from resetrl.models import resolve_model

    cfg = load_config(None, [
        "run_name=passk", "model.name=tiny-llama", "rollout.engine=hf", "rollout.max_new_tokens=4",
        "algorithm.verifier=test-first-c-answers-correct", "eval.holdout=4", "eval.samples=4", "eval.temperature=1.0",
    ])
    problems = [PromptRecord(prompt_id=f"pk{i}", question=f"Calculate {i} + 1.", answer=str(c), task="basic_arithmetic")
                for i, c in enumerate([0, 1, 2, 4])]
    evaluator = Evaluator(cfg, str(resolve_model(ModelConfig(name="tiny-llama"))), redis_server.url,
                          str(tmp_path / "weights"), problems)
    try:
        result = evaluator.evaluate()
    finally:
        evaluator.close()
    assert result["samples_per_problem"] == 4
    assert result["accuracy"] == pytest.approx(7 / 16)
    assert result["pass_at_k"] == pytest.approx({1: 7 / 16, 2: 7 / 12, 3: 11 / 16, 4: 3 / 4})
