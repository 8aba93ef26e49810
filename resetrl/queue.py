# Over 400 lines: the only module that speaks Redis streams (feed, read, lease, ack, dead-letter, ledger scripts); kept whole on purpose.
"""Redis Streams queues: the only module that speaks Redis (besides the run-state keys in run_state.py).

A `StreamQueue` is one stream plus one consumer group. Producers XADD encoded records; consumers XREADGROUP
them, and XACK (then XDEL) only once the record has been fully used, so a crash replays, never loses: entries
a dead consumer left pending are taken over with XAUTOCLAIM after they have been idle for a while. Because
acknowledged entries are deleted, XLEN is the queue depth: entries waiting plus entries being worked on.

What must happen together happens in one Lua script, which Redis runs atomically (docs/design.md, "Reliability
contract"): the driver's feed and its data cursor (`feed`: a retried call cannot feed twice), a rollout worker's
experience, prompt acks and no-signal ledger marks (`complete`: only while the worker still holds the prompts),
and every ack or dead letter with the ledger marks it settles (`ack`, `dead_letter`). A worker renews its claim on
the prompts it holds (`renew`, XCLAIM ... JUSTID) so that only a dead worker's prompts go idle and are reclaimed.
The ledger (resetrl/run_state.py reads it) gives each fed prompt id one terminal state, set once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

PAYLOAD_FIELD = b"r"
# A fed prompt entry also names its prompt id in a plain field, so a worker that cannot decode the payload (another
# format version, corrupt bytes) can still settle that prompt id in the ledger as dead-lettered, not leave it lost.
PROMPT_ID_FIELD = b"p"

# A fed prompt id's terminal states in the ledger: exactly one per prompt id, set once (LedgerKeys).
TERMINAL_STATES = ("trained", "dropped_stale", "dropped_no_signal", "dead_lettered")
FED = "fed"  # the ledger value of a prompt id fed and not yet settled


@dataclass
class StreamEntry:
    entry_id: str
    payload: bytes
    prompt_id: str | None = None  # a fed prompt entry's PROMPT_ID_FIELD; None elsewhere


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> StreamEntry:
    prompt_id = fields.get(PROMPT_ID_FIELD)
    return StreamEntry(entry_id.decode(), fields.get(PAYLOAD_FIELD, b""),
                       prompt_id.decode("utf-8", "replace") if prompt_id else None)


@dataclass(frozen=True)
class LedgerKeys:
    """The ledger's keys (RunKeys.ledger_keys). `states`: prompt id -> "fed" or "<terminal state> <processing tag>";
    `counts`: terminal state -> prompt ids in it; `second_attempts`: "<old>><new>" -> attempts to settle a prompt id
    already settled otherwise (a different state or another processing); `open`: fed prompt ids not settled yet."""

    states: str
    counts: str
    second_attempts: str
    open: str

    def as_list(self) -> list[str]:
        return [self.states, self.counts, self.second_attempts, self.open]


@dataclass(frozen=True)
class Mark:
    """Settle `prompt_id` in `state` (TERMINAL_STATES), by the processing `tag` (docs/design.md, "Reliability contract")."""

    prompt_id: str
    state: str
    tag: str

    def args(self) -> list[str]:
        if self.state not in TERMINAL_STATES:
            raise ValueError(f"ledger state {self.state!r}: use one of {TERMINAL_STATES}")
        return [self.prompt_id, self.state, self.tag.replace(" ", "_") or "-"]


# The ledger's set-once mark, shared by the scripts below. L: the ledger's keys (LedgerKeys order). A prompt id
# fed (or never seen) takes the state; one already settled the same way (same state, same processing: a replay)
# is left alone; any other attempt is counted in second_attempts as "<old>><new>" and changes nothing.
_MARK = """
local function mark(L, prompt, state, tag)
  local value = state .. ' ' .. tag
  local current = redis.call('HGET', L[1], prompt)
  if (not current) or current == 'fed' then
    redis.call('HSET', L[1], prompt, value)
    redis.call('HINCRBY', L[2], state, 1)
    redis.call('SREM', L[4], prompt)
    return 1
  end
  if current == value then return 0 end
  local old = string.match(current, '^(%S+)')
  redis.call('HINCRBY', L[3], old .. '>' .. state, 1)
  return -1
end
local function marks_from(L, argv, at)
  local n = tonumber(argv[at])
  for i = 0, n - 1 do
    mark(L, argv[at + 1 + 3 * i], argv[at + 2 + 3 * i], argv[at + 3 + 3 * i])
  end
  return at + 1 + 3 * n
end
"""

# KEYS: stream, cursor, ledger (4). ARGV: expected cursor, n, n payloads, n prompt ids. Feeds only if the cursor is
# still where the caller saw it, so a retried call (redis-py retries a command whose reply was lost) feeds nothing.
_FEED = """
redis.replicate_commands()
local cursor = tonumber(redis.call('GET', KEYS[2]) or '0')
if cursor ~= tonumber(ARGV[1]) then return cursor end
local n = tonumber(ARGV[2])
for i = 1, n do
  local prompt = ARGV[2 + n + i]
  redis.call('XADD', KEYS[1], '*', 'r', ARGV[2 + i], 'p', prompt)
  if redis.call('HSETNX', KEYS[3], prompt, 'fed') == 1 then redis.call('SADD', KEYS[6], prompt) end
end
redis.call('SET', KEYS[2], cursor + n)
return cursor + n
"""

# KEYS: prompt stream, experience stream, ledger (4). ARGV: group, consumer, n entries, then per entry: entry id,
# prompt id, tag, k, k payloads. An entry this consumer no longer holds (acked by an earlier run of this very call,
# or reclaimed by another worker after its lease ran out) is skipped whole: its experience is not pushed.
_COMPLETE = _MARK + """
redis.replicate_commands()
local L = {KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local group, consumer = ARGV[1], ARGV[2]
local at, done = 4, {}
for _ = 1, tonumber(ARGV[3]) do
  local id, prompt, tag, k = ARGV[at], ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3])
  local held = redis.call('XPENDING', KEYS[1], group, id, id, 1)
  if #held == 1 and held[1][2] == consumer then
    for i = 1, k do redis.call('XADD', KEYS[2], '*', 'r', ARGV[at + 3 + i]) end
    if k == 0 then mark(L, prompt, 'dropped_no_signal', tag) end
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
    done[#done + 1] = id
  end
  at = at + 4 + k
end
return done
"""

# KEYS: stream, dead stream, ledger (4). ARGV: group, consumer, max dead length, n dead, n x (id, payload, reason),
# n acks, n ids, then marks. Dead letters are copied with their reason, then every id is acked and deleted.
_SETTLE = _MARK + """
redis.replicate_commands()
local L = {KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local group, consumer, maxlen = ARGV[1], ARGV[2], ARGV[3]
local ndead = tonumber(ARGV[4])
local at = 5
for _ = 1, ndead do
  local id = ARGV[at]
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'r', ARGV[at + 1], 'reason', ARGV[at + 2],
             'source_id', id, 'consumer', consumer)
  redis.call('XACK', KEYS[1], group, id)
  redis.call('XDEL', KEYS[1], id)
  at = at + 3
end
local nack = tonumber(ARGV[at])
for i = 1, nack do
  redis.call('XACK', KEYS[1], group, ARGV[at + i])
  redis.call('XDEL', KEYS[1], ARGV[at + i])
end
marks_from(L, ARGV, at + nack + 1)
return ndead + nack
"""

# KEYS: stream. ARGV: group, consumer, entry ids. Resets the idle time of each given entry this consumer still
# holds (JUSTID: the delivery count stays), atomically with checking who holds it, so an entry another worker took
# meanwhile stays that worker's. Returns how many were renewed.
_RENEW = """
redis.replicate_commands()
local renewed = 0
for i = 3, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #held == 1 and held[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
"""


class RedisGone(redis.ConnectionError):
    """The server is known to be gone for good (a client's `give_up` says so): retrying would only wait."""


def connect(url: str, give_up: Callable[[], str | None] | None = None) -> redis.Redis:
    """A client that retries lost connections with backoff instead of failing the first call. `give_up`, asked
    before each retry, returns why not to wait any longer (the embedded server died with nothing to restart from),
    and the call raises RedisGone with it."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    class Backoff(ExponentialBackoff):
        def compute(self, failures: int) -> float:
            if give_up is not None and (reason := give_up()):
                raise RedisGone(reason)
            return super().compute(failures)

    # 0.1 s doubling, capped at 1 s, 30 tries: about 27 s of outage ridden out, and a client notices a restarted
    # server (the driver restarts its embedded one within a second) within a second.
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        retry=Retry(Backoff(cap=1.0, base=0.05), retries=30),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )


class StreamQueue:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str, ledger: LedgerKeys | None = None):
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.ledger = ledger  # where acks and dead letters settle prompt ids (None: a queue without a ledger)
        self._scripts: dict[str, object] = {}

    def _script(self, source: str):
        if source not in self._scripts:
            self._scripts[source] = self.client.register_script(source)
        return self._scripts[source]

    def _ledger_keys(self) -> list[str]:
        if self.ledger is None:
            raise ValueError(f"queue {self.stream} has no ledger: give StreamQueue(..., ledger=keys.ledger_keys)")
        return self.ledger.as_list()

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
                    entries.append(_entry(entry_id, fields))
        return entries

    def ack(self, entry_ids: list[str], marks: list[Mark] = ()) -> None:
        """Acknowledge and delete entries; with `marks`, settle those prompt ids in the ledger in the same step."""
        if marks:
            self._settle([], [], entry_ids, marks)
            return
        if not entry_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *entry_ids)
        pipe.xdel(self.stream, *entry_ids)
        pipe.execute()

    def _settle(self, dead: list[StreamEntry], reasons: list[str], entry_ids: list[str], marks: list[Mark],
                max_len: int = 10_000) -> None:
        args = [self.group, self.consumer, max_len, len(dead)]
        for entry, reason in zip(dead, reasons):
            args += [entry.entry_id, entry.payload, reason.encode("utf-8", "replace")[:1000]]
        args += [len(entry_ids), *entry_ids, len(marks)]
        for mark in marks:
            args += mark.args()
        self._script(_SETTLE)(keys=[self.stream, self.dead_stream, *self._ledger_keys()], args=args)

    def complete(self, experience_stream: str, processed: list[tuple[str, str, list[bytes]]], tag: str) -> list[str]:
        """One processing of prompt entries lands at once (this queue is the prompt queue; a rollout worker calls it):
        for each (prompt entry id, prompt id, experience payloads) whose entry this consumer still holds, the
        payloads are added to `experience_stream` and the entry is acknowledged; an entry that yielded no payloads
        settles its prompt id as dropped_no_signal in the ledger. An entry no longer held (another worker
        reclaimed it, or a retry of this very call already completed it) is skipped whole. Returns the entry ids
        completed."""
        args = [self.group, self.consumer, len(processed)]
        for entry_id, prompt_id, payloads in processed:
            args += [entry_id, prompt_id, tag, len(payloads), *payloads]
        done = self._script(_COMPLETE)(keys=[self.stream, experience_stream, *self._ledger_keys()], args=args)
        return [entry_id.decode() if isinstance(entry_id, bytes) else entry_id for entry_id in done or []]

    def feed(self, cursor_key: str, expected: int, payloads: list[bytes], prompt_ids: list[str]) -> int:
        """Add prompts and advance the data cursor `cursor_key` from `expected` by len(payloads), in one step, only if
        the cursor is still at `expected`; each prompt id enters the ledger as fed. Returns the cursor after: a
        retry of a call that already ran, or a cursor another driver moved, feeds nothing and returns where it is."""
        if len(payloads) != len(prompt_ids):
            raise ValueError(f"{len(payloads)} payloads for {len(prompt_ids)} prompt ids")
        keys = [self.stream, cursor_key, *self._ledger_keys()]
        return int(self._script(_FEED)(keys=keys, args=[expected, len(payloads), *payloads, *prompt_ids]))

    def renew(self, entry_ids: list[str]) -> int:
        """Reset the idle time of the entries this consumer works on (its lease): another consumer's reclaim, which
        takes only entries idle for claim_idle_ms, leaves them alone while this one is alive. Only the entries the
        caller knows it holds: one delivered to it whose reply was lost (a Redis restart) must go idle and be
        reclaimed, not be renewed forever. Returns how many it still held."""
        if not entry_ids:
            return 0
        return int(self._script(_RENEW)(keys=[self.stream], args=[self.group, self.consumer, *entry_ids]))

    @property
    def dead_stream(self) -> str:
        return dead_letter_stream(self.stream)

    def dead_letter(self, entries: list[StreamEntry], reasons: list[str], max_len: int = 10_000,
                    marks: list[Mark] = ()) -> None:
        """Move entries that can never be used (wrong format version, corrupt bytes, duplicates) to `<stream>:dead`.

        Each is copied there with its reason, source id and consumer, then acknowledged and deleted, in one
        transaction (with the ledger `marks`, if any): a poison entry is kept for a person to inspect, never
        redelivered, never lost. The dead stream is capped (approximately) at max_len entries so a flood of
        garbage cannot fill Redis.
        """
        if not entries and not marks:
            return
        if self.ledger is not None:
            self._settle(entries, reasons, [], marks, max_len)
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
        return [_entry(entry_id, fields) for entry_id, fields in entries if fields]

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


def dead_letter_stream(stream: str) -> str:
    """Where entries of `stream` that can never be used go (StreamQueue.dead_letter)."""
    return f"{stream}:dead"


def stream_length(client: redis.Redis, stream: str) -> int:
    """Entries in `stream`: waiting plus being worked on (acknowledged ones are deleted)."""
    return int(client.xlen(stream))


def stream_payloads(client: redis.Redis, stream: str) -> list[bytes]:
    """Every entry's payload, oldest first, without consuming anything (the driver's prompt accounting)."""
    return [fields.get(PAYLOAD_FIELD, b"") for _entry_id, fields in client.xrange(stream)]


def unreachable(url: str, connect_timeout_s: float = 1.0, timeout_s: float = 2.0) -> str | None:
    """None when a Redis at `url` answers PING, else why not. One try, short timeouts: for asking whether a run's
    Redis is up, where connect()'s retries would wait for a dead server for about 20 s."""
    probe = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s)
    try:
        probe.ping()
        return None
    except redis.RedisError as exc:
        return str(exc) or type(exc).__name__
    finally:
        probe.close()


def shutdown_server(url: str, timeout_s: float = 5.0) -> None:
    """Ask the Redis at `url` to save (AOF, when on) and exit; nothing happens when it is already gone."""
    probe = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=timeout_s)
    try:
        probe.shutdown()
    except redis.RedisError:
        pass
    finally:
        probe.close()


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
