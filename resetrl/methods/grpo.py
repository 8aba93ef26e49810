"""GRPO (DeepSeekMath, arXiv 2402.03300; docs/algorithms.md, "GRPO"): G samples per prompt, outcome rewards, one
z-scored advantage per trajectory on every response token. The outcome-only baseline every other method is
measured against; its variants (Dr.GRPO, DAPO's clip-higher, dynamic sampling and overlong penalty) are options of
the algorithm section, not methods of their own."""

from __future__ import annotations

from resetrl.actors.trajectories import RolloutContext, ScoredGroup, count_rewards, credit_groups, groups_with_signal
from resetrl.methods.base import Method, register_method
from resetrl.record import ExperienceRecord, PromptRecord


def outcome_groups(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str], prompt_ids: list[list[int]],
                   group_size: int) -> list[ScoredGroup]:
    """Sample group_size completions per prompt (one engine call for the batch) and score them."""
    groups = ctx.generate(prompt_ids, group_size)
    scored = []
    for prompt, group_id, ids, completions in zip(prompts, group_ids, prompt_ids, groups):
        rewards = [ctx.score(prompt, completion.text, completion) for completion in completions]
        count_rewards(ctx, rewards)
        scored.append(ScoredGroup(prompt, group_id, ids, len(ids), completions, rewards))
    return scored


def grpo_records(ctx: RolloutContext, groups: list[ScoredGroup]) -> list[ExperienceRecord]:
    """GRPO credit for scored groups; with dynamic sampling a dropped group asks the driver for a new prompt."""
    kept = groups_with_signal(ctx, groups)
    ctx.stats["prompts_without_records"] += len(groups) - len(kept)
    return credit_groups(ctx, kept, GRPO.name)


@register_method
class GRPO(Method):
    name = "grpo"
    summary = "outcome only: reward z-scored within a group of rollout.group_size samples, on every response token"

    def rollout(self, ctx, prompts, group_ids, prompt_ids):
        return grpo_records(ctx, outcome_groups(ctx, prompts, group_ids, prompt_ids, ctx.cfg.rollout.group_size))
