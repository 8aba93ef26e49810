"""LoRA (learner.lora) between the learner's model and the engines, in process: the adapter on the learner's side
(resetrl/learner/lora.py), each weight channel shipping it, and each engine serving it (actors/engines/lora.py).

The "learner" here is the tiny preset model with an adapter whose B is not zero (as after training). Every engine
check compares greedy tokens with an engine holding the learner's *merged* weights, W + (alpha / r) B A: an adapter
that arrived and is applied right generates exactly what the merged model generates. The DeepSpeed learner and the
whole run are in test_learner_lora.py and test_end_to_end_lora.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from resetrl.actors.engines import SamplingSettings, make_engine
from resetrl.actors.engines.lora import adapted_modules, engine_lora, vllm_lora_options
from resetrl.actors.engines.weight_receivers import NcclWeightReceiver, SharedFolderWeightReceiver
from resetrl.config import ConfigError, LoraConfig, ModelConfig, load_config
from resetrl.learner.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter
from resetrl.models import resolve_model
from resetrl.run_state import RunKeys, read_stats
from resetrl.weights import NcclWeightChannel, SharedFolderWeightChannel
from resetrl.weights.base import cpu_tensors

PROMPTS = [[1, 9690, 198, 2683, 359], [5, 6, 7, 8, 9]]
GREEDY = SamplingSettings(max_new_tokens=8, temperature=0.0)
SETTINGS = LoraConfig(rank=8, alpha=16.0)
# The tiny preset (configs/tiny.yaml): hidden 64, MLP 128, 2 heads of 32, 1 KV head, 2 layers. r x (in + out) per
# adapted linear: q 8x(64+64) = 1024, k 8x(64+32) = 768, v 768, o 1024, gate 8x(64+128) = 1536, up 1536, down 1536:
# 8192 per layer, 16384 in the two.
ADAPTER_PARAMS = 16384


def greedy_tokens(engine) -> list[list[int]]:
    return [samples[0].token_ids for samples in engine.generate(PROMPTS, 1, GREEDY)]


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model(ModelConfig(name="tiny-llama"))


def learner_adapter(tiny_path, seed: int = 0, settings: LoraConfig = SETTINGS) -> LoraAdapter:
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    adapter = LoraAdapter(settings, model, str(tiny_path), gradient_checkpointing=False)
    train(adapter, seed)
    return adapter


def train(adapter: LoraAdapter, seed: int) -> None:
    """Adapter values as after some optimizer steps: B no longer zero, big enough to change greedy choices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def merged_engine(tiny_path, adapter: LoraAdapter, folder):
    """An HF engine without LoRA holding the learner's merged weights (the reference every check compares with)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(cpu_tensors(adapter.merged_state()), str(folder / "model.safetensors"))
    engine = make_engine("hf", str(tiny_path))
    engine.load_weights(str(folder))
    return engine


def broadcast(adapter: LoraAdapter, sender: NcclWeightChannel, receiver: NcclWeightReceiver, engine) -> list[bool]:
    """Publish version 1 over the nccl channel while the engine polls for it, as a rollout actor does between
    batches; the receiver's answers."""
    outcome = []

    def engine_loop():
        deadline = time.monotonic() + 60
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.01)
            latest = receiver.latest()
            if latest is not None:
                outcome.append(receiver.load_into(engine, *latest))

    thread = threading.Thread(target=engine_loop)
    thread.start()
    adapter.publish(sender, adapter.model, 1, zero_stage=0, send=True)
    thread.join(60)
    return outcome


# ------------------------------------------------------------------------------------------- config


def test_lora_is_off_by_default_and_takes_a_list_or_all_linear():
    assert load_config("configs/tiny.yaml").learner.lora is None
    lora = load_config("configs/tiny.yaml", ["learner.lora={rank: 8, alpha: 16}"]).learner.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules, lora.merge_for_sync) == \
        (8, 16.0, 0.0, "all-linear", False)
    listed = load_config("configs/tiny.yaml", ["learner.lora.target_modules=[q_proj, v_proj]"]).learner.lora
    assert listed.target_modules == ["q_proj", "v_proj"] and listed.rank == 16


@pytest.mark.parametrize("override, message", [
    ("learner.lora.rnk=8", "learner.lora.rnk: unknown key; did you mean 'rank'?"),
    ("learner.lora.target_modules=attention", "a list of module names (e.g. [q_proj, v_proj]) or 'all-linear'"),
    ("learner.lora.target_modules=[]", "an empty list adapts nothing"),
    ("learner.lora.rank=1024", "learner.lora.rank: Input should be less than or equal to 512"),
])
def test_a_bad_lora_setting_names_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/tiny.yaml", [override])


def test_merge_for_sync_starts_the_engines_without_lora():
    assert engine_lora(load_config("configs/tiny.yaml")) is None
    assert engine_lora(load_config("configs/tiny.yaml", ["learner.lora.rank=8"])).rank == 8
    assert engine_lora(load_config("configs/tiny.yaml", ["learner.lora.merge_for_sync=true"])) is None


def test_vllm_gets_the_smallest_lora_slot_that_holds_the_rank():
    assert vllm_lora_options(LoraConfig(rank=4)) == {"enable_lora": True, "max_loras": 1, "max_lora_rank": 8}
    assert vllm_lora_options(LoraConfig(rank=64))["max_lora_rank"] == 64
    assert vllm_lora_options(LoraConfig(rank=100))["max_lora_rank"] == 128
    assert vllm_lora_options(None) == {}


# ------------------------------------------------------------------------------------------- the learner's side


def test_only_the_adapter_trains_and_its_size_is_r_times_in_plus_out(tiny_path):
    adapter = learner_adapter(tiny_path)
    trainable = adapter.trainable_parameters()
    assert sum(p.numel() for p in trainable) == ADAPTER_PARAMS
    named = {id(p): name for name, p in adapter.model.named_parameters()}
    assert all(".lora_A." in named[id(p)] or ".lora_B." in named[id(p)] for p in trainable)
    state = adapter.adapter_state()
    assert sum(t.numel() for t in state.values()) == ADAPTER_PARAMS
    # all-linear: every linear layer of both blocks, never the output head (tied to the embeddings here)
    assert len(adapted_modules(state)) == 2 * 7 and not any("lm_head" in name for name in state)


def test_merged_weights_are_peft_merge_and_unload(tiny_path):
    adapter = learner_adapter(tiny_path)
    merged = adapter.merged_state()
    reference = adapter.peft_model.merge_and_unload().state_dict()  # merges in place: after merged_state
    assert sorted(merged) == sorted(reference)
    assert all(torch.allclose(merged[name], reference[name], atol=1e-6) for name in reference)


def test_a_target_list_that_matches_nothing_names_the_model_layers(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    with pytest.raises(ValueError, match=r"learner.lora.target_modules=\['attention'\] matches no layer.*'q_proj'"):
        LoraAdapter(LoraConfig(target_modules=["attention"]), model, str(tiny_path), gradient_checkpointing=False)


def test_the_exported_adapter_is_a_peft_folder_peft_loads(tiny_path, tmp_path):
    from peft import PeftModel

    adapter = learner_adapter(tiny_path)
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name, data in adapter.export_adapter(zero_stage=0, send=True).items():
        (folder / name).write_bytes(data)
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(folder)).merge_and_unload()
    expected = adapter.merged_state()
    assert all(torch.allclose(loaded.state_dict()[name], expected[name], atol=1e-6) for name in expected)


# ------------------------------------------------------------------------------------------- engines, channels


def test_shared_folder_ships_the_adapter_only_and_the_hf_engine_serves_it(redis_client, tiny_path, tmp_path):
    keys = RunKeys("lora-hf")
    channel = SharedFolderWeightChannel(tmp_path / "weights", redis_client, keys)
    receiver = SharedFolderWeightReceiver(redis_client, keys)
    engine = make_engine("hf", str(tiny_path), lora=SETTINGS)
    before = greedy_tokens(engine)
    assert before == greedy_tokens(make_engine("hf", str(tiny_path)))  # no adapter yet: the base model

    adapter = learner_adapter(tiny_path, seed=1)
    for version in (1, 2):
        train(adapter, seed=version)
        adapter.publish(channel, adapter.model, version, zero_stage=0, send=True)
        assert receiver.load_into(engine, *receiver.latest())
        expected = greedy_tokens(merged_engine(tiny_path, adapter, tmp_path / f"merged-{version}"))
        assert greedy_tokens(engine) == expected
    assert greedy_tokens(engine) != before
    # bytes about the adapter's: its float32 values plus the safetensors header
    published = tmp_path / "weights" / "v000002" / "model.safetensors"
    assert ADAPTER_PARAMS * 4 < published.stat().st_size < ADAPTER_PARAMS * 4 + 16_000


def test_merge_for_sync_ships_merged_weights_an_engine_without_lora_loads(redis_client, tiny_path, tmp_path):
    keys = RunKeys("lora-merged")
    channel = SharedFolderWeightChannel(tmp_path / "weights", redis_client, keys)
    adapter = learner_adapter(tiny_path, settings=LoraConfig(rank=8, alpha=16.0, merge_for_sync=True))
    adapter.publish(channel, adapter.model, 1, zero_stage=0, send=True)
    engine = make_engine("hf", str(tiny_path))  # engine_lora: no adapter slot
    SharedFolderWeightReceiver(redis_client, keys).load_into(engine, *channel.latest())
    assert greedy_tokens(engine) == greedy_tokens(merged_engine(tiny_path, adapter, tmp_path / "merged"))


def test_nccl_broadcasts_the_adapter_only(redis_client, tiny_path, tmp_path):
    """The nccl channel over gloo: the adapter's bytes cross the group, the engine serves them."""
    keys = RunKeys("lora-nccl")
    engine = make_engine("hf", str(tiny_path), lora=SETTINGS)
    sender = NcclWeightChannel(redis_client, keys, rank=0, world_size=2, bucket_bytes=16 * 1024,
                               join_timeout_s=60, backend="gloo", host="127.0.0.1")
    receiver = NcclWeightReceiver(redis_client, keys, rank=1, world_size=2, join_timeout_s=60)
    adapter = learner_adapter(tiny_path, seed=3)
    assert broadcast(adapter, sender, receiver, engine) == [True]
    assert greedy_tokens(engine) == greedy_tokens(merged_engine(tiny_path, adapter, tmp_path / "merged"))
    full_bytes = sum(t.numel() * t.element_size() for t in cpu_tensors(adapter.merged_state()).values())
    stats = read_stats(redis_client, keys)
    assert stats["weight_sync_bytes"] == ADAPTER_PARAMS * 4  # exactly the adapter: r x (in + out) float32 values
    assert full_bytes > 150 * stats["weight_sync_bytes"]  # a full sync of the tiny model: ~12.9 MB


@pytest.fixture(scope="module")
def vllm_engine(tiny_path):
    engine = make_engine("vllm", str(tiny_path), kv_cache_gib=1, lora=SETTINGS)
    yield engine
    engine.close()


@pytest.mark.vllm
def test_vllm_serves_each_version_as_a_new_lora_request(vllm_engine, redis_client, tiny_path, tmp_path):
    keys = RunKeys("lora-vllm")
    channel = SharedFolderWeightChannel(tmp_path / "weights", redis_client, keys)
    receiver = SharedFolderWeightReceiver(redis_client, keys)
    before = greedy_tokens(vllm_engine)
    assert before == greedy_tokens(make_engine("hf", str(tiny_path)))

    adapter = learner_adapter(tiny_path)
    ids = []
    for version in (1, 2):
        train(adapter, seed=10 + version)
        adapter.publish(channel, adapter.model, version, zero_stage=0, send=True)
        assert receiver.load_into(vllm_engine, *receiver.latest())
        ids.append(vllm_engine.adapter.request.lora_int_id)
        # served from vLLM's adapter cache: its tmpfs folder is gone already (nothing left when the actor is killed)
        assert not Path(vllm_engine.adapter.request.lora_path).exists()
        expected = greedy_tokens(merged_engine(tiny_path, adapter, tmp_path / f"merged-{version}"))
        assert greedy_tokens(vllm_engine) == expected
    assert ids[0] != ids[1] and vllm_engine.llm.llm_engine.list_loras() == {ids[1]}  # the old one is gone


@pytest.mark.vllm
def test_vllm_receives_the_adapter_over_the_nccl_channel(vllm_engine, redis_client, tiny_path, tmp_path):
    """Through the worker extension (vllm_weight_sync.py), over gloo: received into a file, served as an adapter."""
    keys = RunKeys("lora-vllm-nccl")
    sender = NcclWeightChannel(redis_client, keys, rank=0, world_size=2, join_timeout_s=60, backend="gloo",
                               host="127.0.0.1")
    receiver = NcclWeightReceiver(redis_client, keys, rank=1, world_size=2, join_timeout_s=60)
    adapter = learner_adapter(tiny_path, seed=21)
    assert broadcast(adapter, sender, receiver, vllm_engine) == [True]
    assert greedy_tokens(vllm_engine) == greedy_tokens(merged_engine(tiny_path, adapter, tmp_path / "merged"))
