"""Evaluator: accuracy of the newest published policy on held-out problems (config section `eval`).

It has its own engine, so evaluating never pauses the rollout workers; it picks up weights through the same
weight channel as they do and reports which policy version it scored. The driver runs it before the first step
(the starting accuracy), every `eval.every` steps beside training, and after the last step. The class is plain
Python; the driver wraps it with `ray.remote`.
"""

from __future__ import annotations

import logging
import time

import torch

from resetrl.actors.engines import make_engine
from resetrl.actors.engines.base import SamplingSettings
from resetrl.actors.engines.lora import engine_lora
from resetrl.config import RunConfig
from resetrl.data import render_prompt
from resetrl.evaluation import pass_at_k_curve
from resetrl.hub import local_snapshot
from resetrl.queue import connect
from resetrl.record import PromptRecord
from resetrl.run_state import RunKeys
from resetrl.verifiers import get_verifier
from resetrl.verifiers.guard import call_with_timeout
from resetrl.weights import make_weight_channel

log = logging.getLogger(__name__)


def score_answers(verify, timeout_s: float, prompt: PromptRecord, texts: list[str]) -> list[float]:
    """Verifier scores of one problem's answers; a verifier that fails or hangs scores 0 (as in training)."""
    scores = []
    for text in texts:
        try:
            scores.append(float(call_with_timeout(verify, timeout_s, text, prompt)))
        except Exception as exc:
            log.warning("verifier failed on held-out %s: %s", prompt.prompt_id, exc)
            scores.append(0.0)
    return scores


class Evaluator:
    def __init__(self, cfg: RunConfig, model_path: str, redis_url: str, weights_root: str,
                 prompts: list[PromptRecord]):
        torch.set_num_threads(1)
        model_path = str(local_snapshot(model_path))  # the driver's hub snapshot, found again on this node
        if not prompts:
            raise ValueError("the evaluator needs held-out problems: set eval.holdout > 0")
        self.cfg = cfg
        self.prompts = prompts
        self.client = connect(redis_url)
        # shared_folder or ray_object_store (config.py rejects eval with nccl: the evaluator has no rank there).
        self.weights = make_weight_channel(cfg, "engine", self.client, RunKeys(cfg.run_name), weights_root)
        self.verify = get_verifier(cfg.algorithm.verifier)
        self.engine = make_engine(
            cfg.rollout.engine, model_path, dtype=cfg.model.dtype, seed=cfg.seed + 777,
            kv_cache_gib=cfg.rollout.vllm_kv_cache_gib, gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            lora=engine_lora(cfg),  # learner.lora: versions arrive as adapters
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.prompt_token_ids = [render_prompt(tokenizer, cfg.data, prompt) for prompt in prompts]
        self.sampling = SamplingSettings(
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            temperature=cfg.eval.temperature,
            stop=tuple(cfg.rollout.stop),
            seed=cfg.seed,  # the same draws at every evaluation when sampling (eval.temperature > 0)
        )
        self.policy_version = 0

    def evaluate(self) -> dict:
        """Score the newest published policy (the initial model before any publish) on every held-out problem."""
        latest = self.weights.latest()
        if latest is not None and latest[0] != self.policy_version:
            if self.weights.load_into(self.engine, *latest):
                self.policy_version = latest[0]
        started = time.perf_counter()
        samples = self.cfg.eval.samples
        groups = self.engine.generate(self.prompt_token_ids, samples, self.sampling)
        generate_seconds = time.perf_counter() - started
        correct, lengths, truncated = [], [], 0
        for prompt, group in zip(self.prompts, groups):
            scores = score_answers(self.verify, self.cfg.algorithm.verifier_timeout_s, prompt, [c.text for c in group])
            # A partial-credit verifier may give fractions; "correct" means full reward.
            correct.append(sum(score >= 1.0 for score in scores))
            lengths.extend(len(c.token_ids) for c in group)
            truncated += sum(c.finish_reason == "length" for c in group)
        return {
            "policy_version": self.policy_version,
            "accuracy": sum(correct) / (len(correct) * samples),
            "pass_at_k": pass_at_k_curve(correct, samples),
            "problems": len(correct),
            "samples_per_problem": samples,
            "response_len_mean": sum(lengths) / max(len(lengths), 1),
            "truncated_fraction": truncated / max(len(lengths), 1),
            "generate_seconds": round(generate_seconds, 3),
        }

    def close(self) -> None:
        self.engine.close()
        self.client.close()

    def __repr__(self) -> str:
        # The Ray dashboard's Repr column and log prefixes (taken once, when the actor has started).
        engine = getattr(getattr(self, "engine", None), "name", "?")
        return (f"Evaluator(evaluator, {len(getattr(self, 'prompts', []))} held-out problems, engine={engine}, "
                f"policy v{getattr(self, 'policy_version', 0)})")
