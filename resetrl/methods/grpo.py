"""GRPO rollout: G samples per prompt, outcome rewards, one z-scored advantage per trajectory (ALGORITHMS.md)."""

from __future__ import annotations

import torch

from resetrl.actors.trajectories import RolloutContext, trajectory_record
from resetrl.algorithms.advantages import grpo_advantages
from resetrl.algorithms.shaping import group_has_signal
from resetrl.record import ExperienceRecord, PromptRecord


def grpo_rollout(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str], prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
    """All prompts of the batch in one engine call."""
    algo = ctx.cfg.algorithm
    records = []
    groups = ctx.generate(prompt_ids, ctx.cfg.rollout.group_size)
    for prompt, group_id, ids, completions in zip(prompts, group_ids, prompt_ids, groups):
        rewards = [ctx.score(prompt, completion.text, completion) for completion in completions]
        ctx.stats["reward_sum"] += sum(rewards)
        ctx.stats["rewards_scored"] += len(rewards)
        if algo.dynamic_sampling and not group_has_signal(rewards):
            # DAPO dynamic sampling: an all-equal group has zero advantage everywhere; the driver feeds a new prompt.
            ctx.stats["prompts_without_records"] += 1
            ctx.stats["groups_dropped_no_signal"] += 1
            continue
        advantages = grpo_advantages(torch.tensor(rewards, dtype=torch.float32), std_normalize=algo.std_normalize)
        for index, (completion, reward, advantage) in enumerate(zip(completions, rewards, advantages.tolist())):
            records.append(
                trajectory_record(
                    ctx, prompt=prompt, group_id=group_id, index=index, method="grpo", context_ids=ids,
                    prompt_length=len(ids), completion=completion, advantage=advantage, reward=reward,
                )
            )
    return records
