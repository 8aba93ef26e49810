"""Learner overhead: trained tokens/s of Learner.train_step (records read from Redis) vs a bare DeepSpeed loop.

- system: the experience records of one step are XADDed to a real embedded redis-server (not timed: that is the
  actors' side), then `Learner.train_step()` is timed: XREADGROUP + decode + checks, length-sorted collation into
  micro-batches, forward/backward/step through DeepSpeed, weight publication to /dev/shm, ack, counters.
- baseline: the learner's own DeepSpeed engine (same model, ds_config, ZeRO stage, micro-batch size, gradient
  accumulation) driven by a bare loop with the same loss function, on the same micro-batches collated beforehand: forward, loss, backward, step.
The two are timed alternately. Trained tokens = loss-masked tokens, the same
on both sides. The learner's own breakdown (train_seconds, publish_seconds) is reported too.

Records are real ExperienceRecords built from the preset's rendered prompts plus --response-tokens random
response tokens (a random model's answers would be random tokens anyway), GRPO-style advantages per group.

    python bench/learner_overhead.py                                     # tiny-llama, 16 records x ~190 tokens
    python bench/learner_overhead.py --model smollm2-135m-instruct --prompts 2 --response-tokens 128
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import tempfile
import time

import numpy as np

from _common import TINY, interleaved, load_cfg, machine, ratio_bars, stats, write_results
from resetrl.data import build_prompts, render_prompt
from resetrl.models import resolve_model
from resetrl.queue import StreamQueue, connect
from resetrl.record import ExperienceRecord, encode_experience
from resetrl.redis_server import EmbeddedRedis
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys

GOAL = 0.90


def make_step_records(cfg, tokenizer, prompts, response_tokens: int, version: int, rng) -> list[ExperienceRecord]:
    records = []
    group = cfg.records_per_prompt
    for p, prompt in enumerate(prompts):
        ids = render_prompt(tokenizer, cfg.data, prompt)
        rewards = rng.integers(0, 2, group).astype(np.float32)
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        for j in range(group):
            total = len(ids) + response_tokens
            mask = np.zeros(total, dtype=np.uint8)
            mask[len(ids):] = 1
            records.append(ExperienceRecord(
                record_id=f"{prompt.prompt_id}#{j}", prompt_id=prompt.prompt_id, group_id=prompt.prompt_id,
                method="grpo", policy_version=version,
                token_ids=np.asarray(ids + rng.integers(0, tokenizer.vocab_size, response_tokens).tolist(), dtype=np.int32),
                prompt_length=len(ids), loss_mask=mask,
                advantages=np.where(mask, advantages[j], 0.0).astype(np.float32),
                behaviour_logprobs=np.where(mask, -np.log(tokenizer.vocab_size), 0.0).astype(np.float32),
                reward=float(rewards[j]), temperature=cfg.rollout.temperature, finish_reason="length",
            ))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY))
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4, help="learner.prompts_per_step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--override", action="append", default=[], help="extra config override key=value")
    args = parser.parse_args()

    cfg = load_cfg(args.config, [
        "run_name=bench-learner", f"model.name={args.model}", f"learner.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group_size}", f"learner.micro_batch_size={args.micro_batch}",
        f"rollout.max_new_tokens={args.response_tokens}", f"data.size={args.prompts * (args.repeats + 1)}",
        *args.override,
    ])
    model_path = str(resolve_model(cfg.model))
    from transformers import AutoTokenizer

    from resetrl.algorithms.losses import POLICY_LOSSES, token_logprobs
    from resetrl.learner.batching import micro_batches
    from resetrl.learner.learner import Learner

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = build_prompts(cfg.data)
    rng = np.random.default_rng(cfg.seed)
    keys = RunKeys(cfg.run_name)
    algo = cfg.algorithm

    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp, EmbeddedRedis(tmp) as server, \
            tempfile.TemporaryDirectory(prefix="bench-weights-", dir="/dev/shm") as weights_root:
        client = connect(server.url)
        producer = StreamQueue(client, keys.experience, EXPERIENCE_GROUP, "bench")
        started = time.perf_counter()
        learner = Learner(cfg, model_path, server.url, weights_root)
        startup = time.perf_counter() - started

        # The bare loop drives the learner's own DeepSpeed engine (same model, optimizer, ds_config, memory), so the
        # only difference is what Learner.train_step adds around it. (A second engine in the process measured
        # 20-30% slower than the first: allocator effects, not the loop.)
        bare = learner.engine
        gas = bare.gradient_accumulation_steps()

        step_records = [make_step_records(cfg, tokenizer, prompts[i * args.prompts : (i + 1) * args.prompts],
                                          args.response_tokens, 0, rng) for i in range(args.repeats + 1)]
        counter = iter(range(10**9))

        def records_for_next() -> list[ExperienceRecord]:
            return step_records[next(counter) % len(step_records)]

        def system() -> dict:
            records = records_for_next()
            for record in records:
                record.policy_version = learner.version  # fresh for the learner: nothing dropped as stale
            producer.put_many([encode_experience(r) for r in records])
            started = time.perf_counter()
            metrics = learner.train_step(timeout_s=30)
            seconds = time.perf_counter() - started
            if metrics is None or metrics["skipped"]:
                raise SystemExit(f"the learner did not train: {metrics}")
            tokens = metrics["loss_tokens"]
            return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                    "train_seconds": metrics["train_seconds"], "publish_seconds": metrics["publish_seconds"]}

        def baseline() -> dict:
            batches = micro_batches(records_for_next(), cfg.learner.micro_batch_size, learner.pad_token_id)
            total = sum(mb.num_loss_tokens for mb in batches)
            started = time.perf_counter()
            bare.train()
            for mb in batches:
                logits = bare(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
                logprobs = token_logprobs(logits, mb.input_ids, mb.temperatures)
                loss, _ = POLICY_LOSSES[algo.policy_loss](
                    logprobs, mb.behaviour_logprobs, mb.advantages, mb.loss_mask,
                    clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                    aggregation=algo.loss_aggregation, norm_length=cfg.rollout.max_new_tokens,
                )
                bare.backward(loss * (mb.num_loss_tokens / total) * gas)
                bare.step()
            seconds = time.perf_counter() - started
            return {"tokens": total, "seconds": seconds, "tokens_per_s": total / seconds}

        # Warm-up: both sides on the first batch (allocator, first-step optimizer state).
        counter = iter([0])
        system()
        counter = iter([0])
        baseline()
        # interleaved() calls baseline and system once per repeat: both get that repeat's batch.
        order = []
        for rep in range(1, args.repeats + 1):
            order += [rep, rep]
        counter = iter(order)
        pairs = interleaved(args.repeats, baseline, system)
        learner.close()
        client.close()

    result = {
        "goal": GOAL,
        "setup": {"model": args.model, "records_per_step": cfg.records_per_step, "micro_batch_size": cfg.learner.micro_batch_size,
                  "response_tokens": args.response_tokens, "zero_stage": cfg.learner.zero_stage, "repeats": args.repeats,
                  "config": args.config},
        "machine": machine(),
        "learner_startup_seconds": round(startup, 2),
        "baseline_tokens_per_s": stats([b["tokens_per_s"] for b, _ in pairs]),
        "system_tokens_per_s": stats([s["tokens_per_s"] for _, s in pairs]),
        "trained_tokens_per_step": stats([float(s["tokens"]) for _, s in pairs]),
        "baseline_seconds_per_step": stats([b["seconds"] for b, _ in pairs]),
        "system_seconds_per_step": stats([s["seconds"] for _, s in pairs]),
        "system_train_seconds": stats([s["train_seconds"] for _, s in pairs]),
        "system_publish_seconds": stats([s["publish_seconds"] for _, s in pairs]),
        "ratio": stats([s["tokens_per_s"] / b["tokens_per_s"] for b, s in pairs]),
        "ratio_without_publish": stats([s["tokens"] / (s["seconds"] - s["publish_seconds"]) / b["tokens_per_s"] for b, s in pairs]),
    }
    result["meets_goal"] = result["ratio"]["median"] >= GOAL

    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    parts = [result["baseline_seconds_per_step"]["median"], result["system_train_seconds"]["median"],
             result["system_publish_seconds"]["median"],
             result["system_seconds_per_step"]["median"] - result["system_train_seconds"]["median"] - result["system_publish_seconds"]["median"]]
    left.bar(["bare DeepSpeed"], [parts[0]], color="#55A868")
    left.bar(["Learner.train_step"], [parts[1]], color="#4C72B0", label="forward/backward/step")
    left.bar(["Learner.train_step"], [parts[2]], bottom=[parts[1]], color="#C44E52", label="publish weights")
    left.bar(["Learner.train_step"], [parts[3]], bottom=[parts[1] + parts[2]], color="#8172B2", label="queue, decode, ack")
    left.set_ylabel("seconds per step (median)")
    left.legend(fontsize=8)
    left.set_title(f"{args.model}: {cfg.records_per_step} records x ~{args.response_tokens} trained tokens")
    ratio_bars(right, ["with publish", "without publish"], [result["ratio"], result["ratio_without_publish"]], GOAL,
               "train_step / bare loop, trained tokens/s")
    write_results("learner_overhead" + ("" if args.model == "tiny-llama" else f"-{args.model}"), result, fig)


if __name__ == "__main__":
    main()
