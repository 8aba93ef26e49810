"""Rollout overhead: generated tokens/s of the full rollout path vs the same engine called directly.

- system: one iteration of RolloutActor's loop, in-process (a plain class, no Ray): XREADGROUP the prompts from a
  real embedded redis-server -> sync_weights (a Redis read) -> RolloutActor.process: decode, render the chat
  template, engine.generate, verify, GRPO advantages, build + encode records, XADD (MULTI/EXEC), ack, counters.
- baseline: engine.generate on the same rendered prompt ids with the same SamplingSettings and n.
Both use the actor's own engine object, interleaved repeat by repeat. Engine start-up is reported separately.

    python bench/rollout_overhead.py                                   # tiny-llama, hf and vllm engines
    python bench/rollout_overhead.py --model smollm2-135m-instruct --engines vllm --max-new-tokens 128
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import gc
import sys
import tempfile
import time

from _common import TINY, interleaved, load_cfg, machine, ratio_bars, stats, write_results
from resetrl.data import build_prompts, render_prompt
from resetrl.models import resolve_model
from resetrl.queue import StreamQueue, connect
from resetrl.record import encode_prompt
from resetrl.launch.redis_server import EmbeddedRedis
from resetrl.run_state import EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys

GOAL = 0.90


def bench_engine(engine: str, args, redis_url: str) -> dict:
    from resetrl.actors.rollout_actor import RolloutActor

    cfg = load_cfg(args.config, [
        f"run_name=bench-rollout-{engine}", f"model.name={args.model}", f"rollout.engine={engine}",
        f"rollout.prompts_per_batch={args.prompts}", f"rollout.group_size={args.group_size}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"data.size={args.prompts * (args.repeats + 1)}",
        *args.override,
    ])
    model_path = str(resolve_model(cfg.model))
    keys = RunKeys(cfg.run_name)
    client = connect(redis_url)
    for key in client.scan_iter(match=f"{keys.prefix}:*"):
        client.delete(key)
    feeder = StreamQueue(client, keys.prompts, PROMPT_GROUP, "bench")
    feeder.ensure_group()
    StreamQueue(client, keys.experience, EXPERIENCE_GROUP, "bench").ensure_group()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-weights-", dir="/dev/shm") as weights_root:
        actor = RolloutActor(cfg, 0, model_path, redis_url, weights_root)
        startup = time.perf_counter() - started
        prompts = build_prompts(cfg.data)
        batches = [prompts[i * args.prompts : (i + 1) * args.prompts] for i in range(args.repeats + 1)]
        batch_index = iter(range(10**9))

        def next_batch():
            return batches[next(batch_index) % len(batches)]

        def baseline() -> dict:
            batch = next_batch()
            ids = [render_prompt(actor.tokenizer, cfg.data, p) for p in batch]
            started = time.perf_counter()
            groups = actor.engine.generate(ids, cfg.rollout.group_size, actor.sampling)
            seconds = time.perf_counter() - started
            tokens = sum(len(c.token_ids) for g in groups for c in g)
            return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

        def system() -> dict:
            feeder.put_many([encode_prompt(p) for p in next_batch()])
            started = time.perf_counter()
            entries = actor.prompts.read(count=cfg.rollout.prompts_per_batch, block_ms=500)
            actor.sync_weights()
            done = actor.process(entries)
            seconds = time.perf_counter() - started
            client.xtrim(keys.experience, maxlen=0)  # keep Redis small; not timed
            return {"tokens": done["tokens"], "seconds": seconds, "tokens_per_s": done["tokens"] / seconds,
                    "records": done["samples"]}

        baseline(), system()  # warm-up (first-call compilation, allocator)
        pairs = interleaved(args.repeats, baseline, system)
        actor.close()
    client.close()
    del actor
    gc.collect()
    if any(s["tokens"] == 0 or b["tokens"] == 0 for b, s in pairs):
        raise SystemExit(f"{engine}: a repeat generated zero tokens; the measurement is invalid")
    return {
        "model": args.model,
        "startup_seconds": round(startup, 2),
        "baseline_tokens_per_s": stats([b["tokens_per_s"] for b, _ in pairs]),
        "system_tokens_per_s": stats([s["tokens_per_s"] for _, s in pairs]),
        "tokens_per_call": stats([float(s["tokens"]) for _, s in pairs]),
        "system_seconds_per_call": stats([s["seconds"] for _, s in pairs]),
        "ratio": stats([s["tokens_per_s"] / b["tokens_per_s"] for b, s in pairs]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY))
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m-instruct")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per call (rollout.prompts_per_batch)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--override", action="append", default=[], help="extra config override key=value")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp, EmbeddedRedis(tmp) as server:
        for engine in args.engines.split(","):
            print(f"engine {engine}", flush=True, file=sys.stderr)
            results[engine] = bench_engine(engine, args, server.url)

    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    engines = list(results)
    width = 0.38
    for offset, key, label in ((-width / 2, "baseline_tokens_per_s", "engine alone"), (width / 2, "system_tokens_per_s", "RolloutActor")):
        left.bar([i + offset for i in range(len(engines))], [results[e][key]["median"] for e in engines], width, label=label)
    left.set_xticks(range(len(engines)), engines)
    left.set_ylabel("generated tokens/s")
    left.legend()
    left.set_title(f"{args.model}: {args.prompts} prompts x {args.group_size}, {args.max_new_tokens} new tokens")
    ratio_bars(right, engines, [results[e]["ratio"] for e in engines], GOAL, "system / engine tokens/s")
    result = {
        "goal": GOAL,
        "setup": {"model": args.model, "prompts_per_call": args.prompts, "group_size": args.group_size,
                  "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "config": args.config},
        "machine": machine(),
        "engines": results,
        "meets_goal": {e: results[e]["ratio"]["median"] >= GOAL for e in results},
    }
    write_results("rollout_overhead" + ("" if args.model == "tiny-llama" else f"-{args.model}"), result, fig)


if __name__ == "__main__":
    main()
