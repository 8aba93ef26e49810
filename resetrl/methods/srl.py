"""SRL, Supervised Reinforcement Learning (arXiv 2510.25992; docs/algorithms.md, "SRL"): GRPO on
step-similarity rewards against an expert solution.

Per prompt with an expert solution of N steps: draw `srl.instances_per_prompt` of its N-1 instances (problem +
expert steps 1..k-1, target step k), sample G answers for each (all instances of the batch in one engine call),
reward each answer by the similarity of its step to the expert's (-1 if malformed), and z-score within the
instance. Dynamic sampling drops instances whose rewards do not differ. A prompt without a usable expert solution
(fewer than 2 steps) gets a plain GRPO group on the outcome verifier.

Curriculum srl_then_rlvr: once the policy this actor generates with has version >= `srl.switch_after_steps`
(the learner's step count, read from the weights channel), every prompt gets GRPO on the outcome verifier.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from resetrl.actors.engines.base import SamplingSettings
from resetrl.actors.trajectories import (
    RolloutContext, ScoredGroup, count_rewards, credit_groups, report_record_shortfall,
)
from resetrl.algorithms.shaping import group_has_signal
from resetrl.algorithms.srl import MALFORMED_REWARD, srl_instances, srl_prompt, step_similarity_reward
from resetrl.data import render_text
from resetrl.methods.base import Method, OptionsSection, entry_rng, ratio, register_method
from resetrl.methods.grpo import grpo_records, outcome_groups
from resetrl.record import ExperienceRecord, PromptRecord


class SRLConfig(OptionsSection):
    """algorithm.srl: reward = similarity of the model's next step to the expert's."""

    instances_per_prompt: int = Field(
        2, ge=1, description="of a solution's N-1 instances (target step k = 2..N), this many are drawn per prompt"
    )
    dynamic_sampling: bool = Field(True, description="keep only instances whose rewards have std > reward_std_eps")
    reward_std_eps: float = Field(1e-4, ge=0)
    require_think: bool = Field(
        True, description="the step must follow '<think>...</think>' (else: malformed, reward -1); False scores the "
        "whole response when no '</think>' is present (small models that never write the tags)"
    )
    step_max_new_tokens: int | None = Field(None, ge=1, description="token budget of one step (None: rollout.max_new_tokens)")
    curriculum: Literal["srl", "srl_then_rlvr"] = Field(
        "srl", description="srl_then_rlvr: after switch_after_steps learner steps, GRPO on the outcome verifier"
    )
    switch_after_steps: int = Field(100, ge=0, description="policy version at which srl_then_rlvr switches to RLVR")


@register_method
class SRL(Method):
    name = "srl"
    summary = ("an expert solution of N steps gives N-1 instances; the model writes the next step; reward = its "
               "similarity to the expert's step; GRPO within each instance")
    options_key = "srl"
    Options = SRLConfig
    records_per_prompt_text = "rollout.group_size * srl.instances_per_prompt"
    derived_metrics = {
        "srl_malformed_rate": ("SRL answers without a step after </think> / SRL answers",
                               lambda s: ratio(s.get("srl_malformed", 0), s.get("srl_samples", 0))),
        "srl_similarity_mean": ("SRL: mean similarity of well-formed steps to the expert step",
                                lambda s: ratio(s.get("srl_similarity_sum", 0),
                                                s.get("srl_samples", 0) - s.get("srl_malformed", 0))),
        "srl_instance_keep_rate": ("SRL instances kept by dynamic sampling / instances",
                                   lambda s: ratio(s.get("srl_instances", 0) - s.get("srl_instances_dropped", 0),
                                                   s.get("srl_instances", 0))),
    }

    def records_per_prompt(self, cfg):
        return cfg.rollout.group_size * cfg.algorithm.srl.instances_per_prompt

    def rollout(self, ctx, prompts, group_ids, prompt_ids):
        return srl_rollout(ctx, prompts, group_ids, prompt_ids)


def srl_rollout(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str],
                prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
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
        # Drawn per prompt entry: a second processing of the entry draws the same instances (the same group ids).
        draw = entry_rng(ctx, group_id).sample(instances, min(srl.instances_per_prompt, len(instances)))
        chosen = sorted(draw, key=lambda i: i.step)
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
        outputs = ctx.generate([ids for *_, ids in drawn], ctx.cfg.rollout.group_size, sampling)
        groups = [_instance_group(ctx, prompt, f"{group_id}/srl.{instance.step}", instance.target, ids, completions)
                  for (prompt, group_id, instance, ids), completions in zip(drawn, outputs)]
        # SRL's own dynamic sampling (srl.dynamic_sampling, on by default): an instance whose answers score alike
        # teaches nothing.
        kept = [g for g in groups if not srl.dynamic_sampling or group_has_signal(g.rewards, eps=srl.reward_std_eps)]
        ctx.stats["srl_instances_dropped"] += len(groups) - len(kept)
        records += credit_groups(ctx, kept, SRL.name)
        report_record_shortfall(ctx, len(prompts) - len(without_expert), len(records))
    if without_expert:
        records += _outcome_groups(ctx, *map(list, zip(*without_expert)))
    return records


def _instance_group(ctx: RolloutContext, prompt: PromptRecord, group_id: str, target: str, ids: list[int],
                    completions) -> ScoredGroup:
    srl = ctx.cfg.algorithm.srl
    rewards = [step_similarity_reward(c.text, target, srl.require_think) for c in completions]
    malformed = sum(r == MALFORMED_REWARD for r in rewards)
    ctx.stats["srl_instances"] += 1
    ctx.stats["srl_samples"] += len(rewards)
    ctx.stats["srl_malformed"] += malformed
    ctx.stats["srl_similarity_sum"] += sum(r for r in rewards if r != MALFORMED_REWARD)
    count_rewards(ctx, rewards)
    return ScoredGroup(prompt, group_id, ids, len(ids), completions, rewards)


def _outcome_groups(ctx: RolloutContext, prompts, group_ids, prompt_ids) -> list[ExperienceRecord]:
    """GRPO on the outcome verifier (RLVR), reporting that a GRPO group is smaller than SRL's records per prompt."""
    dropped_before = ctx.stats["prompts_without_records"]
    records = grpo_records(ctx, outcome_groups(ctx, prompts, group_ids, prompt_ids, ctx.cfg.rollout.group_size))
    dropped = ctx.stats["prompts_without_records"] - dropped_before
    report_record_shortfall(ctx, len(prompts) - dropped, len(records))
    return records
