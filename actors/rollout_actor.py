"""RolloutActor: prompts in (Redis stream), scored and credited experience out (Redis stream).

One loop, read top to bottom: take prompts -> pick up newer weights -> sample a group per prompt -> verify ->
advantages -> push experience -> acknowledge the prompts. A prompt is acknowledged only after its experience
is in the experience stream, so a dead worker's prompts are replayed (reclaimed by the others), never lost.
A worker retired by `resetrl scale` stops taking new prompts and first finishes the ones it holds, so the
driver can remove its consumer from the group with nothing pending.
The class is plain Python; the driver wraps it with `ray.remote`.
"""

from __future__ import annotations

import logging
import os
import random
import time

import torch

from resetrl.actors.engines import make_engine
from resetrl.actors.engines.base import SamplingSettings
from resetrl.actors.trajectories import RolloutContext
from resetrl.config import RunConfig
from resetrl.data import render_prompt
from resetrl.queue import StreamEntry, StreamQueue, connect
from resetrl.record import WireFormatError, decode_prompt, encode_experience
from resetrl.run_state import (
    EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys, incr_stats, retire_requested, stop_requested, write_heartbeat,
)
from resetrl.verifiers import get_verifier
from resetrl.weights import make_weight_channel

log = logging.getLogger(__name__)

# How often (in loop iterations) a worker looks for prompts that a dead worker left pending.
_RECLAIM_EVERY = 20
# An idle worker (empty prompt queue) still heartbeats this often, so `resetrl status` shows it alive.
_IDLE_HEARTBEAT_S = 2.0


class _RolloutMetrics:
    """Ray dashboard metrics of one rollout worker (no-ops outside a Ray worker)."""

    def __init__(self, worker_index: int):
        self.enabled = False
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
            tags = {"worker": str(worker_index)}
            self.tokens = metrics.Counter("resetrl_rollout_tokens", "generated tokens", tag_keys=("worker",))
            self.samples = metrics.Counter("resetrl_rollout_samples", "generated samples", tag_keys=("worker",))
            self.tokens_per_s = metrics.Gauge("resetrl_rollout_tokens_per_s", "generation tokens/s", tag_keys=("worker",))
            self.version = metrics.Gauge("resetrl_rollout_policy_version", "policy version in use", tag_keys=("worker",))
            for metric in (self.tokens, self.samples, self.tokens_per_s, self.version):
                metric.set_default_tags(tags)
            self.enabled = True
        except Exception as exc:  # metrics must never stop a worker
            log.warning("ray metrics disabled: %s", exc)

    def record_batch(self, tokens: int, samples: int, seconds: float, version: int) -> None:
        if not self.enabled:
            return
        self.tokens.inc(tokens)
        self.samples.inc(samples)
        self.tokens_per_s.set(tokens / max(seconds, 1e-9))
        self.version.set(version)


class RolloutActor:
    def __init__(self, cfg: RunConfig, worker_index: int, model_path: str, redis_url: str, weights_root: str):
        # (vLLM pins the process to one torch thread itself; OMP_NUM_THREADS from Ray's CPU share wins there.)
        torch.set_num_threads(max(1, int(cfg.rollout.cpus_per_worker)))
        self.cfg = cfg
        self.worker_index = worker_index
        self.consumer = f"rollout-{worker_index}"
        self.keys = RunKeys(cfg.run_name)
        self.client = connect(redis_url)
        self.prompts = StreamQueue(self.client, self.keys.prompts, PROMPT_GROUP, self.consumer)
        self.experience = StreamQueue(self.client, self.keys.experience, EXPERIENCE_GROUP, self.consumer)
        self.weights = make_weight_channel(cfg, "engine", self.client, self.keys, weights_root, worker_index=worker_index)
        self.verify = get_verifier(cfg.algorithm.verifier)
        self.engine = make_engine(
            cfg.rollout.engine,
            model_path,
            dtype=cfg.model.dtype,
            seed=cfg.seed + 1000 * worker_index,
            kv_cache_gib=cfg.rollout.vllm_kv_cache_gib,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
        )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.sampling = SamplingSettings(
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            stop=tuple(cfg.rollout.stop),
        )
        self.policy_version = 0
        self.rng = random.Random(cfg.seed + 1000 * worker_index)  # RRPO's reset steps
        self.metrics = _RolloutMetrics(worker_index)
        # A restarted actor must generate with the current policy, not the initial one (docs/design.md); so must
        # one added by `resetrl scale` to a running job.
        self.sync_weights()
        incr_stats(self.client, self.keys, actor_starts=1)  # more than num_workers: Ray restarted one
        self.totals = {"prompts": 0, "samples": 0, "tokens": 0}
        self.last_batch_tokens_per_s = 0.0
        self.last_heartbeat = 0.0
        self.heartbeat("starting")

    def engine_name(self) -> str:
        return self.engine.name

    def pid(self) -> int:
        return os.getpid()

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Work until the run's stop flag is set, or until the driver retires this worker (`resetrl scale`):
        then finish the prompts it holds first. Returns this worker's totals."""
        totals = self.totals
        # Entries this consumer name already held (a restart of the same worker) come first.
        backlog = self.prompts.read(count=1000, pending=True)
        if backlog:
            incr_stats(self.client, self.keys, prompts_replayed=len(backlog))
        self.heartbeat("running")
        iteration = 0
        while not stop_requested(self.client, self.keys):
            if retire_requested(self.client, self.keys, self.worker_index):
                self.finish_pending()  # the backlog is part of what this consumer holds pending
                break
            iteration += 1
            if backlog:
                entries, backlog = backlog[: self.cfg.rollout.prompts_per_batch], backlog[self.cfg.rollout.prompts_per_batch :]
            elif iteration % _RECLAIM_EVERY == 0 and (reclaimed := self.prompts.reclaim(self.cfg.queue.claim_idle_ms)):
                backlog = reclaimed
                incr_stats(self.client, self.keys, prompts_reclaimed=len(reclaimed))
                continue
            else:
                entries = self.prompts.read(count=self.cfg.rollout.prompts_per_batch, block_ms=500)
            if not entries:
                # Idle workers keep up with the policy too: with the nccl channel the learner's broadcast waits for
                # every engine, so a worker without prompts must still join it.
                self.sync_weights()
                if time.monotonic() - self.last_heartbeat > _IDLE_HEARTBEAT_S:
                    self.heartbeat("running")
                continue
            self.sync_weights()
            self.process(entries)
            self.heartbeat("running")
        return totals

    def finish_pending(self) -> None:
        """Retiring: take no new prompts; process every entry this consumer holds unacknowledged, batch by batch.

        The entries are processed rather than handed back: pending entries can only move to another consumer by
        being claimed, which a live worker does only after claim_idle_ms, so handing back would stall them.
        """
        self.heartbeat("retiring")
        per_batch = self.cfg.rollout.prompts_per_batch
        # Read wide: a held entry deleted meanwhile comes back empty and is skipped; it must not hide the rest.
        while (held := self.prompts.read(count=1000, pending=True)) and not stop_requested(self.client, self.keys):
            for start in range(0, len(held), per_batch):
                self.sync_weights()
                self.process(held[start : start + per_batch])
                self.heartbeat("retiring")
        self.heartbeat("retired")

    def heartbeat(self, state: str) -> None:
        """This worker's line in `resetrl status` (the run's `workers` hash in Redis)."""
        self.last_heartbeat = time.monotonic()
        write_heartbeat(
            self.client, self.keys, self.worker_index, state=state, consumer=self.consumer, pid=os.getpid(),
            policy_version=self.policy_version, tokens_per_s=round(self.last_batch_tokens_per_s, 2), **self.totals,
        )

    def sync_weights(self) -> bool:
        latest = self.weights.latest()
        if latest is None or latest[0] <= self.policy_version:
            return False
        version, location = latest
        started = time.perf_counter()
        if not self.weights.load_into(self.engine, version, location):  # pruned or called off: keep the old ones
            return False
        self.policy_version = version
        incr_stats(self.client, self.keys, weight_loads=1, weight_load_seconds=time.perf_counter() - started)
        return True

    def process(self, entries: list[StreamEntry]) -> dict:
        prompts, good_ids, bad_entries, reasons = [], [], [], []
        for entry in entries:
            try:
                prompts.append(decode_prompt(entry.payload))
                good_ids.append(entry.entry_id)
            except WireFormatError as exc:
                log.error("prompt entry %s rejected to %s: %s", entry.entry_id, self.prompts.dead_stream, exc)
                bad_entries.append(entry)
                reasons.append(str(exc))
        if bad_entries:
            # Kept with the reason in <stream>:dead and acknowledged: never retried, never silently gone.
            self.prompts.dead_letter(bad_entries, reasons)
            incr_stats(self.client, self.keys, prompts_rejected=len(bad_entries))
        if not prompts:
            return {"prompts": 0, "samples": 0, "tokens": 0}

        ctx = RolloutContext(self.cfg, self.engine, self.tokenizer, self.verify, self.sampling, self.policy_version, self.rng)
        prompt_ids = [render_prompt(self.tokenizer, self.cfg.data, prompt) for prompt in prompts]
        group_ids = [f"{prompt.prompt_id}@{entry_id}" for prompt, entry_id in zip(prompts, good_ids)]
        started = time.perf_counter()
        # The method decides what to sample and how to credit it (resetrl/methods/; each batches its engine calls).
        records = self.cfg.algorithm.method.rollout(ctx, prompts, group_ids, prompt_ids)
        generate_seconds = time.perf_counter() - started

        # Experience first, then the prompt acks: a crash in between replays the prompts, never loses them.
        if records:
            self.experience.put_many([encode_experience(record) for record in records])
        self.prompts.ack(good_ids)
        # Zeros are not sent: a counter appears in the run's stats once something happened.
        counters = {name: value for name, value in ctx.stats.items() if value}
        incr_stats(
            self.client, self.keys, prompts_done=len(prompts), samples_generated=len(records),
            generate_seconds=generate_seconds, **counters,
        )
        tokens = int(ctx.stats["tokens_generated"])
        self.metrics.record_batch(tokens, len(records), generate_seconds, self.policy_version)
        batch = {"prompts": len(prompts), "samples": len(records), "tokens": tokens}
        for name in self.totals:
            self.totals[name] += batch[name]
        self.last_batch_tokens_per_s = tokens / max(generate_seconds, 1e-9)
        return batch

    def close(self) -> None:
        self.engine.close()
        self.client.close()
