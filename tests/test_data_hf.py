"""data.source=hf: Hugging Face datasets from data files, save_to_disk folders and a hub id in a local HF cache
(offline), with GSM8K- (`#### N`) and MATH-style (`\\boxed{}`) columns, column mapping and bad rows."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from resetrl.config import DataConfig, config_from_dict  # noqa: E402
from resetrl.data import build_prompts  # noqa: E402
from resetrl.problem_files import BadRowError, load_problems  # noqa: E402
from resetrl.record import decode_prompt, encode_prompt  # noqa: E402

GSM_ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "Weng earns $12 an hour. How much for 50 minutes?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nFor 50 minutes she earned 0.2 x 50 = $10.\n#### 10"},
    {"question": "A big sum?", "answer": "It is 1000 + 234.\n#### 1,234"},
]
MATH_ROWS = [
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "Add the numerators: $\\frac{1}{4} + \\frac{1}{4} = \\frac{2}{4}$.\nSo the sum is "
                 "$\\boxed{\\frac{1}{2}}$."},
    {"problem": "Solve $x + 3 = 5$.", "level": "Level 1", "type": "Algebra",
     "solution": "Subtract 3 from both sides: $x = \\boxed{2}$."},
]


@pytest.fixture(autouse=True)
def private_hf_home(tmp_path, monkeypatch):
    """Every test gets its own HF_HOME: the datasets cache (arrow files) and the hub cache live in tmp_path."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf(path, **fields) -> DataConfig:
    return DataConfig(source="hf", path=str(path), **fields)


def test_gsm8k_parquet_answers_are_the_number_after_hashes_and_the_lines_above_are_steps(tmp_path):
    path = tmp_path / "gsm8k-test.parquet"
    pq.write_table(pa.Table.from_pylist(GSM_ROWS), path)
    prompts = build_prompts(hf(path))
    assert [p.answer for p in prompts] == ["72", "10", "1234"]
    assert prompts[0].question == GSM_ROWS[0]["question"]
    assert prompts[0].metadata["expert_steps"] == ["Natalia sold 48/2 = 24 clips in May.",
                                                   "Natalia sold 48+24 = 72 clips."]
    assert [p.prompt_id for p in prompts] == ["gsm8k-test-train-1", "gsm8k-test-train-2", "gsm8k-test-train-3"]
    assert prompts[0].task == "gsm8k-test"
    assert [decode_prompt(encode_prompt(p)) for p in prompts] == prompts


def test_math_json_answers_are_the_last_boxed_of_the_solution(tmp_path):
    path = tmp_path / "math.json"
    path.write_text(json.dumps(MATH_ROWS))  # a JSON array, not JSON lines: datasets' json builder reads it
    prompts = build_prompts(hf(path))
    assert [p.answer for p in prompts] == ["\\frac{1}{2}", "2"]
    assert prompts[0].metadata["level"] == "Level 1" and prompts[0].metadata["type"] == "Prealgebra"
    assert prompts[1].metadata["expert_steps"] == ["Subtract 3 from both sides: $x = \\boxed{2}$."]


def test_column_mapping_and_a_plain_answer_format(tmp_path):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"prompt": ["2+3?", "4*2?"], "target": ["5", "8 #### not a marker"]}), path)
    prompts = build_prompts(hf(path, question_key="prompt", answer_key="target", answer_format="plain"))
    assert [(p.question, p.answer) for p in prompts] == [("2+3?", "5"), ("4*2?", "8 #### not a marker")]
    assert prompts[0].metadata == {}


def test_bad_rows_name_the_row_and_are_skipped_and_counted(tmp_path):
    rows = [GSM_ROWS[0], {"question": "No marker?", "answer": "just text"}, {"question": None, "answer": "x\n#### 1"},
            GSM_ROWS[1], {"question": "Empty?", "answer": ""}]
    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = hf(path, answer_format="gsm8k")
    with pytest.raises(BadRowError, match=r"gsm\.parquet\[train\]:2: column 'answer' has no '#### <answer>' line "
                                          r"\(data\.answer_format=gsm8k\).*data\.skip_bad_rows=true"):
        build_prompts(cfg)
    prompts, skipped = load_problems(cfg.model_copy(update={"skip_bad_rows": True}))
    assert [p.answer for p in prompts] == ["72", "10"]
    assert [p.prompt_id for p in prompts] == ["gsm-train-1", "gsm-train-4"]  # row numbers, bad rows included
    assert len(skipped) == 3
    assert skipped[1].startswith(f"{path}[train]:3: column 'question' missing; set data.question_key")
    assert skipped[2].startswith(f"{path}[train]:5: column 'answer' missing or empty")


def test_math_rows_without_a_boxed_answer_are_bad_rows(tmp_path):
    rows = MATH_ROWS + [{"problem": "Unboxed?", "solution": "The answer is 3.", "level": "Level 2", "type": "x"}]
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(BadRowError, match=r"math\.parquet\[train\]:3: column 'answer' missing or empty and column "
                                          r"'solution' has no \\boxed\{\} answer"):
        build_prompts(hf(path))
    with pytest.raises(BadRowError, match=r"math\.parquet\[train\]:3: column 'solution' has no \\boxed\{\.\.\.\} answer"):
        build_prompts(hf(path, answer_format="math_boxed"))
    prompts, skipped = load_problems(hf(path, skip_bad_rows=True))
    assert len(prompts) == 2 and len(skipped) == 1


def test_a_saved_dataset_dict_gives_the_chosen_split(tmp_path):
    folder = tmp_path / "saved-gsm"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(GSM_ROWS[:2]),
        "test": datasets.Dataset.from_list(GSM_ROWS[2:]),
    }).save_to_disk(str(folder))
    assert [p.answer for p in build_prompts(hf(folder))] == ["72", "10"]
    test = build_prompts(hf(folder, split="test"))
    assert [(p.prompt_id, p.answer) for p in test] == [("saved-gsm-test-1", "1234")]
    with pytest.raises(ValueError, match=r"data\.split: .*saved-gsm has no split 'validation'; it has 'train', 'test'"):
        build_prompts(hf(folder, split="validation"))


def test_a_saved_single_dataset_with_bad_rows(tmp_path):
    folder = tmp_path / "saved-math"
    rows = [*MATH_ROWS, {"problem": "", "solution": "\\boxed{1}", "level": "Level 1", "type": "x"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    with pytest.raises(BadRowError, match=r"saved-math\[train\]:3: column 'problem' must be a non-empty string"):
        build_prompts(hf(folder))
    prompts, skipped = load_problems(hf(folder, skip_bad_rows=True, size=10))
    assert [p.answer for p in prompts] == ["\\frac{1}{2}", "2"] and len(skipped) == 1


def test_a_jsonl_file_under_hf_is_read_line_by_line(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_bytes(json.dumps(GSM_ROWS[0]).encode() + b"\n{\"question\": \"caf\xe9\", \"answer\": \"1\"}\n"
                     + json.dumps(GSM_ROWS[1]).encode() + b"\n")
    with pytest.raises(BadRowError, match=r"lines\.jsonl:2: not UTF-8"):
        build_prompts(hf(path))
    prompts, skipped = load_problems(hf(path, skip_bad_rows=True))
    assert [p.answer for p in prompts] == ["72", "10"] and len(skipped) == 1


def write_hub_dataset(hub_cache, repo_id: str, commit: str = "a" * 40) -> None:
    """A dataset repo as `hf download --repo-type dataset` leaves it in the hub cache: GSM8K's layout (a `main`
    configuration with train and test parquet files, declared in the README)."""
    repo = hub_cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (snapshot / "main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM_ROWS[:2]), snapshot / "main" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(GSM_ROWS[2:]), snapshot / "main" / "test-00000-of-00001.parquet")
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n"
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_dataset_id_loads_offline_from_the_hf_cache(tmp_path):
    write_hub_dataset(tmp_path / "hf-home" / "hub", "acme/tiny-gsm")
    prompts = build_prompts(hf("acme/tiny-gsm", config_name="main", split="test"))
    assert [(p.prompt_id, p.answer) for p in prompts] == [("tiny-gsm-test-1", "1234")]
    with pytest.raises(ValueError, match=r"data\.path: acme/tiny-gsm: .*'other'.*check data\.config_name"):
        build_prompts(hf("acme/tiny-gsm", config_name="other"))


def test_a_hub_dataset_id_not_in_the_cache_offline_names_the_id_the_caches_and_the_fix(tmp_path):
    with pytest.raises(ValueError) as caught:
        build_prompts(hf("acme/not-downloaded", config_name="main"))
    message = str(caught.value)
    assert "data.path = 'acme/not-downloaded'" in message
    assert str(tmp_path / "hf-home" / "hub") in message and str(tmp_path / "hf-home" / "datasets") in message
    assert "HF_HUB_OFFLINE is set, so nothing is downloaded" in message
    assert "hf download acme/not-downloaded --repo-type dataset" in message


def test_hf_needs_a_path():
    with pytest.raises(ValueError, match=r"data\.source=hf reads a dataset: set data\.path"):
        config_from_dict({"data": {"source": "hf"}})
