"""Experience-queue throughput: StreamQueue with encode/decode and acks vs raw XADD/XREADGROUP of the same bytes.

Both sides use the same embedded redis-server and redis-py pipelines, in batches of --batch records:
- system: encode_experience -> StreamQueue.put_many (MULTI/EXEC) ; StreamQueue.read -> decode_experience ->
  StreamQueue.ack (XACK + XDEL, MULTI/EXEC)
- raw: the already-encoded bytes -> pipelined XADD ; XREADGROUP (no decode, no ack): the redis-benchmark-like floor
- raw+ack: raw, plus pipelined XACK + XDEL, to split the system's cost between acks and encode/decode.
Records are realistic: --tokens tokens (prompt + response), int32 ids, uint8 mask, float32 advantages and
behaviour log-probs. Each repeat uses a fresh stream.

    python bench/queue_throughput.py                  # 2000 records of 512 tokens, 5 repeats
    python bench/queue_throughput.py --tokens 2048 --records 500
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import tempfile
import time

import numpy as np

from _common import interleaved, machine, ratio_bars, stats, write_results
from resetrl.queue import PAYLOAD_FIELD, StreamQueue, connect
from resetrl.record import ExperienceRecord, decode_experience, encode_experience
from resetrl.launch.redis_server import EmbeddedRedis


def make_records(count: int, tokens: int, prompt_length: int, seed: int = 0) -> list[ExperienceRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        mask = np.zeros(tokens, dtype=np.uint8)
        mask[prompt_length:] = 1
        advantages = np.where(mask, rng.standard_normal(), 0.0).astype(np.float32)
        logprobs = np.where(mask, -rng.exponential(2.0, tokens), 0.0).astype(np.float32)
        records.append(
            ExperienceRecord(
                record_id=f"g{i // 8}#{i % 8}", prompt_id=f"basic_arithmetic-0-{i // 8}", group_id=f"g{i // 8}",
                method="grpo", policy_version=0, token_ids=rng.integers(0, 49152, tokens, dtype=np.int32),
                prompt_length=prompt_length, loss_mask=mask, advantages=advantages, behaviour_logprobs=logprobs,
                reward=float(rng.integers(0, 2)), temperature=1.0,
                step_boundaries=list(range(prompt_length, tokens, 40)), finish_reason="length",
            )
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per record (prompt + response)")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="records per put_many / read / ack")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    records = make_records(args.records, args.tokens, args.prompt_length)
    payloads = [encode_experience(r) for r in records]
    record_bytes = sum(len(p) for p in payloads) / len(payloads)
    total_mb = sum(len(p) for p in payloads) / 1e6

    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp, EmbeddedRedis(tmp) as server:
        client = connect(server.url)
        counter = iter(range(10**9))

        def fresh_stream() -> str:
            stream = f"bench:queue:{next(counter)}"
            client.xgroup_create(stream, "learner", id="0", mkstream=True)
            return stream

        def finish(stream: str, seconds_put: float, seconds_get: float) -> dict:
            client.delete(stream)
            seconds = seconds_put + seconds_get
            return {"records_per_s": args.records / seconds, "mb_per_s": total_mb / seconds,
                    "put_s": seconds_put, "get_s": seconds_get}

        def system() -> dict:
            stream = fresh_stream()
            producer = StreamQueue(client, stream, "learner", "rollout-0")
            consumer = StreamQueue(client, stream, "learner", "learner-0")
            started = time.perf_counter()
            for i in range(0, len(records), args.batch):
                producer.put_many([encode_experience(r) for r in records[i : i + args.batch]])
            put = time.perf_counter() - started
            started = time.perf_counter()
            got = 0
            while got < len(records):
                entries = consumer.read(count=args.batch)
                decoded = [decode_experience(e.payload) for e in entries]
                consumer.ack([e.entry_id for e in entries])
                got += len(decoded)
            get = time.perf_counter() - started
            return finish(stream, put, get)

        def raw(with_ack: bool) -> dict:
            stream = fresh_stream()
            started = time.perf_counter()
            for i in range(0, len(payloads), args.batch):
                pipe = client.pipeline(transaction=False)
                for payload in payloads[i : i + args.batch]:
                    pipe.xadd(stream, {PAYLOAD_FIELD: payload})
                pipe.execute()
            put = time.perf_counter() - started
            started = time.perf_counter()
            got = 0
            while got < len(payloads):
                reply = client.xreadgroup("learner", "learner-0", {stream: ">"}, count=args.batch)
                items = reply[0][1]
                if with_ack:
                    ids = [entry_id for entry_id, _ in items]
                    pipe = client.pipeline(transaction=False)
                    pipe.xack(stream, "learner", *ids)
                    pipe.xdel(stream, *ids)
                    pipe.execute()
                got += len(items)
            get = time.perf_counter() - started
            return finish(stream, put, get)

        raw(True), system()  # warm-up: connections, allocator, code paths
        pairs = interleaved(args.repeats, lambda: {"raw": raw(False), "raw_ack": raw(True)}, system)
        client.close()

    raw_runs = [b["raw"] for b, _ in pairs]
    raw_ack_runs = [b["raw_ack"] for b, _ in pairs]
    system_runs = [s for _, s in pairs]
    ratio_raw = [s["records_per_s"] / b["raw"]["records_per_s"] for b, s in pairs]
    ratio_raw_ack = [s["records_per_s"] / b["raw_ack"]["records_per_s"] for b, s in pairs]
    result = {
        "setup": {"records": args.records, "tokens_per_record": args.tokens, "bytes_per_record": round(record_bytes),
                  "batch": args.batch, "repeats": args.repeats},
        "machine": machine(),
        "system": {k: stats([r[k] for r in system_runs]) for k in ("records_per_s", "mb_per_s", "put_s", "get_s")},
        "raw_xadd_xreadgroup": {k: stats([r[k] for r in raw_runs]) for k in ("records_per_s", "mb_per_s", "put_s", "get_s")},
        "raw_with_ack_xdel": {k: stats([r[k] for r in raw_ack_runs]) for k in ("records_per_s", "mb_per_s")},
        "ratio_system_vs_raw": stats(ratio_raw),
        "ratio_system_vs_raw_with_ack": stats(ratio_raw_ack),
    }

    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["raw XADD/XREADGROUP", "raw + XACK/XDEL", "StreamQueue + codec + ack"]
    rates = [result["raw_xadd_xreadgroup"]["mb_per_s"], result["raw_with_ack_xdel"]["mb_per_s"], result["system"]["mb_per_s"]]
    ratio_bars(left, names, rates, None, f"MB/s ({args.tokens}-token records, {round(record_bytes)} B)")
    left.tick_params(axis="x", labelsize=7)
    ratio_bars(right, ["vs raw", "vs raw + ack"], [result["ratio_system_vs_raw"], result["ratio_system_vs_raw_with_ack"]],
               None, "system / raw records/s")
    write_results("queue_throughput", result, fig)


if __name__ == "__main__":
    main()
