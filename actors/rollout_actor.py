"""RolloutActor: prompts in (Redis stream), scored and credited experience out (Redis stream).

One loop, read top to bottom: take prompts -> pick up newer weights -> sample a group per prompt -> verify ->
advantages -> push experience -> acknowledge the prompts. A prompt is acknowledged only after its experience
is in the experience stream, so a dead worker's prompts are replayed (reclaimed by the others), never lost.
The class is plain Python; the driver wraps it with `ray.remote`.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from resetrl.actors.engines import make_engine
from resetrl.actors.engines.base import Completion, SamplingSettings
from resetrl.algorithms.advantages import grpo_advantages
from resetrl.config import RunConfig
from resetrl.data import render_prompt
from resetrl.queue import StreamEntry, StreamQueue, connect
from resetrl.record import ExperienceRecord, PromptRecord, WireFormatError, decode_prompt, encode_experience
from resetrl.run_state import EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys, incr_stats, stop_requested
from resetrl.verifiers import get_verifier
from resetrl.weights import SharedFolderWeightChannel

log = logging.getLogger(__name__)

# How often (in loop iterations) a worker looks for prompts that a dead worker left pending.
_RECLAIM_EVERY = 20


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
        torch.set_num_threads(max(1, int(cfg.rollout.cpus_per_worker)))
        self.cfg = cfg
        self.worker_index = worker_index
        self.consumer = f"rollout-{worker_index}"
        self.keys = RunKeys(cfg.run_name)
        self.client = connect(redis_url)
        self.prompts = StreamQueue(self.client, self.keys.prompts, PROMPT_GROUP, self.consumer)
        self.experience = StreamQueue(self.client, self.keys.experience, EXPERIENCE_GROUP, self.consumer)
        self.weights = SharedFolderWeightChannel(weights_root, self.client, self.keys)
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
        )
        self.policy_version = 0
        self.metrics = _RolloutMetrics(worker_index)
        # A restarted actor must generate with the current policy, not the initial one (DESIGN.md).
        self.sync_weights()

    def engine_name(self) -> str:
        return self.engine.name

    def pid(self) -> int:
        return os.getpid()

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Work until the run's stop flag is set; returns this worker's totals."""
        totals = {"prompts": 0, "samples": 0, "tokens": 0}
        # Entries this consumer name already held (a restart of the same worker) come first.
        backlog = self.prompts.read(count=1000, pending=True)
        iteration = 0
        while not stop_requested(self.client, self.keys):
            iteration += 1
            if backlog:
                entries, backlog = backlog[: self.cfg.rollout.prompts_per_batch], backlog[self.cfg.rollout.prompts_per_batch :]
            elif iteration % _RECLAIM_EVERY == 0 and (reclaimed := self.prompts.reclaim(self.cfg.queue.claim_idle_ms)):
                backlog = reclaimed
                continue
            else:
                entries = self.prompts.read(count=self.cfg.rollout.prompts_per_batch, block_ms=500)
            if not entries:
                continue
            self.sync_weights()
            batch = self.process(entries)
            for name in totals:
                totals[name] += batch[name]
        return totals

    def sync_weights(self) -> bool:
        latest = self.weights.latest()
        if latest is None or latest[0] <= self.policy_version:
            return False
        version, location = latest
        started = time.perf_counter()
        self.engine.load_weights(location)
        self.policy_version = version
        incr_stats(self.client, self.keys, weight_loads=1, weight_load_seconds=time.perf_counter() - started)
        return True

    def process(self, entries: list[StreamEntry]) -> dict:
        prompts, good_ids, bad_ids = [], [], []
        for entry in entries:
            try:
                prompts.append(decode_prompt(entry.payload))
                good_ids.append(entry.entry_id)
            except WireFormatError as exc:
                log.error("prompt entry %s rejected: %s", entry.entry_id, exc)
                bad_ids.append(entry.entry_id)
        if bad_ids:
            self.prompts.ack(bad_ids)
            incr_stats(self.client, self.keys, prompts_rejected=len(bad_ids))
        if not prompts:
            return {"prompts": 0, "samples": 0, "tokens": 0}

        prompt_token_ids = [render_prompt(self.tokenizer, self.cfg.data, prompt) for prompt in prompts]
        started = time.perf_counter()
        groups = self.engine.generate(prompt_token_ids, self.cfg.rollout.group_size, self.sampling)
        generate_seconds = time.perf_counter() - started

        payloads, rewards_all, verifier_errors, tokens = [], [], 0, 0
        for prompt, entry_id, ids, completions in zip(prompts, good_ids, prompt_token_ids, groups):
            rewards, errors = self.score(prompt, completions)
            verifier_errors += errors
            rewards_all.extend(rewards)
            tokens += sum(len(c.token_ids) for c in completions)
            records = self.build_records(prompt, f"{prompt.prompt_id}@{entry_id}", ids, completions, rewards)
            payloads.extend(encode_experience(record) for record in records)

        self.experience.put_many(payloads)
        self.prompts.ack(good_ids)
        incr_stats(
            self.client,
            self.keys,
            prompts_done=len(prompts),
            samples_generated=len(payloads),
            tokens_generated=tokens,
            reward_sum=float(sum(rewards_all)),
            verifier_errors=verifier_errors,
            generate_seconds=generate_seconds,
        )
        self.metrics.record_batch(tokens, len(payloads), generate_seconds, self.policy_version)
        return {"prompts": len(prompts), "samples": len(payloads), "tokens": tokens}

    # ---- pieces --------------------------------------------------------------------------------------------
    def score(self, prompt: PromptRecord, completions: list[Completion]) -> tuple[list[float], int]:
        """Outcome rewards; a verifier that raises scores 0 and is counted, it never kills the worker."""
        rewards, errors = [], 0
        for completion in completions:
            try:
                reward = float(self.verify(completion.text, prompt))
                if not np.isfinite(reward):
                    raise ValueError(f"verifier returned {reward}")
            except Exception as exc:
                log.warning("verifier failed on %s: %s", prompt.prompt_id, exc)
                reward, errors = 0.0, errors + 1
            rewards.append(reward)
        return rewards, errors

    def build_records(
        self,
        prompt: PromptRecord,
        group_id: str,
        prompt_ids: list[int],
        completions: list[Completion],
        rewards: list[float],
    ) -> list[ExperienceRecord]:
        """GRPO: one z-scored advantage per trajectory, on every response token (ALGORITHMS.md)."""
        advantages = grpo_advantages(torch.tensor(rewards, dtype=torch.float32), std_normalize=self.cfg.algorithm.std_normalize)
        records = []
        for index, (completion, reward, advantage) in enumerate(zip(completions, rewards, advantages.tolist())):
            prompt_length = len(prompt_ids)
            total = prompt_length + len(completion.token_ids)
            response = np.zeros(total, dtype=bool)
            response[prompt_length:] = True
            behaviour = np.zeros(total, dtype=np.float32)
            behaviour[prompt_length:] = completion.logprobs
            records.append(
                ExperienceRecord(
                    record_id=f"{group_id}#{index}",
                    prompt_id=prompt.prompt_id,
                    group_id=group_id,
                    method=self.cfg.algorithm.name,
                    policy_version=self.policy_version,
                    token_ids=np.asarray(prompt_ids + list(completion.token_ids), dtype=np.int32),
                    prompt_length=prompt_length,
                    loss_mask=response.astype(np.uint8),
                    advantages=np.where(response, advantage, 0.0).astype(np.float32),
                    behaviour_logprobs=behaviour,
                    reward=float(reward),
                    temperature=self.sampling.temperature,
                    finish_reason=completion.finish_reason,
                )
            )
        return records

    def close(self) -> None:
        self.engine.close()
        self.client.close()
