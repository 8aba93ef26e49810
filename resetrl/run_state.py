"""Names of a run's Redis keys and its shared counters.

Every role finds a run's streams and counters through `RunKeys`, so two runs can share one Redis.
Counters live in one hash (`stats`) so `resetrl status` and the summary read them in one call.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

PROMPT_GROUP = "rollout"
EXPERIENCE_GROUP = "learner"


@dataclass(frozen=True)
class RunKeys:
    run_name: str

    @property
    def prefix(self) -> str:
        return f"resetrl:{self.run_name}"

    @property
    def prompts(self) -> str:
        return f"{self.prefix}:prompts"

    @property
    def experience(self) -> str:
        return f"{self.prefix}:experience"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def stop(self) -> str:
        return f"{self.prefix}:stop"

    @property
    def weights(self) -> str:
        """A hash {version, path} naming the newest published weights."""
        return f"{self.prefix}:weights"

    @property
    def learner_version(self) -> str:
        return f"{self.prefix}:learner_version"

    @property
    def prompts_dropped_stale(self) -> str:
        """A set of the prompt ids whose records the learner dropped as stale (for the accounting)."""
        return f"{self.prefix}:prompts_dropped_stale"

    @property
    def prompts_fed(self) -> str:
        """How many prompts the driver has fed: the data cursor a resumed driver continues from."""
        return f"{self.prefix}:prompts_fed"

    @property
    def desired_workers(self) -> str:
        """The rollout worker count `resetrl scale` asks for; the driver reconciles the pool to it."""
        return f"{self.prefix}:desired_workers"

    @property
    def worker_count(self) -> str:
        """A gauge: rollout workers the driver runs now (retiring ones not counted)."""
        return f"{self.prefix}:worker_count"

    @property
    def retiring(self) -> str:
        """A set of the worker indices asked to finish their pending prompts and exit."""
        return f"{self.prefix}:retiring"

    @property
    def workers(self) -> str:
        """A hash: worker index -> JSON heartbeat {policy_version, prompts, samples, tokens, ..., last_seen, state}."""
        return f"{self.prefix}:workers"

    @property
    def started_at(self) -> str:
        """Unix time the run's train loop started (throughput in `resetrl status`)."""
        return f"{self.prefix}:started_at"


def incr_stats(client: redis.Redis, keys: RunKeys, **amounts: float) -> None:
    # HINCRBYFLOAT for every counter: it also adds to a field holding an integer, whereas HINCRBY fails on one
    # that ever received a fraction (read_stats turns whole values back into ints).
    pipe = client.pipeline(transaction=False)
    for name, amount in amounts.items():
        pipe.hincrbyfloat(keys.stats, name, float(amount))
    pipe.execute()


def read_stats(client: redis.Redis, keys: RunKeys) -> dict[str, float]:
    raw = client.hgetall(keys.stats)
    stats = {}
    for name, value in raw.items():
        number = float(value)
        stats[name.decode()] = int(number) if number.is_integer() else number
    return stats


def stop_requested(client: redis.Redis, keys: RunKeys) -> bool:
    return bool(client.exists(keys.stop))


def request_stop(client: redis.Redis, keys: RunKeys) -> None:
    client.set(keys.stop, b"1")


def retire_requested(client: redis.Redis, keys: RunKeys, worker_index: int) -> bool:
    return bool(client.sismember(keys.retiring, str(worker_index)))


def request_retire(client: redis.Redis, keys: RunKeys, worker_index: int) -> None:
    client.sadd(keys.retiring, str(worker_index))


def set_desired_workers(client: redis.Redis, keys: RunKeys, count: int) -> None:
    if count < 1:
        raise ValueError(f"a run needs at least 1 rollout worker (asked for {count})")
    client.set(keys.desired_workers, count)


def desired_workers(client: redis.Redis, keys: RunKeys) -> int | None:
    raw = client.get(keys.desired_workers)
    return int(raw) if raw is not None else None


def start_worker_pool(client: redis.Redis, keys: RunKeys, count: int) -> None:
    """A (resumed) run's pool starts at `count`: retire flags and heartbeats of an earlier driver go."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.retiring, keys.workers)
    pipe.set(keys.desired_workers, count)
    pipe.execute()


def set_worker_count(client: redis.Redis, keys: RunKeys, count: int) -> None:
    client.set(keys.worker_count, count)


def forget_worker(client: redis.Redis, keys: RunKeys, worker_index: int) -> None:
    """A worker that has left the pool: no retire flag, no line in `resetrl status`."""
    pipe = client.pipeline(transaction=True)
    pipe.srem(keys.retiring, str(worker_index))
    pipe.hdel(keys.workers, str(worker_index))
    pipe.execute()


def write_heartbeat(client: redis.Redis, keys: RunKeys, worker_index: int, **fields) -> None:
    client.hset(keys.workers, str(worker_index), json.dumps({**fields, "last_seen": time.time()}))


def read_heartbeats(client: redis.Redis, keys: RunKeys) -> dict[int, dict]:
    return {int(index): json.loads(value) for index, value in client.hgetall(keys.workers).items()}
