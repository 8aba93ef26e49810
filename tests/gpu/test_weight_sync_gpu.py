"""Weight sync on GPUs: bucketed broadcast into engines, checked by what the engines generate afterwards.

All tests need CUDA (skipped without it). With one GPU only the single-rank checks run: NCCL refuses two ranks
on one device ("Duplicate GPU detected"), so a learner-to-engine broadcast needs two GPUs. The tests build their
own tiny Llama with a word-level tokenizer (no download, no model cache) so they run on a bare GPU host.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest
import torch

from resetrl.net import free_port
from resetrl.weights.buckets import (
    bucket_nbytes, broadcast_bucket, open_group, open_store, pack_bucket, plan_buckets, unpack_bucket,
)

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 17, 42, 99, 7], [3, 200, 5]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random Llama (head_dim 32, as vLLM wants) with a 300-word tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama-gpu")
    vocab = {f"w{i}": i for i in range(300)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", pad_token="w0", eos_token="w2").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _greedy(model, prompts=PROMPTS, new_tokens: int = 8) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        with torch.no_grad():
            sequence = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(sequence[0, len(prompt):].tolist())
    return out


def _perturbed_copy(tiny_dir, device, seed=1, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype).to(device).eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param))
    return model


def test_pack_and_unpack_on_cuda_are_bit_exact():
    device = torch.device("cuda")
    tensors = {"w": torch.randn(257, 33, device=device), "b": torch.randn(1000, device=device).to(torch.bfloat16),
               "h": torch.randn(3, 5, device=device).half(), "n": torch.arange(7, device=device)}
    (bucket,) = plan_buckets([(n, t.shape, t.dtype) for n, t in tensors.items()], bucket_bytes=2**24)
    buffer = pack_bucket(bucket, list(tensors.values()))
    assert buffer.is_cuda and buffer.numel() == bucket_nbytes(bucket)
    for name, tensor in unpack_bucket(buffer, bucket):
        assert tensor.is_cuda and torch.equal(tensor, tensors[name]), name


def test_single_rank_nccl_broadcast_carries_a_model_into_another_on_gpu(tiny_dir):
    """The learner's path (plan, pack, NCCL broadcast per bucket) and the engine's (unpack, copy into the model)
    through a one-rank NCCL group: the receiving model then generates what the sender generates."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda", 0)
    sender = _perturbed_copy(tiny_dir, device)
    receiver = AutoModelForCausalLM.from_pretrained(tiny_dir).to(device).eval()
    before = _greedy(receiver)
    tensors = dict(sender.named_parameters())
    buckets = plan_buckets([(n, t.shape, t.dtype) for n, t in tensors.items()], bucket_bytes=128 * 1024)
    assert len(buckets) > 1
    group = open_group(open_store("127.0.0.1", free_port(), 0, 1, 60), 0, 1, "nccl", 60)
    params = receiver.state_dict()
    with torch.no_grad():
        for bucket in buckets:
            buffer = pack_bucket(bucket, [tensors[s.name] for s in bucket], device)
            broadcast_bucket(group, buffer)
            for name, tensor in unpack_bucket(buffer, bucket):
                params[name].copy_(tensor)
    assert _greedy(receiver) == _greedy(sender) != before


def _need_gpus(count: int):
    if torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} GPUs: NCCL refuses two ranks on one GPU (Duplicate GPU detected)")


def _engine_process(kind, model_dir, redis_url, run_name, result_queue):
    """Engine rank 1 on the second GPU (CUDA_VISIBLE_DEVICES set by the parent): sync until it holds v1."""
    from resetrl.actors.engines import SamplingSettings, make_engine
    from resetrl.queue import connect
    from resetrl.actors.engines.weight_receivers import NcclWeightReceiver
    from resetrl.run_state import RunKeys

    engine = make_engine(kind, model_dir, dtype="float32", gpu_memory_utilization=0.3)
    greedy = SamplingSettings(max_new_tokens=8, temperature=0.0)
    before = [s[0].token_ids for s in engine.generate(PROMPTS, 1, greedy)]
    channel = NcclWeightReceiver(connect(redis_url), RunKeys(run_name), rank=1, world_size=2, join_timeout_s=120)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        latest = channel.latest()
        if latest is not None and channel.load_into(engine, *latest):
            break
        time.sleep(0.05)
    after = [s[0].token_ids for s in engine.generate(PROMPTS, 1, greedy)]
    result_queue.put((before, after))
    engine.close()


def _broadcast_to_engine_on_second_gpu(kind, tiny_dir, tmp_path):
    """Learner (HF, rank 0, cuda:0) broadcasts perturbed weights to a `kind` engine (rank 1, cuda:1)."""
    from resetrl.actors.engines import SamplingSettings
    from resetrl.actors.engines.hf_engine import HFEngine
    from resetrl.queue import connect
    from resetrl.launch.redis_server import EmbeddedRedis
    from resetrl.run_state import RunKeys, read_stats
    from resetrl.weights import NcclWeightChannel

    with EmbeddedRedis(tmp_path / "redis") as server:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        previous = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = "1"  # the child sees only the second GPU
        try:
            child = context.Process(target=_engine_process, args=(kind, str(tiny_dir), server.url, "gpu", results))
            child.start()
        finally:
            if previous is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES")
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = previous
        learner = HFEngine(str(tiny_dir), device="cuda:0")
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in learner.model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param))
        client = connect(server.url)
        channel = NcclWeightChannel(client, RunKeys("gpu"), rank=0, world_size=2, bucket_bytes=256 * 1024,
                                    join_timeout_s=240, backend="nccl")
        channel.publish_module(learner.model, 1)
        before, after = results.get(timeout=300)
        child.join(60)
        expected = [s[0].token_ids for s in learner.generate(PROMPTS, 1, SamplingSettings(max_new_tokens=8,
                                                                                          temperature=0.0))]
        stats = read_stats(client, RunKeys("gpu"))
    assert after == expected and after != before
    assert stats["weight_syncs"] == 1 and stats["weight_sync_bytes"] > 0


def test_nccl_broadcast_makes_an_hf_engine_on_another_gpu_generate_the_learners_output(tiny_dir, tmp_path):
    _need_gpus(2)
    _broadcast_to_engine_on_second_gpu("hf", tiny_dir, tmp_path)


@pytest.mark.vllm
def test_nccl_broadcast_makes_vllm_greedy_output_equal_the_learners_hf_greedy_output(tiny_dir, tmp_path):
    """The issue's acceptance test: learner rank 0 (HF, cuda:0) -> vLLM worker (cuda:1) over NCCL, then vLLM's
    greedy completions equal the learner's HF greedy completions."""
    _need_gpus(2)
    _broadcast_to_engine_on_second_gpu("vllm", tiny_dir, tmp_path)


def test_zero3_learner_gathers_bucket_by_bucket_into_an_engine(tiny_dir, tmp_path):
    """The learner's ZeRO-3 path on GPU: partitioned parameters gathered per bucket, packed, broadcast (gloo here,
    so one GPU is enough) to an HF engine rank on the CPU, which then generates what the learner's model does."""
    deepspeed = pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    import torch.distributed as dist

    from resetrl.actors.engines import SamplingSettings
    from resetrl.actors.engines.hf_engine import HFEngine
    from resetrl.actors.engines.weight_receivers import NcclWeightReceiver
    from resetrl.queue import connect
    from resetrl.launch.redis_server import EmbeddedRedis
    from resetrl.run_state import RunKeys, read_stats
    from resetrl.weights import NcclWeightChannel

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        torch.cuda.set_device(0)
        deepspeed.init_distributed(dist_backend="nccl")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reference = _perturbed_copy(tiny_dir, "cpu")
    model.load_state_dict(reference.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1})
    engine = HFEngine(str(tiny_dir), device="cpu")
    before = [s[0].token_ids for s in engine.generate(PROMPTS, 1, SamplingSettings(8, temperature=0.0))]
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = connect(server.url)
        keys = RunKeys("zero3")
        sender = NcclWeightChannel(client, keys, rank=0, world_size=2, bucket_bytes=64 * 1024, join_timeout_s=60,
                                   backend="gloo", host="127.0.0.1")
        receiver = NcclWeightReceiver(connect(server.url), keys, rank=1, world_size=2, join_timeout_s=60)

        def engine_side():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                latest = receiver.latest()
                if latest is not None and receiver.load_into(engine, *latest):
                    return
                time.sleep(0.01)

        thread = threading.Thread(target=engine_side)
        thread.start()
        sender.publish_module(ds_engine.module, 1, zero_stage=3)
        thread.join(60)
        stats = read_stats(client, keys)
    after = [s[0].token_ids for s in engine.generate(PROMPTS, 1, SamplingSettings(8, temperature=0.0))]
    received = engine.model.state_dict()
    assert all(torch.equal(received[name], t) for name, t in reference.state_dict().items())
    assert after != before
    assert stats["weight_sync_bytes"] == sum(p.numel() * p.element_size() for p in reference.parameters())
