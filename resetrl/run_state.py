"""Names of a run's Redis keys and its shared counters.

Every role finds a run's streams and counters through `RunKeys`, so two runs can share one Redis.
Counters live in one hash (`stats`) so `resetrl status` and the summary read them in one call.
"""

from __future__ import annotations

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
