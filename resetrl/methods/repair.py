"""Repair rollout: supervision internalization (IOP, arXiv 2605.05226; ALGORITHMS.md).

G samples per prompt train as a GRPO group (method "grpo"). Up to `repair.repairs_per_prompt` failed samples of
each prompt go back to the policy with a repair prompt (problem + the failed attempt + a correct sibling when
one exists); all repairs of the batch are one engine call. A repair the verifier accepts becomes a positive
sample for the *original* prompt (method "repair", a supervised record: weighted NLL, since it was sampled under
the repair prompt), with the loss gated to its first K spans that differ from the failed attempt
(repair.diff_mask).
"""

from __future__ import annotations

import torch

from resetrl.actors.engines.base import SamplingSettings
from resetrl.actors.trajectories import RolloutContext, report_record_shortfall, supervised_record, trajectory_record
from resetrl.algorithms.advantages import grpo_advantages
from resetrl.algorithms.repair import diff_mask, repair_prompt
from resetrl.algorithms.shaping import group_has_signal
from resetrl.data import render_text
from resetrl.record import ExperienceRecord, PromptRecord


def repair_rollout(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str], prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
    algo = ctx.cfg.algorithm
    repair = algo.repair
    groups = ctx.generate(prompt_ids, ctx.cfg.rollout.group_size)

    records: list[ExperienceRecord] = []
    requests = []  # (prompt, group id, prompt ids, failed completion, repair prompt ids)
    for prompt, group_id, ids, completions in zip(prompts, group_ids, prompt_ids, groups):
        rewards = [ctx.score(prompt, c.text, c) for c in completions]
        ctx.stats["reward_sum"] += sum(rewards)
        ctx.stats["rewards_scored"] += len(rewards)
        if not (algo.dynamic_sampling and not group_has_signal(rewards)):
            advantages = grpo_advantages(torch.tensor(rewards, dtype=torch.float32), std_normalize=algo.std_normalize)
            records += [
                trajectory_record(ctx, prompt=prompt, group_id=group_id, index=i, method="grpo", context_ids=ids,
                                  prompt_length=len(ids), completion=c, advantage=a, reward=r)
                for i, (c, r, a) in enumerate(zip(completions, rewards, advantages.tolist()))
            ]
        else:
            ctx.stats["groups_dropped_no_signal"] += 1
        failed = [c for c, r in zip(completions, rewards) if r < repair.success_threshold][: repair.repairs_per_prompt]
        reference = next((c.text for c, r in zip(completions, rewards) if r >= repair.success_threshold), None)
        for index, attempt in enumerate(failed):
            message = repair_prompt(prompt.question, attempt.text, reference)
            requests.append((prompt, f"{group_id}/repair.{index}", ids, attempt, render_text(ctx.tokenizer, ctx.cfg.data, message)))
            ctx.stats["repairs_with_reference"] += reference is not None

    if requests:
        sampling = SamplingSettings(ctx.sampling.max_new_tokens, repair.temperature, ctx.sampling.top_p, stop=ctx.sampling.stop)
        outputs = ctx.generate([request[-1] for request in requests], 1, sampling)
        for (prompt, group_id, ids, attempt, _), (fixed,) in zip(requests, outputs):
            records += _accepted_repair(ctx, prompt, group_id, ids, attempt, fixed)
    report_record_shortfall(ctx, len(prompts), len(records))
    return records


def _accepted_repair(ctx: RolloutContext, prompt: PromptRecord, group_id: str, ids: list[int], attempt, fixed) -> list[ExperienceRecord]:
    repair = ctx.cfg.algorithm.repair
    ctx.stats["repairs_attempted"] += 1
    reward = ctx.score(prompt, fixed.text, fixed)
    if reward < repair.success_threshold:
        return []
    ctx.stats["repairs_accepted"] += 1
    mask = diff_mask(attempt.token_ids, fixed.token_ids, repair.diff_spans, repair.span_mode)
    if not mask.any():
        ctx.stats["repairs_without_diff"] += 1  # the "repair" is the failed attempt itself: nothing to credit
        return []
    ctx.stats["repair_tokens"] += len(fixed.token_ids)
    ctx.stats["repair_tokens_trained"] += int(mask.sum())
    return [supervised_record(ctx, prompt=prompt, group_id=group_id, method="repair", context_ids=ids,
                              target_ids=fixed.token_ids, target_mask=mask, weight=repair.advantage, reward=reward)]
