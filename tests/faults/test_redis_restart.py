"""Redis restarted under the roles (AOF on): queued and pending entries survive; clients reconnect with backoff.

A real redis-server (embedded, appendonly yes, appendfsync everysec) is SIGKILLed and started again on the same
port while a producer and a learner are using it; the driver's supervisor (EmbeddedRedis.supervise) does the
restart by itself, or, without the AOF, says what was lost. The full run with a restart mid-training is
test_kill_and_resume.py::test_redis_restart_mid_run (slow).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from resetrl.config import ModelConfig, config_from_dict
from resetrl.learner.learner import Learner
from resetrl.models import resolve_model
from resetrl.queue import StreamQueue, connect
from resetrl.record import ExperienceRecord, encode_experience
from resetrl.launch.redis_server import EmbeddedRedis
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys, read_stats


@pytest.fixture()
def durable_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", durable=True).start()
    yield server
    server.stop()


def restart_later(server: EmbeddedRedis, down_s: float) -> threading.Thread:
    def bring_back():
        time.sleep(down_s)
        server.start()

    thread = threading.Thread(target=bring_back)
    thread.start()
    return thread


def test_entries_and_pending_survive_a_crash_and_a_call_during_the_outage_succeeds(durable_redis):
    client = connect(durable_redis.url)
    queue = StreamQueue(client, "s", "g", "a")
    queue.ensure_group()
    queue.put_many([str(i).encode() for i in range(100)])
    held = queue.read(count=10)  # pending for consumer a
    time.sleep(1.5)  # appendfsync everysec: what a crash may lose is the last second
    durable_redis.kill()

    started = time.monotonic()
    back = restart_later(durable_redis, down_s=2.0)
    entry_id = queue.put(b"written during the outage")  # blocks, retries with backoff, succeeds
    recovery_s = time.monotonic() - started
    back.join()
    assert entry_id and 2.0 <= recovery_s < 15
    assert queue.depth() == 101 and queue.pending_count() == 10
    replayed = queue.read(count=100, pending=True)
    assert [e.entry_id for e in replayed] == [e.entry_id for e in held]
    assert len(queue.read(count=1000)) == 91


def test_a_learner_carries_on_across_a_redis_restart(durable_redis, tmp_path):
    tiny = resolve_model(ModelConfig(name="tiny-llama"))
    cfg = config_from_dict({
        "run_name": "restart", "run_dir": str(tmp_path / "run"), "model": {"name": "tiny-llama"},
        "rollout": {"group_size": 2},
        "learner": {"prompts_per_step": 1, "micro_batch_size": 2, "read_block_ms": 200},
    })
    keys = RunKeys("restart")
    learner = Learner(cfg, str(tiny), durable_redis.url, weights_root=str(tmp_path / "w"))
    client = connect(durable_redis.url)
    producer = StreamQueue(client, keys.experience, EXPERIENCE_GROUP, "producer")

    def group(step):
        return [encode_experience(ExperienceRecord(
            record_id=f"s{step}-{i}", prompt_id=f"p{step}", group_id=f"g{step}", method="grpo", policy_version=0,
            token_ids=np.array([1, 2, 3, 4, 5], dtype=np.int32), prompt_length=2,
            loss_mask=np.array([0, 0, 1, 1, 1], dtype=np.uint8),
            advantages=np.array([0, 0, 1, 1, 1], dtype=np.float32) * (1 if i else -1),
            behaviour_logprobs=np.array([0, 0, -10, -10, -10], dtype=np.float32), reward=float(i), temperature=1.0,
        )) for i in range(2)]

    producer.put_many(group(1))
    assert learner.train_step(timeout_s=60)["step"] == 1
    time.sleep(1.5)
    durable_redis.kill()
    back = restart_later(durable_redis, down_s=2.0)
    started = time.monotonic()
    metrics = learner.train_step(timeout_s=1)  # runs into the outage: reconnects, finds nothing new yet
    assert metrics is None
    back.join()
    producer.put_many(group(2))
    assert learner.train_step(timeout_s=60)["step"] == 2
    recovery_s = time.monotonic() - started
    assert recovery_s < 20
    stats = read_stats(client, keys)
    assert stats["learner_steps"] == 2 and stats["samples_trained"] == 4
    assert producer.depth() == 0
    learner.close()


def _kill_externally(server: EmbeddedRedis) -> None:
    """SIGKILL from outside the driver's code (the OOM killer, a person): only the supervisor notices."""
    os.kill(server.process.pid, signal.SIGKILL)


def _wait_for(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


def test_the_supervisor_restarts_a_dead_durable_server_on_its_port_from_its_aof(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", durable=True).start()
    events = []
    server.supervise(say=events.append)
    try:
        client = connect(server.url)
        queue = StreamQueue(client, "s", "g", "a")
        queue.ensure_group()
        queue.put_many([b"1", b"2"])
        time.sleep(1.5)  # appendfsync everysec
        port, pid = server.port, server.process.pid
        _kill_externally(server)
        _wait_for(lambda: server.restarts)
        assert server.port == port and server.process.pid != pid and server.lost is None
        assert queue.depth() == 2  # the same URL, the same data: the client reconnects with its backoff
        assert server.restarts[0]["exit_code"] == -signal.SIGKILL and server.restarts[0]["restart_seconds"] < 5
        assert events and f"restarted on port {port}" in events[0]
    finally:
        server.stop()
    time.sleep(0.5)
    assert server.process is None and len(server.restarts) == 1  # stop() is final: nothing restarted after it


def test_a_dead_server_without_aof_is_reported_lost_not_restarted(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", durable=False).start()
    events = []
    server.supervise(say=events.append)
    try:
        _kill_externally(server)
        _wait_for(lambda: server.lost)
        assert server.restarts == [] and not server.alive()
        assert "queue.durable is false" in server.lost and "queues" in server.lost and events == [server.lost]
    finally:
        server.stop()
