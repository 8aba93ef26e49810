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
