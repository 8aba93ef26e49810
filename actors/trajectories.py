"""What every method's rollout shares: the engine context, outcome scoring, and turning scored groups of sampled
trajectories into ExperienceRecords (one batched advantage computation for all groups of a batch). The methods
themselves (resetrl/methods/) only decide what to sample and how to credit it.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from resetrl.actors.engines.base import Completion, Engine, SamplingSettings
from resetrl.actors.engines.thoughts import ThoughtLimits, generate_by_thought
from resetrl.algorithms.advantages import group_advantages
from resetrl.algorithms.resets import suffix_loss_mask
from resetrl.algorithms.shaping import group_has_signal, overlong_penalty
from resetrl.algorithms.steps import token_step_starts
from resetrl.record import ExperienceRecord, PromptRecord
from resetrl.verifiers.guard import VerifierTimeout, call_with_timeout

if TYPE_CHECKING:  # the config imports the methods, which import this module
    from resetrl.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class RolloutContext:
    """Everything a strategy needs to sample and score, for one generation batch."""

    cfg: RunConfig
    engine: Engine
    tokenizer: object
    verify: Callable[[str, PromptRecord], float]
    sampling: SamplingSettings
    policy_version: int
    rng: random.Random
    stats: Counter = field(default_factory=Counter)  # counters added to the run's stats after the batch

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate(
        self,
        prompts_token_ids: list[list[int]],
        n: int,
        sampling: SamplingSettings | None = None,
        budgets: list[int] | None = None,
        *,
        by_thought: bool | None = None,
        prior_thoughts: list[int] | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt (result[i][j], as Engine.generate), their cost counted in stats.

        budgets[i] caps prompt i's response in tokens (a G2 continuation: the response budget minus its prefix).
        The policy's own rollouts (sampling None) go thought by thought when rollout.thought_by_thought is on; a call
        with its own settings (localisation, repair) is one piece, as the reference's localisation; by_thought
        overrides. prior_thoughts[i]: thoughts already in prompt i (a reset prefix's), counted in rollout.max_thoughts.
        """
        rollout = self.cfg.rollout
        if by_thought is None:
            by_thought = rollout.thought_by_thought and sampling is None
        sampling = sampling or self.sampling
        if by_thought:
            limits = ThoughtLimits(rollout.thought_delimiter, rollout.max_thoughts, rollout.thought_max_tokens,
                                   rollout.thought_answer_pattern)
            groups = generate_by_thought(self._engine_generate, self.tokenizer, prompts_token_ids, n, sampling, limits,
                                         budgets=budgets, prior_thoughts=prior_thoughts)
        else:
            groups = self._engine_generate(prompts_token_ids, n, sampling, budgets)
        self.stats["samples_sampled"] += sum(len(group) for group in groups)
        return groups

    def _engine_generate(
        self, prompts_token_ids: list[list[int]], n: int, sampling: SamplingSettings, budgets: list[int] | None = None
    ) -> list[list[Completion]]:
        """One engine call, counted: tokens_generated; tokens_prefill, the prompt tokens the engine encoded (each
        distinct prompt once when it shares prompt prefill, else once per sample; prompts with no budget left are not
        run); tokens_compute = prefill + generated."""
        # budgets only when given: engine wrappers (tests' call counters) may take (prompts, n, sampling) alone.
        by_budget = {} if budgets is None else {"budgets": budgets}
        groups = self.engine.generate(prompts_token_ids, n, sampling, **by_budget)
        run = [p for i, p in enumerate(prompts_token_ids) if budgets is None or budgets[i] > 0]
        if getattr(self.engine, "shares_prompt_prefill", False):
            prefill = sum(len(p) for p in {tuple(p) for p in run})
        else:
            prefill = n * sum(len(p) for p in run)
        generated = sum(len(c.token_ids) for group in groups for c in group)
        self.stats["tokens_generated"] += generated
        self.stats["tokens_prefill"] += prefill
        self.stats["tokens_compute"] += prefill + generated
        return groups

    def score(self, prompt: PromptRecord, response_text: str, completion: Completion) -> float:
        """Outcome reward (plus the optional DAPO overlong penalty); a failing verifier scores 0 and is counted."""
        try:
            # A hang scores 0 too (verifiers/guard.py): the worker waits at most algorithm.verifier_timeout_s.
            reward = float(call_with_timeout(self.verify, self.cfg.algorithm.verifier_timeout_s, response_text, prompt))
            if not np.isfinite(reward):
                raise ValueError(f"verifier returned {reward}")
        except Exception as exc:  # a verifier bug or hostile output must never kill the worker
            log.warning("verifier failed on %s: %s", prompt.prompt_id, exc)
            self.stats["verifier_errors"] += 1
            if isinstance(exc, VerifierTimeout):
                self.stats["verifier_timeouts"] += 1
            reward = 0.0
        algo = self.cfg.algorithm
        if algo.overlong_buffer:
            reward += overlong_penalty(
                len(completion.token_ids), self.cfg.rollout.max_new_tokens, algo.overlong_buffer, algo.overlong_penalty
            )
        return reward


def trajectory_record(
    ctx: RolloutContext,
    *,
    prompt: PromptRecord,
    group_id: str,
    index: int,
    method: str,
    context_ids: list[int],
    prompt_length: int,
    completion: Completion,
    advantage: float | np.ndarray,
    reward: float,
    temperature: float | None = None,
) -> ExperienceRecord:
    """One trained trajectory: context (prompt, plus a reset prefix for G2) + sampled completion.

    Only the completion's tokens are trained on (loss mask), carry the advantage and the behaviour log-probs;
    for a G2 continuation the reset prefix is part of the context, so it is masked out (suffix_loss_mask;
    docs/algorithms.md, RRPO). `advantage` is one number for every trained token, or an array of one per
    completion token (VinePPO's per-step credit). step_boundaries are absolute token offsets (into token_ids)
    where each response step starts.
    """
    token_ids = list(context_ids) + list(completion.token_ids)
    total, trained_from = len(token_ids), len(context_ids)
    loss_mask = suffix_loss_mask(prompt_length, trained_from - prompt_length, total)
    advantages = np.zeros(total, dtype=np.float32)
    advantages[trained_from:] = advantage
    behaviour = np.zeros(total, dtype=np.float32)
    behaviour[trained_from:] = completion.logprobs
    response_ids = token_ids[prompt_length:]
    starts = token_step_starts(response_ids, ctx.decode, ctx.cfg.algorithm.reset.step_delimiter) if response_ids else []
    return ExperienceRecord(
        record_id=f"{group_id}#{index}",
        prompt_id=prompt.prompt_id,
        group_id=group_id,
        method=method,
        policy_version=ctx.policy_version,
        token_ids=np.asarray(token_ids, dtype=np.int32),
        prompt_length=prompt_length,
        loss_mask=loss_mask,
        advantages=advantages,
        behaviour_logprobs=behaviour,
        reward=float(reward),
        temperature=temperature if temperature is not None else ctx.sampling.temperature,
        step_boundaries=[prompt_length + start for start in starts],
        finish_reason=completion.finish_reason,
    )


def supervised_record(
    ctx: RolloutContext,
    *,
    prompt: PromptRecord,
    group_id: str,
    method: str,
    context_ids: list[int],
    target_ids: list[int],
    target_mask: np.ndarray | None = None,
    weight: float = 1.0,
    reward: float = 0.0,
    temperature: float = 1.0,
) -> ExperienceRecord:
    """Context + a target the policy did not sample under this context (an expert solution for SuperRL's SFT,
    a repaired trajectory for IOP). The learner trains such records with the weighted NLL
    (losses.supervised_loss), not the policy gradient: it recognises them by target_token_ids, which equal the
    response tokens. `target_mask` (default: every target token) gates the loss; the weight rides in advantages.
    """
    token_ids = list(context_ids) + list(target_ids)
    trained_from = len(context_ids)
    mask = np.ones(len(target_ids), dtype=np.uint8) if target_mask is None else np.asarray(target_mask, dtype=np.uint8)
    loss_mask = np.zeros(len(token_ids), dtype=np.uint8)
    loss_mask[trained_from:] = mask
    advantages = np.where(loss_mask > 0, np.float32(weight), np.float32(0)).astype(np.float32)
    starts = token_step_starts(list(target_ids), ctx.decode, ctx.cfg.algorithm.reset.step_delimiter) if target_ids else []
    return ExperienceRecord(
        record_id=f"{group_id}#sft",
        prompt_id=prompt.prompt_id,
        group_id=group_id,
        method=method,
        policy_version=ctx.policy_version,
        token_ids=np.asarray(token_ids, dtype=np.int32),
        prompt_length=trained_from,
        loss_mask=loss_mask,
        advantages=advantages,
        behaviour_logprobs=np.zeros(len(token_ids), dtype=np.float32),
        reward=float(reward),
        temperature=temperature,
        step_boundaries=[trained_from + start for start in starts],
        target_token_ids=np.asarray(target_ids, dtype=np.int32),
    )


def report_record_shortfall(ctx: RolloutContext, num_prompts: int, num_records: int) -> None:
    """Tell the driver how many prompts' worth of records this batch did not produce (rounded up), so it feeds
    replacements: a prompt's worth is cfg.records_per_prompt (counter prompts_without_records)."""
    missing = num_prompts * ctx.cfg.records_per_prompt - num_records
    if missing > 0:
        ctx.stats["prompts_without_records"] += -(-missing // ctx.cfg.records_per_prompt)


@dataclass
class ScoredGroup:
    """Completions of one context scored by the verifier: one baseline group for the advantage."""

    prompt: PromptRecord
    group_id: str
    context_ids: list[int]  # what the completions were sampled from: prompt (+ a reset prefix)
    prompt_length: int  # tokens of the prompt itself inside context_ids
    completions: list[Completion]
    rewards: list[float]


def count_rewards(ctx: RolloutContext, rewards: list[float]) -> None:
    ctx.stats["reward_sum"] += sum(rewards)
    ctx.stats["rewards_scored"] += len(rewards)


def groups_with_signal(ctx: RolloutContext, groups: list[ScoredGroup], eps: float = 0.0) -> list[ScoredGroup]:
    """DAPO dynamic sampling (algorithm.dynamic_sampling): an all-equal group has zero advantage everywhere, so it
    is dropped and counted (groups_dropped_no_signal); without dynamic sampling every group is kept."""
    if not ctx.cfg.algorithm.dynamic_sampling:
        return groups
    kept = [g for g in groups if group_has_signal(g.rewards, eps=eps)]
    ctx.stats["groups_dropped_no_signal"] += len(groups) - len(kept)
    return kept


def credit_groups(ctx: RolloutContext, groups: list[ScoredGroup], method: str) -> list[ExperienceRecord]:
    """Score -> advantages -> records for every group of a batch: one batched advantage computation with a group
    index (z-score within each group, with the method's std: algorithm.advantage_ddof; algorithm.std_normalize=False
    centres only), then one record per completion."""
    if not groups:
        return []
    ddof = ctx.cfg.algorithm.advantage_ddof
    rewards = [r for g in groups for r in g.rewards]
    index = [i for i, g in enumerate(groups) for _ in g.rewards]
    advantages = group_advantages(
        torch.tensor(rewards, dtype=torch.float32), index, std_normalize=ctx.cfg.algorithm.std_normalize, ddof=ddof
    ).tolist()
    records, position = [], 0
    for group in groups:
        for i, (completion, reward) in enumerate(zip(group.completions, group.rewards)):
            records.append(trajectory_record(
                ctx, prompt=group.prompt, group_id=group.group_id, index=i, method=method,
                context_ids=group.context_ids, prompt_length=group.prompt_length, completion=completion,
                advantage=advantages[position], reward=reward,
            ))
            position += 1
    return records
