"""StreamQueue against a real redis-server: delivery, ack-after-use, replay and reclaim."""

import time

from resetrl.queue import StreamQueue


def make_queue(client, consumer: str) -> StreamQueue:
    queue = StreamQueue(client, "test:stream", "workers", consumer)
    queue.ensure_group()
    return queue


def test_each_entry_goes_to_one_consumer(redis_client):
    a, b = make_queue(redis_client, "a"), make_queue(redis_client, "b")
    a.put_many([b"1", b"2", b"3"])
    got_a = a.read(count=2)
    got_b = b.read(count=10)
    assert [e.payload for e in got_a] == [b"1", b"2"]
    assert [e.payload for e in got_b] == [b"3"]
    assert a.read(count=10, block_ms=10) == []


def test_ensure_group_twice_is_harmless(redis_client):
    make_queue(redis_client, "a")
    make_queue(redis_client, "a")


def test_unacked_entries_stay_pending_and_are_replayed_to_the_same_consumer(redis_client):
    queue = make_queue(redis_client, "a")
    queue.put(b"x")
    first = queue.read(count=1)
    assert queue.pending_count() == 1 and queue.depth() == 1
    # A restart of consumer "a" reads its own pending entries first.
    replay = make_queue(redis_client, "a").read(count=10, pending=True)
    assert [e.entry_id for e in replay] == [first[0].entry_id]


def test_ack_removes_the_entry(redis_client):
    queue = make_queue(redis_client, "a")
    queue.put_many([b"x", b"y"])
    entries = queue.read(count=2)
    queue.ack([entries[0].entry_id])
    assert queue.pending_count() == 1 and queue.depth() == 1
    queue.ack([entries[1].entry_id])
    assert queue.pending_count() == 0 and queue.depth() == 0


def test_a_dead_consumers_entries_are_reclaimed_after_the_idle_time(redis_client):
    dead, alive = make_queue(redis_client, "dead"), make_queue(redis_client, "alive")
    dead.put_many([b"1", b"2"])
    taken = dead.read(count=2)
    assert alive.reclaim(min_idle_ms=60_000) == []  # not idle long enough yet
    time.sleep(0.15)
    reclaimed = alive.reclaim(min_idle_ms=100)
    assert [e.entry_id for e in reclaimed] == [e.entry_id for e in taken]
    alive.ack([e.entry_id for e in reclaimed])
    assert alive.pending_count() == 0 and alive.depth() == 0


# ---- what must happen together (one Lua script each; docs/design.md, "Reliability contract") ------------------

import socket  # noqa: E402
import threading  # noqa: E402

from resetrl.launch.train_loop import PromptFeeder  # noqa: E402
from resetrl.queue import Mark, connect  # noqa: E402
from resetrl.record import PromptRecord, decode_prompt, encode_prompt  # noqa: E402
from resetrl.run_state import PROMPT_GROUP, RunKeys, ledger_states, open_prompt_ids, prompts_fed  # noqa: E402

KEYS = RunKeys("q")
PROMPTS = [PromptRecord(f"p{i}", f"{i} + 1", str(i + 1), "basic_arithmetic") for i in range(3)]


class ReplyLosingProxy:
    """A TCP proxy to Redis that, once armed, lets the first command containing `marker` run on the server and then
    drops the connection before the reply reaches the client: a reply lost on the way, which makes redis-py send
    the command again on a new connection (its retry on ConnectionError)."""

    def __init__(self, port: int, marker: bytes):
        self.upstream_port, self.marker = port, marker
        self.armed = False
        self.dropped = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"hold": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, client, upstream, state) -> None:
        while chunk := _recv(client):
            if self.armed and self.marker in chunk:
                state["hold"] = True  # the reply to this chunk is dropped, and the connection with it
            upstream.sendall(chunk)

    def _down(self, upstream, client, state) -> None:
        while chunk := _recv(upstream):
            if state["hold"] and not chunk.startswith(b"-NOSCRIPT"):  # a script not loaded yet did not run
                self.armed, self.dropped = False, self.dropped + 1
                for sock in (client, upstream):
                    sock.close()
                return
            state["hold"] = False
            client.sendall(chunk)

    def close(self) -> None:
        self.listener.close()


def _recv(sock) -> bytes:
    try:
        return sock.recv(1 << 20)
    except OSError:
        return b""


def prompt_queue(client) -> StreamQueue:
    queue = StreamQueue(client, KEYS.prompts, PROMPT_GROUP, "driver", ledger=KEYS.ledger_keys)
    queue.ensure_group()
    return queue


def test_a_feed_whose_reply_was_lost_is_retried_and_feeds_once(redis_server, redis_client):
    proxy = ReplyLosingProxy(redis_server.port, marker=KEYS.prompts.encode())
    client = connect(f"redis://127.0.0.1:{proxy.port}/0")
    feeder = PromptFeeder(prompt_queue(client), PROMPTS, keys=KEYS)
    proxy.armed = True
    assert feeder.feed_until(3) == 3
    assert proxy.dropped == 1  # the feed ran on the server, its reply was lost, redis-py sent it again
    fed = [decode_prompt(p).prompt_id for p in [e.payload for e in prompt_queue(redis_client).read(count=10)]]
    assert fed == ["p0.e0", "p1.e0", "p2.e0"] and prompts_fed(redis_client, KEYS) == 3
    client.close()
    proxy.close()


def test_a_feeder_behind_the_cursor_feeds_nothing_and_catches_up(redis_client):
    queue = prompt_queue(redis_client)
    assert PromptFeeder(queue, PROMPTS, keys=KEYS).feed_until(2) == 2
    # A driver that died after feeding, restarted with the cursor it had before: the prompts are not fed again.
    stale = PromptFeeder(queue, PROMPTS, fed=0, keys=KEYS)
    stale.feed_until(2)
    assert stale.fed == 2
    assert queue.depth() == 2 and prompts_fed(redis_client, KEYS) == 2
    assert open_prompt_ids(redis_client, KEYS) == {"p0.e0", "p1.e0"}  # fed, not settled yet


def test_complete_lands_a_processing_only_for_the_entries_its_consumer_holds(redis_client):
    PromptFeeder(prompt_queue(redis_client), PROMPTS, keys=KEYS).feed_until(3)
    worker = StreamQueue(redis_client, KEYS.prompts, PROMPT_GROUP, "rollout-0", ledger=KEYS.ledger_keys)
    other = StreamQueue(redis_client, KEYS.prompts, PROMPT_GROUP, "rollout-1", ledger=KEYS.ledger_keys)
    held = worker.read(count=3)
    time.sleep(0.05)
    # rollout-1 takes p2 over (say rollout-0 stalled past claim_idle_ms): rollout-0's result for it must not land.
    redis_client.xclaim(KEYS.prompts, PROMPT_GROUP, "rollout-1", 10, [held[2].entry_id], justid=True)
    processed = [(held[0].entry_id, "p0.e0", [b"a", b"b"]), (held[1].entry_id, "p1.e0", []),
                 (held[2].entry_id, "p2.e0", [b"c"])]
    done = worker.complete(KEYS.experience, processed, tag="t1")
    assert done == [held[0].entry_id, held[1].entry_id]
    assert [fields[b"r"] for _, fields in redis_client.xrange(KEYS.experience)] == [b"a", b"b"]
    assert worker.consumers() == {"rollout-0": 0, "rollout-1": 1}
    # p1 made no records: settled as dropped_no_signal, in the same step
    assert ledger_states(redis_client, KEYS, ["p0.e0", "p1.e0"]) == {"p1.e0": ("dropped_no_signal", "t1")}
    # The same call again (redis-py retrying it after a lost reply) lands nothing a second time.
    assert worker.complete(KEYS.experience, processed, tag="t1") == []
    assert redis_client.xlen(KEYS.experience) == 2
    assert other.complete(KEYS.experience, [(held[2].entry_id, "p2.e0", [b"c"])], tag="t2") == [held[2].entry_id]


def test_renew_keeps_a_live_consumers_entries_and_leaves_a_dead_ones_to_reclaim(redis_client):
    live, dead, reclaimer = make_queue(redis_client, "live"), make_queue(redis_client, "dead"), make_queue(redis_client, "r")
    live.put_many([b"1", b"2", b"3"])
    [working] = live.read(count=1)
    dead.read(count=1)
    orphan = live.read(count=1)  # delivered, but the reply was lost (a Redis restart): the worker never saw it
    for _ in range(4):  # 4 x 50 ms: the entries are 200 ms old, the working one's lease is renewed every 50 ms
        time.sleep(0.05)
        assert live.renew([working.entry_id]) == 1
    reclaimed = reclaimer.reclaim(min_idle_ms=150)
    assert [e.payload for e in reclaimed] == [b"2", b"3"] and orphan[0].payload == b"3"
    assert reclaimer.consumers() == {"live": 1, "dead": 0, "r": 2}
    assert live.renew([e.entry_id for e in reclaimed]) == 0  # renewing takes nothing another consumer holds


def test_ack_and_dead_letter_settle_the_ledger_once(redis_client):
    queue = StreamQueue(redis_client, KEYS.experience, "learner", "learner-0", ledger=KEYS.ledger_keys)
    queue.ensure_group()
    queue.put_many([b"x", b"y", b"z"])
    x, y, z = queue.read(count=3)
    queue.ack([x.entry_id], marks=[Mark("p0", "trained", "t1")])
    queue.dead_letter([y], ["duplicate: from processing t2"], marks=[Mark("p0", "trained", "t2")])
    queue.ack([z.entry_id], marks=[Mark("p0", "trained", "t1")])  # the same settlement again: nothing new
    assert queue.depth() == 0 and queue.dead_letters()[0]["reason"] == "duplicate: from processing t2"
    assert ledger_states(redis_client, KEYS, ["p0"]) == {"p0": ("trained", "t1")}
    assert redis_client.hgetall(KEYS.ledger_keys.second_attempts) == {b"trained>trained": b"1"}
