"""Learner throughput: trained tokens/s of Learner.train_step (records read from Redis) vs a bare, unshared
DeepSpeed loop on the same batches.

- system: the experience records of one step are XADDed to a real embedded redis-server (not timed: that is the
  actors' side), then `Learner.train_step()` is timed: XREADGROUP + decode + checks, packing (a prompt's records
  as one prefix tree, learner.shared_prefix; token-budget micro-batches, learner.max_tokens_per_micro_batch; logits
  at the trained positions only), forward/backward/step through DeepSpeed, weight publication to /dev/shm, ack,
  counters; torch threads as the learner sets them (learner.torch_threads; by default every core of a CPU-only host
  while no rollout worker is busy, as here).
- baseline: the learner's step as it was before packing, as a bare loop on the learner's own DeepSpeed engine (same
  model, optimizer, ZeRO stage, memory): one right-padded row per record in micro-batches of --micro-batch records
  sorted by length, logits at every position, the same policy loss weighted by each micro-batch's share of the
  trained tokens, backward, one optimizer step; --baseline-threads torch threads (1: what Ray's CPU share of 1
  gave the learner).
The two are timed alternately on the same batches. Trained tokens = loss-masked tokens, the same on both sides.

Batches: real ExperienceRecords built from the preset's rendered prompts plus random response tokens (a random
model's answers would be random tokens anyway; lengths uniform in --response-tokens x [1 - spread, 1 + spread]),
GRPO-style advantages per group. --batch reset adds, per prompt, a G2 group of --group-size continuations from the
prompt + the first half of the first sample's response (RRPO/SRPO's reset prefix), trained on the continuation only.

    python bench/learner_overhead.py --quick                             # tiny-llama: a check in ~2 minutes
    python bench/learner_overhead.py --config configs/smollm2-arith.yaml --model smollm2-135m-instruct \\
        --prompts 8 --response-tokens 32                                 # the default job's GRPO batches
    python bench/learner_overhead.py --config configs/smollm2-arith.yaml --model smollm2-135m-instruct \\
        --prompts 8 --response-tokens 32 --batch reset                   # with reset groups
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
from resetrl.launch.redis_server import EmbeddedRedis
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys

GOAL = 2.0  # the learner at least 2x the bare unshared loop on the default job's GRPO batches


def _record(prompt, name, group, context: list[int], prompt_length: int, response: list[int], advantage: float,
            temperature: float, vocab: int) -> ExperienceRecord:
    ids = context + response
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[len(context):] = 1
    return ExperienceRecord(
        record_id=name, prompt_id=prompt.prompt_id, group_id=group, method="grpo", policy_version=0,
        token_ids=np.asarray(ids, dtype=np.int32), prompt_length=prompt_length, loss_mask=mask,
        advantages=np.where(mask, advantage, 0.0).astype(np.float32),
        behaviour_logprobs=np.where(mask, -np.log(vocab), 0.0).astype(np.float32),
        reward=float(advantage > 0), temperature=temperature, finish_reason="stop",
    )


def make_step_records(cfg, tokenizer, prompts, group: int, response_tokens: int, spread: float, reset: bool,
                      rng) -> list[ExperienceRecord]:
    vocab = tokenizer.vocab_size
    low, high = max(1, round(response_tokens * (1 - spread))), max(1, round(response_tokens * (1 + spread)))

    def response() -> list[int]:
        return rng.integers(0, vocab, int(rng.integers(low, high + 1))).tolist()

    def advantages() -> np.ndarray:
        rewards = rng.integers(0, 2, group).astype(np.float32)
        return (rewards - rewards.mean()) / (rewards.std() + 1e-6)

    records = []
    for prompt in prompts:
        ids = render_prompt(tokenizer, cfg.data, prompt)
        g1 = [response() for _ in range(group)]
        for j, (answer, advantage) in enumerate(zip(g1, advantages())):
            records.append(_record(prompt, f"{prompt.prompt_id}#g1-{j}", f"{prompt.prompt_id}/g1", ids, len(ids),
                                   answer, advantage, cfg.rollout.temperature, vocab))
        if reset:
            prefix = ids + g1[0][: len(g1[0]) // 2]  # the failed parent's steps 1..k-1
            for j, advantage in enumerate(advantages()):
                records.append(_record(prompt, f"{prompt.prompt_id}#g2-{j}", f"{prompt.prompt_id}/g2", prefix,
                                       len(ids), response(), advantage, cfg.rollout.temperature, vocab))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY))
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4, help="learner.prompts_per_step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per group (G1, and G2 with --batch reset)")
    parser.add_argument("--batch", choices=("grpo", "reset"), default="grpo")
    parser.add_argument("--micro-batch", type=int, default=4, help="the baseline's records per micro-batch")
    parser.add_argument("--baseline-threads", type=int, default=1)
    parser.add_argument("--response-tokens", type=int, default=128, help="mean response length")
    parser.add_argument("--response-spread", type=float, default=0.5, help="lengths uniform in mean x [1 -/+ this]")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 2 prompts x 4 x ~32 tokens: a check")
    parser.add_argument("--override", action="append", default=[], help="extra config override key=value")
    args = parser.parse_args()
    machine_at_start = machine()  # its load average is the one before the runs
    if args.quick:
        args.repeats, args.prompts, args.response_tokens = 3, 2, 32
    reset = args.batch == "reset"
    records_per_prompt = args.group_size * (2 if reset else 1)

    cfg = load_cfg(args.config, [
        "run_name=bench-learner", f"model.name={args.model}", f"learner.prompts_per_step={args.prompts}",
        # the learner reads records_per_step = prompts x group_size records a step: G1 + G2 with --batch reset
        "algorithm.name=grpo", f"rollout.group_size={records_per_prompt}",
        f"rollout.max_new_tokens={round(args.response_tokens * (1 + args.response_spread))}",
        f"data.size={args.prompts * (args.repeats + 1)}", *args.override,
    ])
    model_path = str(resolve_model(cfg.model))
    import torch
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
        # only difference is the step itself. (A second engine in the process measured 20-30% slower than the
        # first: allocator effects, not the loop.)
        bare = learner.engine

        step_records = [make_step_records(cfg, tokenizer, prompts[i * args.prompts : (i + 1) * args.prompts],
                                          args.group_size, args.response_tokens, args.response_spread, reset, rng)
                        for i in range(args.repeats + 1)]
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
                    "train_seconds": metrics["train_seconds"], "publish_seconds": metrics["publish_seconds"],
                    "forward_tokens": metrics["forward_tokens"], "micro_batches": metrics["micro_batches"],
                    "threads": metrics["learner_threads_max"]}

        def baseline() -> dict:
            records = records_for_next()
            batches = micro_batches(records, args.micro_batch, learner.pad_token_id)
            total = sum(mb.num_loss_tokens for mb in batches)
            # The learner's layer hooks re-size torch's threads: hold them at the baseline's count meanwhile.
            budget, fixed = learner.threads, getattr(learner.threads, "fixed", None)
            if budget is not None:
                budget.fixed = args.baseline_threads
            torch.set_num_threads(args.baseline_threads)
            started = time.perf_counter()
            bare.train()
            for index, mb in enumerate(batches):
                bare.set_gradient_accumulation_boundary(index == len(batches) - 1)
                logits = bare(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
                logprobs = token_logprobs(logits, mb.input_ids, mb.temperatures)
                loss, _ = POLICY_LOSSES[algo.policy_loss](
                    logprobs, mb.behaviour_logprobs, mb.advantages, mb.loss_mask,
                    clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                    aggregation=algo.loss_aggregation, norm_length=cfg.rollout.max_new_tokens,
                )
                bare.backward(loss * (mb.num_loss_tokens / total))
                bare.step()
            seconds = time.perf_counter() - started
            if budget is not None:
                budget.fixed = fixed
            padded = sum(mb.input_ids.numel() for mb in batches)
            return {"tokens": total, "seconds": seconds, "tokens_per_s": total / seconds, "forward_tokens": padded,
                    "micro_batches": len(batches)}

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
        "setup": {"model": args.model, "batch": args.batch, "records_per_step": cfg.records_per_step,
                  "prompts": args.prompts, "group_size": args.group_size, "response_tokens": args.response_tokens,
                  "response_spread": args.response_spread, "baseline_micro_batch": args.micro_batch,
                  "baseline_threads": args.baseline_threads, "shared_prefix": cfg.learner.shared_prefix,
                  "max_tokens_per_micro_batch": cfg.learner.max_tokens_per_micro_batch,
                  "learner_torch_threads": cfg.learner.torch_threads, "zero_stage": cfg.learner.zero_stage,
                  "gradient_checkpointing": cfg.model.gradient_checkpointing, "repeats": args.repeats,
                  "quick": args.quick, "config": args.config, "overrides": args.override},
        "machine": machine_at_start,
        "learner_startup_seconds": round(startup, 2),
        "baseline_tokens_per_s": stats([b["tokens_per_s"] for b, _ in pairs]),
        "system_tokens_per_s": stats([s["tokens_per_s"] for _, s in pairs]),
        "trained_tokens_per_step": stats([float(s["tokens"]) for _, s in pairs]),
        "baseline_forward_tokens_per_step": stats([float(b["forward_tokens"]) for b, _ in pairs]),
        "system_forward_tokens_per_step": stats([float(s["forward_tokens"]) for _, s in pairs]),
        "baseline_micro_batches": stats([float(b["micro_batches"]) for b, _ in pairs]),
        "system_micro_batches": stats([float(s["micro_batches"]) for _, s in pairs]),
        "system_threads": stats([float(s["threads"]) for _, s in pairs]),
        "baseline_seconds_per_step": stats([b["seconds"] for b, _ in pairs]),
        "system_seconds_per_step": stats([s["seconds"] for _, s in pairs]),
        "system_train_seconds": stats([s["train_seconds"] for _, s in pairs]),
        "system_publish_seconds": stats([s["publish_seconds"] for _, s in pairs]),
        "ratio": stats([s["tokens_per_s"] / b["tokens_per_s"] for b, s in pairs]),
        "ratio_without_publish": stats([s["tokens"] / (s["seconds"] - s["publish_seconds"]) / b["tokens_per_s"] for b, s in pairs]),
        "load_avg_1m_at_end": round(__import__("os").getloadavg()[0], 2),
    }
    result["meets_goal"] = result["ratio"]["median"] >= GOAL

    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    parts = [result["baseline_seconds_per_step"]["median"], result["system_train_seconds"]["median"],
             result["system_publish_seconds"]["median"],
             result["system_seconds_per_step"]["median"] - result["system_train_seconds"]["median"] - result["system_publish_seconds"]["median"]]
    left.bar(["bare unshared DeepSpeed"], [parts[0]], color="#55A868")
    left.bar(["Learner.train_step"], [parts[1]], color="#4C72B0", label="forward/backward/step")
    left.bar(["Learner.train_step"], [parts[2]], bottom=[parts[1]], color="#C44E52", label="publish weights")
    left.bar(["Learner.train_step"], [parts[3]], bottom=[parts[1] + parts[2]], color="#8172B2", label="queue, decode, ack")
    left.set_ylabel("seconds per step (median)")
    left.legend(fontsize=8)
    left.set_title(f"{args.model} {args.batch}: {cfg.records_per_step} records x ~{args.response_tokens} trained tokens",
                   fontsize=9)
    ratio_bars(right, ["with publish", "without publish"], [result["ratio"], result["ratio_without_publish"]], GOAL,
               "train_step / bare loop, trained tokens/s")
    suffix = ("" if args.model == "tiny-llama" else f"-{args.model}") + ("" if args.batch == "grpo" else f"-{args.batch}")
    write_results("learner_overhead" + suffix + ("-quick" if args.quick else ""), result, fig)


if __name__ == "__main__":
    main()
