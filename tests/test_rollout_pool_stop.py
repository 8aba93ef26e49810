"""The end of a run does not fail on a rollout worker still in the middle of a long batch.

Found by the SmolLM2 SRPO benchmark run: the run reached its token budget, asked the workers to stop, and one was
still generating a localisation (up to 4096 tokens on a CPU); `RolloutPool.wait_stopped` raised Ray's
GetTimeoutError after 120 s and the finished run ended in a traceback (exit 1). A worker's own error must still
be the run's error. Real local Ray and redis-server.
"""

from __future__ import annotations

import sys
import time

import pytest
import ray

from resetrl.launch.rollout_pool import RolloutPool
from resetrl.queue import StreamQueue
from resetrl.run_state import PROMPT_GROUP, RunKeys


class _Worker:
    """A rollout actor's surface as the pool uses it: pid, engine_name, run (here: busy for `busy_s`, or failing)."""

    def __init__(self, busy_s: float, fail: bool = False):
        self.busy_s, self.fail = busy_s, fail

    def pid(self) -> int:
        import os

        return os.getpid()

    def engine_name(self) -> str:
        return "test"

    def run(self) -> dict:
        time.sleep(self.busy_s)
        if self.fail:
            raise RuntimeError("the worker's own error")
        return {"prompts": 0}


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    yield
    if started:
        ray.shutdown()


def _pool(redis_client, name: str, busy_s: list[float], fail: bool = False) -> tuple[RolloutPool, list[str]]:
    said: list[str] = []
    actor = ray.remote(num_cpus=0)(_Worker)
    keys = RunKeys(name)
    queue = StreamQueue(redis_client, keys.prompts, PROMPT_GROUP, "driver")
    queue.ensure_group()
    pool = RolloutPool(lambda index: actor.remote(busy_s[index], fail), redis_client, keys, queue, say=said.append)
    pool.start(len(busy_s))
    return pool, said


def test_a_worker_still_mid_batch_is_left_to_the_shutdown(local_ray, redis_client):
    pool, said = _pool(redis_client, "stop-mid-batch", busy_s=[0.0, 60.0])
    started = time.monotonic()
    assert pool.wait_stopped(timeout_s=3) == 1
    assert time.monotonic() - started < 30
    assert any("1 rollout worker(s) still mid-batch" in line for line in said)
    for handle in pool.handles:
        ray.kill(handle)


def test_a_workers_own_error_is_still_the_runs_error(local_ray, redis_client):
    pool, _ = _pool(redis_client, "stop-error", busy_s=[0.0], fail=True)
    with pytest.raises(ray.exceptions.RayTaskError, match="the worker's own error"):
        pool.wait_stopped(timeout_s=30)
    for handle in pool.handles:
        ray.kill(handle)
