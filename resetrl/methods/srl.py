"""SRL rollout (arXiv 2510.25992; ALGORITHMS.md, "SRL"): GRPO on step-similarity rewards against an expert.

Per prompt with an expert solution of N steps: draw `srl.instances_per_prompt` of its N-1 instances (problem +
expert steps 1..k-1, target step k), sample G answers for each (all instances of the batch in one engine call),
reward each answer by the similarity of its step to the expert's (-1 if malformed), and z-score within the
instance. Dynamic sampling drops instances whose rewards do not differ. A prompt without a usable expert solution
(fewer than 2 steps) gets a plain GRPO group on the outcome verifier.

Curriculum srl_then_rlvr: once the policy this actor generates with has version >= `srl.switch_after_steps`
(the learner's step count, read from the weights channel), every prompt gets GRPO on the outcome verifier.
"""

from __future__ import annotations

import torch

from resetrl.actors.engines.base import SamplingSettings
from resetrl.actors.grpo_rollout import grpo_rollout
from resetrl.actors.trajectories import RolloutContext, report_record_shortfall, trajectory_record
from resetrl.algorithms.advantages import grpo_advantages
from resetrl.algorithms.shaping import group_has_signal
from resetrl.algorithms.srl import MALFORMED_REWARD, srl_instances, srl_prompt, step_similarity_reward
from resetrl.data import render_text
from resetrl.record import ExperienceRecord, PromptRecord


def srl_rollout(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str], prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
    srl = ctx.cfg.algorithm.srl
    if srl.curriculum == "srl_then_rlvr" and ctx.policy_version >= srl.switch_after_steps:
        ctx.stats["srl_rlvr_prompts"] += len(prompts)
        return _outcome_groups(ctx, prompts, group_ids, prompt_ids)

    # (prompt, group id, instance, instance prompt ids) for every drawn instance of the batch.
    drawn, without_expert = [], []
    for prompt, group_id, ids in zip(prompts, group_ids, prompt_ids):
        instances = srl_instances(list(prompt.metadata.get("expert_steps") or []))
        if not instances:
            without_expert.append((prompt, group_id, ids))
            continue
        chosen = sorted(ctx.rng.sample(instances, min(srl.instances_per_prompt, len(instances))), key=lambda i: i.step)
        for instance in chosen:
            message = srl_prompt(prompt.question, instance.previous_steps)
            drawn.append((prompt, group_id, instance, render_text(ctx.tokenizer, ctx.cfg.data, message)))
    ctx.stats["srl_prompts"] += len(prompts) - len(without_expert)
    ctx.stats["srl_prompts_without_expert"] += len(without_expert)

    records: list[ExperienceRecord] = []
    if drawn:
        sampling = ctx.sampling
        if srl.step_max_new_tokens is not None:
            sampling = SamplingSettings(srl.step_max_new_tokens, ctx.sampling.temperature, ctx.sampling.top_p, stop=ctx.sampling.stop)
        groups = ctx.generate([ids for *_, ids in drawn], ctx.cfg.rollout.group_size, sampling)
        for (prompt, group_id, instance, ids), completions in zip(drawn, groups):
            records += _instance_group(ctx, prompt, f"{group_id}/srl.{instance.step}", instance.target, ids, completions)
        report_record_shortfall(ctx, len(prompts) - len(without_expert), len(records))
    if without_expert:
        records += _outcome_groups(ctx, *map(list, zip(*without_expert)))
    return records


def _instance_group(ctx: RolloutContext, prompt: PromptRecord, group_id: str, target: str, ids: list[int],
                    completions) -> list[ExperienceRecord]:
    srl = ctx.cfg.algorithm.srl
    rewards = [step_similarity_reward(c.text, target, srl.require_think) for c in completions]
    malformed = sum(r == MALFORMED_REWARD for r in rewards)
    ctx.stats["srl_instances"] += 1
    ctx.stats["srl_samples"] += len(rewards)
    ctx.stats["srl_malformed"] += malformed
    ctx.stats["srl_similarity_sum"] += sum(r for r in rewards if r != MALFORMED_REWARD)
    ctx.stats["reward_sum"] += sum(rewards)
    ctx.stats["rewards_scored"] += len(rewards)
    if srl.dynamic_sampling and not group_has_signal(rewards, eps=srl.reward_std_eps):
        ctx.stats["srl_instances_dropped"] += 1
        return []
    advantages = grpo_advantages(torch.tensor(rewards, dtype=torch.float32), std_normalize=ctx.cfg.algorithm.std_normalize)
    return [
        trajectory_record(ctx, prompt=prompt, group_id=group_id, index=i, method="srl", context_ids=ids,
                          prompt_length=len(ids), completion=c, advantage=a, reward=r)
        for i, (c, r, a) in enumerate(zip(completions, rewards, advantages.tolist()))
    ]


def _outcome_groups(ctx: RolloutContext, prompts, group_ids, prompt_ids) -> list[ExperienceRecord]:
    """GRPO on the outcome verifier (RLVR), reporting that a GRPO group is smaller than SRL's records per prompt."""
    dropped_before = ctx.stats["prompts_without_records"]
    records = grpo_rollout(ctx, prompts, group_ids, prompt_ids)
    dropped = ctx.stats["prompts_without_records"] - dropped_before
    report_record_shortfall(ctx, len(prompts) - dropped, len(records))
    return records
