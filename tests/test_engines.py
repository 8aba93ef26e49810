"""Rollout engines (HF transformers and vLLM) on the tiny random Llama: one engine of each kind per module.

Every behaviour is checked for both engines; the reported log-probs are checked against an independent HF forward
pass, log_softmax(logits / T) at the sampled tokens, which is what the learner recomputes.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from resetrl.actors.engines import SamplingSettings, make_engine
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


def test_unknown_engine_kind_names_the_choices(tiny_path):
    with pytest.raises(ValueError, match="'auto', 'vllm' or 'hf'"):
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
