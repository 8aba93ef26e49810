"""Redis Streams queues: the only module that speaks Redis (besides the run-state keys in run_state.py).

A `StreamQueue` is one stream plus one consumer group. Producers XADD encoded records; consumers XREADGROUP
them, and XACK (then XDEL) only once the record has been fully used, so a crash replays, never loses: entries
a dead consumer left pending are taken over with XAUTOCLAIM after they have been idle for a while. Because
acknowledged entries are deleted, XLEN is the queue depth: entries waiting plus entries being worked on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

PAYLOAD_FIELD = b"r"


@dataclass
class StreamEntry:
    entry_id: str
    payload: bytes


def connect(url: str) -> redis.Redis:
    """A client that retries lost connections with backoff instead of failing the first call."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        decode_responses=False,
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )


class StreamQueue:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str):
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def put(self, payload: bytes) -> str:
        return self.client.xadd(self.stream, {PAYLOAD_FIELD: payload}).decode()

    def put_many(self, payloads: list[bytes]) -> list[str]:
        """Add several entries in one round trip (MULTI/EXEC, so a group stays contiguous in the stream)."""
        pipe = self.client.pipeline(transaction=True)
        for payload in payloads:
            pipe.xadd(self.stream, {PAYLOAD_FIELD: payload})
        return [entry_id.decode() for entry_id in pipe.execute()]

    def read(self, count: int, block_ms: int | None = None, pending: bool = False) -> list[StreamEntry]:
        """New entries for this consumer (or, with pending=True, the ones it already holds unacknowledged)."""
        start = "0" if pending else ">"
        reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count, block=block_ms)
        entries = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                # A pending entry that was deleted meanwhile comes back with no fields: nothing to do with it.
                if fields:
                    entries.append(StreamEntry(entry_id.decode(), fields.get(PAYLOAD_FIELD, b"")))
        return entries

    def ack(self, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *entry_ids)
        pipe.xdel(self.stream, *entry_ids)
        pipe.execute()

    @property
    def dead_stream(self) -> str:
        return f"{self.stream}:dead"

    def dead_letter(self, entries: list[StreamEntry], reasons: list[str], max_len: int = 10_000) -> None:
        """Move entries that can never be used (wrong format version, corrupt bytes) to `<stream>:dead`.

        Each is copied there with its reason, source id and consumer, then acknowledged and deleted, in one
        transaction: a poison entry is kept for a person to inspect, never redelivered, never lost. The dead
        stream is capped (approximately) at max_len entries so a flood of garbage cannot fill Redis.
        """
        if not entries:
            return
        pipe = self.client.pipeline(transaction=True)
        for entry, reason in zip(entries, reasons):
            pipe.xadd(
                self.dead_stream,
                {PAYLOAD_FIELD: entry.payload, b"reason": reason.encode("utf-8", "replace")[:1000],
                 b"source_id": entry.entry_id.encode(), b"consumer": self.consumer.encode()},
                maxlen=max_len, approximate=True,
            )
        ids = [entry.entry_id for entry in entries]
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.execute()

    def dead_letters(self, count: int = 100) -> list[dict]:
        """The newest dead-lettered entries, oldest first: {reason, source_id, consumer, payload}."""
        items = self.client.xrevrange(self.dead_stream, count=count)
        return [
            {"reason": f.get(b"reason", b"").decode(), "source_id": f.get(b"source_id", b"").decode(),
             "consumer": f.get(b"consumer", b"").decode(), "payload": f.get(PAYLOAD_FIELD, b"")}
            for _id, f in reversed(items)
        ]

    def reclaim(self, min_idle_ms: int, count: int = 100) -> list[StreamEntry]:
        """Take over entries other consumers have held unacknowledged for at least min_idle_ms."""
        reply = self.client.xautoclaim(self.stream, self.group, self.consumer, min_idle_ms, "0-0", count=count)
        # redis-py returns [next_id, entries] (Redis 6.2) or [next_id, entries, deleted_ids] (Redis 7).
        entries = reply[1] if reply else []
        return [StreamEntry(entry_id.decode(), fields.get(PAYLOAD_FIELD, b"")) for entry_id, fields in entries if fields]

    def depth(self) -> int:
        return int(self.client.xlen(self.stream))

    def pending_count(self) -> int:
        return int(self.client.xpending(self.stream, self.group)["pending"])

    def consumers(self) -> dict[str, int]:
        """The group's consumer names and how many entries each holds unacknowledged."""
        return {info["name"].decode() if isinstance(info["name"], bytes) else info["name"]: int(info["pending"])
                for info in self.client.xinfo_consumers(self.stream, self.group)}

    def remove_consumer(self, consumer: str) -> int:
        """Delete `consumer` from the group if it holds nothing; returns what it still holds (0 once removed).

        XGROUP DELCONSUMER drops the consumer's pending entries with it, so one that still holds some is kept:
        the live consumers reclaim those (XAUTOCLAIM) once they have been idle long enough.
        """
        held = self.consumers().get(consumer)
        if held is None:
            return 0
        if held == 0:
            self.client.xgroup_delconsumer(self.stream, self.group, consumer)
        return held


def wait_for_redis(client: redis.Redis, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
