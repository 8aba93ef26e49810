# Over 400 lines: every Redis key of a run besides the streams, in one place (with queue.py, the only modules that speak Redis).
"""Names of a run's Redis keys, and every read and write of them outside the streams (resetrl/queue.py).

Every role finds a run's streams and counters through `RunKeys`, so two runs can share one Redis.
Counters live in one hash (`stats`) so `resetrl status` and the summary read them in one call. Besides the
counters: the run's life (stop flag, start time, data cursor), the ledger of fed prompt ids, the rollout pool
(wanted count, retire flags, heartbeats), the published weights and the nccl weight channel's per-version
handshake (resetrl/weights/nccl.py).

The ledger (docs/design.md, "Reliability contract") is written only together with the stream operations that settle a prompt
(resetrl/queue.py: feed, complete, ack, dead_letter); here it is read. It does not trust the learner's dedupe: a
second attempt to settle a prompt id (another processing trained it too, say) is counted, never overwrites.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from resetrl.queue import FED, TERMINAL_STATES, LedgerKeys, stream_payloads
from resetrl.record import WireFormatError, decode_experience, decode_prompt

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
    def ledger_keys(self) -> LedgerKeys:
        """The ledger: one terminal state per fed prompt id, set once (resetrl/queue.py LedgerKeys)."""
        return LedgerKeys(states=f"{self.prefix}:ledger", counts=f"{self.prefix}:ledger:counts",
                          second_attempts=f"{self.prefix}:ledger:second_attempts", open=f"{self.prefix}:ledger:open")

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
    def finish(self) -> str:
        """Set by `resetrl stop`: the train loop ends after its current step, as it does at total_steps."""
        return f"{self.prefix}:finish"

    def cpu_leases(self, host: str) -> str:
        """A hash per host: role -> "threads expiry" (resetrl/thread_budget.py: CPU-only hosts share their cores)."""
        return f"{self.prefix}:cpu:{host}"

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


def finish_requested(client: redis.Redis, keys: RunKeys) -> bool:
    return bool(client.exists(keys.finish))


def request_finish(client: redis.Redis, keys: RunKeys) -> None:
    client.set(keys.finish, b"1")


def live_cpu_leases(client: redis.Redis, keys: RunKeys, host: str, now: float) -> dict[str, int]:
    """Role -> torch threads of every lease on `host` that has not expired by `now`."""
    live = {}
    for role, value in client.hgetall(keys.cpu_leases(host)).items():
        threads, expiry = value.decode().split()
        if float(expiry) > now:
            live[role.decode()] = int(threads)
    return live


def hold_cpu_lease(client: redis.Redis, keys: RunKeys, host: str, role: str, threads: int, expiry: float) -> None:
    client.hset(keys.cpu_leases(host), role, f"{threads} {expiry}")


def drop_cpu_lease(client: redis.Redis, keys: RunKeys, host: str, role: str) -> None:
    client.hdel(keys.cpu_leases(host), role)


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


# ---------------------------------------------------------------------------------------------- the run itself


def wipe_run(client: redis.Redis, keys: RunKeys) -> None:
    """A fresh run starts from empty streams and counters: every key of the run goes."""
    for key in client.scan_iter(match=f"{keys.prefix}:*"):
        client.delete(key)


def prepare_resume(client: redis.Redis, keys: RunKeys) -> None:
    """A resumed run keeps streams, pending entries and counters; it forgets the stop flag and the published weights
    (the learner republishes its checkpoint's, which may be older than the last ones published)."""
    client.delete(keys.stop, keys.finish, keys.weights, keys.learner_version)


def mark_train_started(client: redis.Redis, keys: RunKeys) -> None:
    """The train loop's start time, for throughput in `resetrl status`; a resumed run keeps the first one."""
    client.set(keys.started_at, time.time(), nx=True)


def train_started_at(client: redis.Redis, keys: RunKeys) -> float | None:
    raw = client.get(keys.started_at)
    return float(raw) if raw is not None else None


def prompts_fed(client: redis.Redis, keys: RunKeys) -> int:
    return int(client.get(keys.prompts_fed) or 0)


def restore_stats(client: redis.Redis, keys: RunKeys, counters: dict[str, float]) -> None:
    """Set counters back to saved values (a resumed learner's counters go back to its checkpoint's)."""
    if counters:
        client.hset(keys.stats, mapping=counters)


def worker_count(client: redis.Redis, keys: RunKeys) -> int | None:
    """The rollout workers the driver runs now; None before its pool has started (or for no such run)."""
    raw = client.get(keys.worker_count)
    return int(raw) if raw is not None else None


# ---------------------------------------------------------------------------------------------------- ledger

# The metadata keys a rollout worker writes into every record of one processing (one `process` call): its tag,
# and how many records the processing made for the record's prompt (the learner knows then when it has them all).
PROCESSING_TAG = "processing"
PROCESSING_RECORDS = "processing_records"


def processing_tag(record) -> str:
    """The processing a record belongs to: its PROCESSING_TAG, else (a record from another writer) its prompt entry,
    the group id up to the first '/'."""
    tag = record.metadata.get(PROCESSING_TAG) if isinstance(record.metadata, dict) else None
    return tag if isinstance(tag, str) and tag else record.group_id.split("/", 1)[0]


def processing_records(record) -> int | None:
    count = record.metadata.get(PROCESSING_RECORDS) if isinstance(record.metadata, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def ledger_states(client: redis.Redis, keys: RunKeys, prompt_ids) -> dict[str, tuple[str, str]]:
    """(terminal state, processing tag) of each prompt id that is settled; fed or unknown ones are left out."""
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        return {}
    found = {}
    for prompt_id, raw in zip(prompt_ids, client.hmget(keys.ledger_keys.states, prompt_ids)):
        if raw is not None and raw.decode() != FED:
            state, _, tag = raw.decode().partition(" ")
            found[prompt_id] = (state, tag)
    return found


def open_prompt_ids(client: redis.Redis, keys: RunKeys) -> set[str]:
    """Fed prompt ids without a terminal state yet: in flight, or lost."""
    return {member.decode() for member in client.smembers(keys.ledger_keys.open)}


def ledger_trained_twice(client: redis.Redis, keys: RunKeys) -> int:
    """Attempts to settle a prompt id as trained that another processing had already trained (must be 0)."""
    return int(client.hget(keys.ledger_keys.second_attempts, "trained>trained") or 0)


def queued_prompt_ids(client: redis.Redis, keys: RunKeys) -> set[str]:
    """Prompt ids of every entry in the prompt and the experience stream: waiting, or being worked on."""
    found = set()
    for stream, decode in ((keys.prompts, decode_prompt), (keys.experience, decode_experience)):
        for payload in stream_payloads(client, stream):
            try:
                found.add(decode(payload).prompt_id)
            except WireFormatError:
                pass  # a poison entry is dead-lettered by its consumer; it names no prompt to count on
    return found


def ledger_summary(client: redis.Redis, keys: RunKeys) -> dict[str, int]:
    """The ledger's account of every fed prompt id: {fed, trained, dropped_stale, dropped_no_signal, dead_lettered,
    in_flight, lost, trained_twice, second_attempts}. A fed prompt id not settled yet is in flight if an entry of
    the prompt or the experience stream names it, else lost; trained_twice counts attempts to settle a prompt id as
    trained that another processing had already trained. None of it comes from the learner's dedupe. Prompt ids
    settle when their experience is acknowledged: with checkpoints on, trained ones once a checkpoint covers them."""
    ledger = keys.ledger_keys
    counts = {name.decode(): int(value) for name, value in client.hgetall(ledger.counts).items()}
    attempts = {name.decode(): int(value) for name, value in client.hgetall(ledger.second_attempts).items()}
    unsettled = open_prompt_ids(client, keys)
    in_flight = len(unsettled & queued_prompt_ids(client, keys)) if unsettled else 0
    return {
        "fed": prompts_fed(client, keys),
        **{state: counts.get(state, 0) for state in TERMINAL_STATES},
        "in_flight": in_flight,
        "lost": len(unsettled) - in_flight,
        "trained_twice": attempts.get("trained>trained", 0),  # as ledger_trained_twice
        "second_attempts": sum(attempts.values()),
    }


# ------------------------------------------------------------------------------------------ published weights


def announce_weights(client: redis.Redis, keys: RunKeys, version: int, location: str) -> None:
    """Policy `version` is to be had at `location` (a folder, or a channel's own address); one transaction, so a
    reader never sees the version of one publication with the location of another."""
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.weights, mapping={"version": version, "path": location})
    pipe.set(keys.learner_version, version)
    pipe.execute()


def published_weights(client: redis.Redis, keys: RunKeys) -> tuple[int, str] | None:
    """(version, location) of the newest announced weights, or None before the first."""
    raw = client.hgetall(keys.weights)
    if not raw:
        return None
    return int(raw[b"version"]), raw[b"path"].decode()


def learner_version(client: redis.Redis, keys: RunKeys) -> int:
    return int(client.get(keys.learner_version) or 0)


# The nccl channel's handshake for one version v (protocol: resetrl/weights/nccl.py), under keys.weights:
# `:update:{v}` the bucket plan (JSON), `:ready:{v}` a list the engines push "rank epoch" to, `:go:{v}:{rank}` a
# list the learner pushes each engine's go (JSON) or "abandon" to, `:called_off` the newest abandoned version,
# `:engines` a hash rank -> version held. Per-version keys outlive any join, then Redis drops them.
WEIGHT_UPDATE_TTL_S = 3600
ABANDON = "abandon"


def _update_key(keys: RunKeys, *parts) -> str:
    return ":".join([keys.weights, *map(str, parts)])


def post_weight_plan(client: redis.Redis, keys: RunKeys, version: int, plan_json: str) -> None:
    client.set(_update_key(keys, "update", version), plan_json, ex=WEIGHT_UPDATE_TTL_S)


def weight_plan(client: redis.Redis, keys: RunKeys, version: int) -> str | None:
    raw = client.get(_update_key(keys, "update", version))
    return raw.decode() if raw is not None else None


def join_weight_update(client: redis.Redis, keys: RunKeys, version: int, rank: int, epoch: str) -> None:
    """Engine `rank`, holding the group of `epoch` ("-" for none), is ready to receive `version`."""
    ready = _update_key(keys, "ready", version)
    client.rpush(ready, f"{rank} {epoch}")
    client.expire(ready, WEIGHT_UPDATE_TTL_S)


def next_ready_engine(client: redis.Redis, keys: RunKeys, version: int,
                      timeout_s: int = 1) -> tuple[int, str] | None:
    """(rank, epoch) of the next engine ready for `version`, or None after timeout_s. Short blocking reads: a
    client's socket timeout must not cut a long BLPOP."""
    popped = client.blpop([_update_key(keys, "ready", version)], timeout=timeout_s)
    if popped is None:
        return None
    rank, epoch = popped[1].decode().split(" ")
    return int(rank), epoch


def send_weight_go(client: redis.Redis, keys: RunKeys, version: int, rank: int, message: str) -> None:
    """Tell engine `rank` to receive `version` (`message`: the group's address, JSON) or ABANDON it."""
    go = _update_key(keys, "go", version, rank)
    client.rpush(go, message)
    client.expire(go, WEIGHT_UPDATE_TTL_S)


def wait_weight_go(client: redis.Redis, keys: RunKeys, version: int, rank: int, timeout_s: int = 1) -> str | None:
    """The learner's answer to engine `rank` for `version` (see send_weight_go), or None after timeout_s."""
    popped = client.blpop([_update_key(keys, "go", version, rank)], timeout=timeout_s)
    return popped[1].decode() if popped is not None else None


def call_off_weight_update(client: redis.Redis, keys: RunKeys, version: int) -> None:
    client.set(_update_key(keys, "called_off"), version)


def called_off_weight_version(client: redis.Redis, keys: RunKeys) -> int | None:
    raw = client.get(_update_key(keys, "called_off"))
    return int(raw) if raw is not None else None


def record_engine_weights(client: redis.Redis, keys: RunKeys, rank: int, version: int) -> None:
    """Engine `rank` now holds `version`."""
    client.hset(_update_key(keys, "engines"), str(rank), version)
