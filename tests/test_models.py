"""resolve_model: built-in models become plain local Hugging Face folders, built once and reused."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from resetrl.config import ModelConfig, TinyModelConfig
from resetrl.models import resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny_path(cache_dir):
    return resolve_model(ModelConfig(name="tiny-llama", cache_dir=str(cache_dir)))


def test_tiny_llama_is_a_loadable_llama_with_smollm2_tokenizer(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    tiny = TinyModelConfig()
    assert model.config.model_type == "llama"
    assert model.config.hidden_size == tiny.hidden_size and model.config.num_hidden_layers == tiny.num_hidden_layers
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 2


def test_tiny_llama_is_reused_not_rebuilt(tiny_path, cache_dir):
    weights = tiny_path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = resolve_model(ModelConfig(name="tiny-llama", cache_dir=str(cache_dir)))
    assert again == tiny_path
    assert weights.stat().st_mtime_ns == before


def test_tiny_llama_weights_follow_the_seed(tiny_path, cache_dir):
    other = resolve_model(ModelConfig(name="tiny-llama", cache_dir=str(cache_dir), tiny=TinyModelConfig(seed=1)))
    assert other != tiny_path
    first = AutoModelForCausalLM.from_pretrained(tiny_path).model.embed_tokens.weight
    second = AutoModelForCausalLM.from_pretrained(other).model.embed_tokens.weight
    assert not torch.equal(first, second)


def test_concurrent_builders_share_one_folder(cache_dir):
    cfg = ModelConfig(name="tiny-llama", cache_dir=str(cache_dir), tiny=TinyModelConfig(seed=7))
    paths, errors = [], []

    def build():
        try:
            paths.append(resolve_model(cfg))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert paths[0] == paths[1]
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tiny-llama") and p.is_dir()]  # no scratch left
    AutoModelForCausalLM.from_pretrained(paths[0])


def test_a_local_folder_is_used_as_it_is(tiny_path):
    assert resolve_model(ModelConfig(name=str(tiny_path))) == tiny_path


def test_a_missing_folder_names_the_field_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.name = .*no-such-model.*set model.name"):
        resolve_model(ModelConfig(name=str(tmp_path / "no-such-model")))


def test_smollm2_converts_to_a_chat_model_that_stops_at_im_end(cache_dir):
    path = resolve_model(ModelConfig(name="smollm2-135m-instruct", cache_dir=str(cache_dir)))
    config = (path / "config.json").read_text()
    assert "quantization_config" not in config  # plain floats, not a GGUF-quantised model
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.tie_word_embeddings
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt) :].tolist()
    assert out[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == model.generation_config.eos_token_id
    assert "4" in tokenizer.decode(out, skip_special_tokens=True)
