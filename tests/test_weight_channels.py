"""Weight channels beyond one host: bucket packing, the broadcast protocol (nccl channel, over gloo on CPU) and the
Ray object store channel, each checked by what an engine generates after an update.

The end-to-end checks perturb the weights of a "learner" HF engine, publish them, and require the receiving
engine's greedy output to equal the learner's (and differ from what it generated before the update).
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from resetrl.actors.engines import SamplingSettings, make_engine
from resetrl.actors.engines.weight_receivers import (
    NcclWeightReceiver, RayObjectStoreWeightReceiver, SharedFolderWeightReceiver,
)
from resetrl.config import ModelConfig, RunConfig
from resetrl.models import resolve_model
from resetrl.net import free_port
from resetrl.run_state import RunKeys, read_stats, request_stop
from resetrl.weights import NcclWeightChannel, RayObjectStoreWeightChannel, make_weight_channel
from resetrl.weights.buckets import (
    ALIGN_BYTES, TensorSpec, broadcast_bucket, bucket_nbytes, open_group, open_store, pack_bucket, plan_buckets,
    receive_buckets, unpack_bucket,
)

PROMPTS = [[1, 9690, 198, 2683, 359], [5, 6, 7, 8, 9]]
GREEDY = SamplingSettings(max_new_tokens=8, temperature=0.0)


def greedy_tokens(engine) -> list[list[int]]:
    return [samples[0].token_ids for samples in engine.generate(PROMPTS, 1, GREEDY)]


def perturb(engine, seed: int = 0) -> None:
    """A different policy, as after an optimizer step (big enough to change greedy choices of the tiny model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in engine.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model(ModelConfig(name="tiny-llama"))


# ------------------------------------------------------------------------------------------- buckets (pure)


def test_plan_groups_tensors_in_order_at_aligned_offsets():
    # 100 float32 = 400 bytes -> next tensor at 512; 10 bfloat16 = 20 bytes -> bucket of 532 bytes, 768 aligned.
    entries = [("a", (10, 10), torch.float32), ("b", (10,), torch.bfloat16), ("c", (300,), torch.float32)]
    buckets = plan_buckets(entries, bucket_bytes=1024)
    assert [[s.name for s in b] for b in buckets] == [["a", "b"], ["c"]]  # 512 + 1200 > 1024: c starts a bucket
    assert [s.offset for s in buckets[0]] == [0, 512]
    assert bucket_nbytes(buckets[0]) == 768 and bucket_nbytes(buckets[1]) == 1280
    assert all(s.offset % ALIGN_BYTES == 0 for b in buckets for s in b)


def test_a_tensor_bigger_than_the_bucket_gets_a_bucket_of_its_own():
    buckets = plan_buckets([("small", (4,), torch.float32), ("big", (1000,), torch.float32),
                            ("tail", (4,), torch.float32)], bucket_bytes=256)
    assert [[s.name for s in b] for b in buckets] == [["small"], ["big"], ["tail"]]


def test_pack_then_unpack_gives_back_every_tensor_bit_for_bit():
    tensors = {
        "w": torch.randn(3, 5),
        "half": torch.randn(7, 2).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(4, 6).t(),  # not contiguous: packed by value
    }
    (bucket,) = plan_buckets([(n, t.shape, t.dtype) for n, t in tensors.items()], bucket_bytes=2**20)
    buffer = pack_bucket(bucket, list(tensors.values()))
    assert buffer.dtype == torch.uint8 and buffer.numel() == bucket_nbytes(bucket)
    unpacked = dict(unpack_bucket(buffer, bucket))
    assert list(unpacked) == list(tensors)
    for name, tensor in tensors.items():
        assert unpacked[name].dtype == tensor.dtype and torch.equal(unpacked[name], tensor), name


def test_pack_refuses_a_tensor_that_does_not_match_the_plan():
    (bucket,) = plan_buckets([("w", (2, 2), torch.float32)], bucket_bytes=1024)
    with pytest.raises(ValueError, match=r"w: got \(2, 3\) float32, the plan says \(2, 2\) float32"):
        pack_bucket(bucket, [torch.zeros(2, 3)])


def test_specs_travel_as_json_and_an_unknown_dtype_is_refused():
    spec = TensorSpec("model.norm.weight", (64,), "bfloat16", 512)
    assert TensorSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="'float99' is not a torch dtype"):
        TensorSpec.from_json({"name": "x", "shape": [1], "dtype": "float99", "offset": 0})


def test_a_two_rank_group_broadcasts_every_bucket_from_rank_0():
    tensors = {"a": torch.randn(40), "b": torch.randn(3, 3).to(torch.bfloat16), "c": torch.randn(100)}
    buckets = plan_buckets([(n, t.shape, t.dtype) for n, t in tensors.items()], bucket_bytes=300)
    assert [[s.name for s in b] for b in buckets] == [["a", "b"], ["c"]]  # 256 + 18 <= 300 < 256 + 18 + 400
    port, received = free_port(), {}

    def engine_rank():
        group = open_group(open_store("127.0.0.1", port, 1, 2, 30), 1, 2, "gloo", 30)
        for named in receive_buckets(group, buckets, "cpu"):
            received.update((name, t.clone()) for name, t in named)

    thread = threading.Thread(target=engine_rank)
    thread.start()
    group = open_group(open_store("127.0.0.1", port, 0, 2, 30), 0, 2, "gloo", 30)
    for bucket in buckets:
        broadcast_bucket(group, pack_bucket(bucket, [tensors[s.name] for s in bucket]))
    thread.join(30)
    assert set(received) == set(tensors)
    assert all(torch.equal(received[name], tensors[name]) for name in tensors)


# ------------------------------------------------------------------------------------------- the factory


def test_every_configurable_channel_is_registered():
    from typing import get_args

    from resetrl.config import LearnerConfig
    from resetrl.weights import WEIGHT_CHANNELS

    assert sorted(get_args(LearnerConfig.model_fields["weight_channel"].annotation)) == WEIGHT_CHANNELS.names()


def test_the_config_names_the_channel(redis_client, tmp_path):
    keys = RunKeys("factory")
    cfg = RunConfig()
    assert cfg.learner.weight_channel == "shared_folder"
    assert isinstance(make_weight_channel(cfg, "engine", redis_client, keys, tmp_path), SharedFolderWeightReceiver)
    cfg = RunConfig.model_validate({"learner": {"weight_channel": "nccl"}, "rollout": {"num_workers": 2}})
    learner = make_weight_channel(cfg, "learner", redis_client, keys, tmp_path)
    engine = make_weight_channel(cfg, "engine", redis_client, keys, tmp_path, worker_index=1)
    assert isinstance(learner, NcclWeightChannel) and isinstance(engine, NcclWeightReceiver)
    assert (learner.rank, engine.rank, engine.world_size) == (0, 2, 3)
    with pytest.raises(ValueError, match="elastic workers beyond rollout.num_workers need"):
        make_weight_channel(cfg, "engine", redis_client, keys, tmp_path, worker_index=2)


# ------------------------------------------------------------------------------------------- nccl channel (gloo)


def test_broadcast_update_makes_the_engine_generate_what_the_learner_generates(redis_client, tiny_path):
    keys = RunKeys("nccl-cpu")
    learner_model = make_engine("hf", str(tiny_path))
    engine = make_engine("hf", str(tiny_path))
    before = greedy_tokens(engine)
    sender = NcclWeightChannel(redis_client, keys, rank=0, world_size=2, bucket_bytes=64 * 1024,
                               join_timeout_s=60, backend="gloo", host="127.0.0.1")
    receiver = NcclWeightReceiver(redis_client, keys, rank=1, world_size=2, join_timeout_s=60)
    outcomes, held = [], [0]

    def engine_loop(version: int):  # the rollout actor's sync_weights, between batches, until it holds `version`
        deadline = time.monotonic() + 60
        while held[0] < version and time.monotonic() < deadline:
            time.sleep(0.01)
            latest = receiver.latest()
            if latest is not None and latest[0] > held[0]:
                outcomes.append(receiver.load_into(engine, *latest))
                held[0] = latest[0]

    for version in (1, 2):  # the second update reuses the group built for the first
        thread = threading.Thread(target=engine_loop, args=(version,))
        thread.start()
        perturb(learner_model, seed=version)
        sender.publish_module(learner_model.model, version)
        thread.join(60)
        assert outcomes[-1] is True
        assert greedy_tokens(engine) == greedy_tokens(learner_model)
    assert greedy_tokens(engine) != before

    stats = read_stats(redis_client, keys)
    model_bytes = sum(t.numel() * t.element_size() for t in learner_model.model.parameters())
    assert stats["weight_syncs"] == 2 and stats["weight_sync_bytes"] == 2 * model_bytes
    assert stats["weight_sync_seconds"] > 0
    assert redis_client.hget(f"{keys.weights}:engines", "1") == b"2"  # the version the engine holds
    assert receiver.latest()[0] == 2


def test_an_update_no_engine_joins_is_called_off_and_the_engine_keeps_its_weights(redis_client, tiny_path):
    keys = RunKeys("nccl-abandon")
    learner_model = make_engine("hf", str(tiny_path))
    sender = NcclWeightChannel(redis_client, keys, rank=0, world_size=2, join_timeout_s=1, backend="gloo",
                               host="127.0.0.1")
    sender.publish_module(learner_model.model, 1)  # nobody joins within 1 s
    assert read_stats(redis_client, keys)["weight_updates_abandoned"] == 1

    engine = make_engine("hf", str(tiny_path))
    before = greedy_tokens(engine)
    receiver = NcclWeightReceiver(redis_client, keys, rank=1, world_size=2, join_timeout_s=1)
    version, location = receiver.latest()
    assert receiver.load_into(engine, version, location) is False  # at once: no wait for a go that never comes
    assert greedy_tokens(engine) == before


def test_a_stopping_run_calls_the_update_off(redis_client, tiny_path):
    keys = RunKeys("nccl-stop")
    request_stop(redis_client, keys)
    sender = NcclWeightChannel(redis_client, keys, rank=0, world_size=2, join_timeout_s=600, backend="gloo")
    sender.publish(make_engine("hf", str(tiny_path)).model.state_dict(), 1)  # returns at once, not after 600 s
    assert read_stats(redis_client, keys)["weight_updates_abandoned"] == 1


# ------------------------------------------------------------------------------------------- Ray object store


@pytest.fixture(scope="module")
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Ray workers cannot import this test module: ship _EngineActor by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    if started:
        ray.shutdown()


class _EngineActor:
    """A rollout engine on the other side of Ray: its own process, fetching through the channel as an actor does."""

    def __init__(self, model_path: str, redis_url: str, run_name: str, root: str):
        from resetrl.queue import connect

        self.engine = make_engine("hf", model_path)
        self.channel = RayObjectStoreWeightReceiver(root, connect(redis_url), RunKeys(run_name))

    def sync(self) -> int | None:
        latest = self.channel.latest()
        if latest is None or not self.channel.load_into(self.engine, *latest):
            return None
        return latest[0]

    def greedy(self) -> list[list[int]]:
        return greedy_tokens(self.engine)


def test_object_store_update_makes_a_remote_engine_generate_what_the_learner_generates(
    local_ray, redis_server, redis_client, tiny_path, tmp_path
):
    keys = RunKeys("ray-weights")
    learner_model = make_engine("hf", str(tiny_path))
    channel = RayObjectStoreWeightChannel(tmp_path, redis_client, keys, keep=2)
    actor = local_ray.remote(num_cpus=1)(_EngineActor).remote(str(tiny_path), redis_server.url, keys.run_name,
                                                              str(tmp_path / "engine"))
    before = local_ray.get(actor.greedy.remote())
    assert before == greedy_tokens(learner_model)

    perturb(learner_model)
    location = channel.publish(learner_model.model.state_dict(), 1)
    assert location.startswith("ray://") and channel.latest() == (1, location)
    assert local_ray.get(actor.sync.remote()) == 1
    after = local_ray.get(actor.greedy.remote())
    assert after == greedy_tokens(learner_model) and after != before

    stats = read_stats(redis_client, keys)
    assert stats["weight_syncs"] == 1 and stats["weight_sync_bytes"] > 0
    assert list((tmp_path / "engine").iterdir()) == []  # the engine's fetched copy is gone once loaded
    local_ray.kill(actor)
    channel.close()


def test_object_store_keeps_only_the_newest_versions(local_ray, redis_client, tiny_path, tmp_path):
    keys = RunKeys("ray-keep")
    state = make_engine("hf", str(tiny_path)).model.state_dict()
    channel = RayObjectStoreWeightChannel(tmp_path, redis_client, keys, keep=2)
    for version in (1, 2, 3):
        channel.publish(state, version)
    engine = make_engine("hf", str(tiny_path))
    receiver = RayObjectStoreWeightReceiver(tmp_path, redis_client, keys)
    assert receiver.load_into(engine, 1, "ray://old") is False  # pruned: the engine asks latest() again
    assert receiver.load_into(engine, 3, receiver.latest()[1]) is True
    channel.close()
