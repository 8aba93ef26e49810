"""What durability costs the queue: the embedded redis-server with no AOF, AOF with appendfsync everysec (the
`queue.durable` default) and AOF with appendfsync always, on the queue work of one training step.

One cycle is what the roles do around one learner step (docs/design.md, "Reliability contract"): the driver feeds
--prompts prompts (StreamQueue.feed: prompts + cursor + ledger), a rollout worker reads them and lands --group
records per prompt with the prompt acks (StreamQueue.complete), and the learner reads the records and acks them
with their ledger marks (StreamQueue.ack). Records are realistic (--tokens tokens each, as bench/queue_throughput.py
makes them). The three servers are measured interleaved, --repeats times each; each repeat uses fresh keys.

    python bench/queue_durability.py                  # 200 cycles of 4 prompts x 8 records of 512 tokens
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, stats, write_results
from queue_throughput import make_records
from resetrl.queue import Mark, StreamQueue, connect
from resetrl.record import PromptRecord, encode_experience, encode_prompt
from resetrl.launch.redis_server import EmbeddedRedis
from resetrl.run_state import EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys

SERVERS = {"memory": {"durable": False}, "aof_everysec": {"durable": True, "fsync": "everysec"},
           "aof_always": {"durable": True, "fsync": "always"}}


def cycles_per_s(client, run: str, args, payloads: list[bytes]) -> float:
    keys = RunKeys(run)
    driver = StreamQueue(client, keys.prompts, PROMPT_GROUP, "driver", ledger=keys.ledger_keys)
    worker = StreamQueue(client, keys.prompts, PROMPT_GROUP, "rollout-0", ledger=keys.ledger_keys)
    learner = StreamQueue(client, keys.experience, EXPERIENCE_GROUP, "learner-0", ledger=keys.ledger_keys)
    driver.ensure_group()
    learner.ensure_group()
    prompt = encode_prompt(PromptRecord("p", "1 + 1", "2", "basic_arithmetic"))
    fed = 0
    started = time.perf_counter()
    for cycle in range(args.cycles):
        ids = [f"p{fed + i}" for i in range(args.prompts)]
        fed = driver.feed(keys.prompts_fed, fed, [prompt] * args.prompts, ids)
        held = worker.read(count=args.prompts)
        records = payloads[: args.group]
        worker.complete(keys.experience, [(e.entry_id, pid, records) for e, pid in zip(held, ids)], tag=f"t{cycle}")
        entries = learner.read(count=args.prompts * args.group)
        learner.ack([e.entry_id for e in entries], marks=[Mark(pid, "trained", f"t{cycle}") for pid in ids])
    return args.cycles / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=4, help="prompts fed per cycle (learner.prompts_per_step)")
    parser.add_argument("--group", type=int, default=8, help="records per prompt (rollout.group_size)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per record (prompt + response)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    payloads = [encode_experience(r) for r in make_records(args.group, args.tokens, 64)]

    measured: dict[str, list[float]] = {name: [] for name in SERVERS}
    with tempfile.TemporaryDirectory(prefix="bench-durability-") as tmp:
        servers = {name: EmbeddedRedis(Path(tmp) / name, **options).start() for name, options in SERVERS.items()}
        try:
            clients = {name: connect(server.url) for name, server in servers.items()}
            for repeat in range(args.repeats):
                order = list(SERVERS) if repeat % 2 == 0 else list(reversed(SERVERS))
                for name in order:
                    measured[name].append(cycles_per_s(clients[name], f"r{repeat}", args, payloads))
                print(f"  repeat {repeat + 1}/{args.repeats}: "
                      + ", ".join(f"{n} {measured[n][-1]:.1f} cycles/s" for n in SERVERS), file=sys.stderr)
        finally:
            for server in servers.values():
                server.stop()
    memory = stats(measured["memory"])["median"]
    result = {
        "machine": machine(),
        "cycle": f"{args.prompts} prompts fed, {args.prompts * args.group} records of {args.tokens} tokens landed, "
                 "read and acked with ledger marks",
        "record_bytes": len(payloads[0]),
        "cycles_per_s": {name: stats(values) for name, values in measured.items()},
        "ms_per_cycle_median": {name: round(1000 / stats(values)["median"], 2) for name, values in measured.items()},
        "slowdown_vs_memory_median": {name: round(memory / stats(values)["median"], 3)
                                      for name, values in measured.items()},
    }
    write_results("queue_durability", result)


if __name__ == "__main__":
    main()
