"""Cores that follow the work (resetrl/thread_budget.py), with a real redis-server: a rollout worker's lease takes
its threads from the learner while it generates and gives them back after; explicit settings win; the learner's
thread counts are measured (torch.get_num_threads) and reported with each step."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from resetrl.run_state import RunKeys
from resetrl.thread_budget import (
    LEASE_S, CpuSample, ThreadBudget, busy_elsewhere, cpu_sample, host_cores, learner_threads, rollout_threads,
)

KEYS = RunKeys("threads")


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    # A vLLM CPU worker that ran in this pytest process (tests/test_engines.py) replaces torch.set_num_threads with a
    # no-op that warns; these tests are about resetrl's budget, so they get torch's own function back.
    monkeypatch.setattr(torch, "set_num_threads", torch._C.set_num_threads)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_learner_takes_the_cores_busy_rollout_workers_leave():
    assert learner_threads(4, []) == 4
    assert learner_threads(4, [1]) == 3
    assert learner_threads(4, [2, 1]) == 1
    assert learner_threads(2, [1, 1]) == 1  # never fewer than one
    # processes outside the run: their busy cores, less what the busy workers claim, rounded half up
    assert learner_threads(2, [], busy_elsewhere=1.46) == 1
    assert learner_threads(4, [1], busy_elsewhere=1.4) == 3  # 0.4 of a core outside the run: not a core
    assert learner_threads(4, [1], busy_elsewhere=1.6) == 2
    assert learner_threads(2, [], busy_elsewhere=0.3) == 2
    assert rollout_threads(None, 0.5) == 1 and rollout_threads(None, 1.5) == 2 and rollout_threads(3, 0.5) == 3
    assert host_cores() >= 1


def test_busy_cores_elsewhere_are_the_hosts_busy_time_less_this_process(redis_client):
    before, after = CpuSample(wall=10.0, host_busy=100.0, own=5.0), CpuSample(wall=12.0, host_busy=103.5, own=6.5)
    assert busy_elsewhere(before, after) == pytest.approx((3.5 - 1.5) / 2)  # 1 core busy in other processes
    sample = cpu_sample(host_cores())
    if sample is not None:  # /proc/stat describes this process's cores
        assert sample.host_busy > 0 and sample.own > 0
    assert cpu_sample(host_cores() + 1) is None  # a container on a larger host: no outside load assumed
    # a budget sampling an outside process that keeps 1.2 cores busy (2.4 CPU seconds in 2 s) leaves itself 3 of 4
    samples = iter([CpuSample(wall=-10.0, host_busy=0.0, own=0.0), CpuSample(wall=-8.0, host_busy=2.4, own=0.0)])
    budget = ThreadBudget(redis_client, KEYS, "learner-0", cores=4, host="h", load=lambda cores: next(samples))
    assert budget.refresh(force=True) == 4  # one sample: nothing measured yet
    assert budget.refresh(force=True) == 3 and budget.elsewhere == pytest.approx(1.2)


def test_a_rollout_lease_takes_its_threads_from_the_learner_and_gives_them_back(redis_client):
    # leases only (the outside load is tested above): this test must not depend on what else runs here
    learner = ThreadBudget(redis_client, KEYS, "learner-0", cores=2, host="h", load=None)
    rollout = ThreadBudget(redis_client, KEYS, "rollout-0", cores=2, fixed=1, host="h")
    assert learner.refresh(force=True) == 2 and torch.get_num_threads() == 2
    with rollout.busy():
        assert learner.refresh(force=True) == 1 and torch.get_num_threads() == 1
    assert learner.refresh(force=True) == 2 and torch.get_num_threads() == 2
    assert learner.take_used() == [1, 2]
    # a lease on another host, or one left by a killed worker past its expiry, does not count
    redis_client.hset(f"{KEYS.prefix}:cpu:other-host", "rollout-1", f"1 {time.time() + LEASE_S}")
    redis_client.hset(f"{KEYS.prefix}:cpu:h", "rollout-2", f"1 {time.time() - 1}")
    assert learner.refresh(force=True) == 2


def test_explicit_threads_win(redis_client):
    rollout = ThreadBudget(redis_client, KEYS, "rollout-0", cores=4, fixed=2, host="h")
    learner = ThreadBudget(redis_client, KEYS, "learner-0", cores=4, fixed=1, host="h")
    assert torch.get_num_threads() == 1
    with rollout.busy():
        assert learner.refresh(force=True) == 1
    assert learner.refresh(force=True) == 1 and learner.take_used() == [1]
    learner.restore()
    assert torch.get_num_threads() == learner.initial


def test_a_lease_that_starts_mid_forward_takes_effect_at_the_next_layer(redis_client, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    learner = ThreadBudget(redis_client, KEYS, "learner-0", cores=2, host="h", load=None)
    rollout = ThreadBudget(redis_client, KEYS, "rollout-0", cores=2, fixed=1, host="h")
    learner.refresh_in_layers(model)
    learner.refresh(force=True)
    lease = rollout.busy()

    def rollout_starts(*_):  # between layer 0 and layer 1, once REFRESH_S has passed
        lease.__enter__()
        learner._next_refresh = 0.0

    model.model.layers[1].register_forward_pre_hook(rollout_starts, prepend=True)
    torch.set_num_threads(2)
    learner.take_used()
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    assert learner.take_used() == [1, 2] and torch.get_num_threads() == 1
    lease.__exit__(None, None, None)


def test_a_learner_step_reports_the_threads_it_ran_with(redis_server, redis_client, tiny_model_dir, tmp_path):
    from resetrl.config import config_from_dict
    from resetrl.learner.learner import Learner
    from resetrl.queue import StreamQueue
    from resetrl.record import ExperienceRecord, encode_experience
    from resetrl.run_state import EXPERIENCE_GROUP

    cfg = config_from_dict({"run_name": "threads", "rollout": {"group_size": 2, "max_new_tokens": 4},
                            "learner": {"prompts_per_step": 1, "lr": 1e-3, "read_block_ms": 100}})
    learner = Learner(cfg, str(tiny_model_dir), redis_server.url, weights_root=str(tmp_path / "w"))
    learner.threads.load = None  # leases only: the count must not depend on what else runs on this machine
    rollout = ThreadBudget(redis_client, KEYS, "rollout-0", cores=host_cores(), fixed=1)
    queue = StreamQueue(redis_client, KEYS.experience, EXPERIENCE_GROUP, "producer")

    def step(version: int) -> dict:
        records = []
        for i in range(2):
            ids = np.arange(1, 9, dtype=np.int32) + i
            mask = (np.arange(8) >= 4).astype(np.uint8)
            records.append(ExperienceRecord(
                record_id=f"{version}-{i}", prompt_id=f"p{version}", group_id=f"p{version}", method="grpo",
                policy_version=version, token_ids=ids, prompt_length=4, loss_mask=mask,
                advantages=(mask * (1.0 - 2 * i)).astype(np.float32),
                behaviour_logprobs=(mask * -5.7).astype(np.float32), reward=float(i), temperature=1.0))
        queue.put_many([encode_experience(r) for r in records])
        return learner.train_step(timeout_s=60)

    try:
        cores = host_cores()
        metrics = step(0)  # no rollout busy: every core
        assert metrics["learner_threads_min"] == metrics["learner_threads_max"] == cores
        with rollout.busy():
            metrics = step(1)
        assert metrics["learner_threads_min"] == metrics["learner_threads_max"] == max(1, cores - 1)
    finally:
        learner.close()
