"""SuperRL rollout (arXiv 2506.01096; ALGORITHMS.md, "SuperRL"): per prompt, policy gradient or SFT.

G samples per prompt (all prompts in one engine call), outcome rewards, GRPO advantages. The gate c decides what
the prompt trains on: c = 1 -> its G trajectories as policy-gradient records (method "superrl"); c = 0 -> one
SFT record of the expert solution (method "superrl-sft": prompt + expert tokens, target_token_ids set), which the
learner trains with the token-mean NLL and mixes with the policy gradient (losses.supervised_loss,
superrl.gate_loss_weights). A c = 0 prompt without an expert solution keeps its policy-gradient records.
"""

from __future__ import annotations

import torch

from resetrl.actors.trajectories import RolloutContext, report_record_shortfall, supervised_record, trajectory_record
from resetrl.algorithms.advantages import grpo_advantages
from resetrl.algorithms.shaping import group_has_signal
from resetrl.algorithms.superrl import batch_gate, prompt_gate
from resetrl.data import expert_solution_text
from resetrl.record import ExperienceRecord, PromptRecord


def superrl_rollout(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str], prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
    algo = ctx.cfg.algorithm
    groups = ctx.generate(prompt_ids, ctx.cfg.rollout.group_size)
    rewards = [[ctx.score(p, c.text, c) for c in completions] for p, completions in zip(prompts, groups)]
    advantages = [grpo_advantages(torch.tensor(r, dtype=torch.float32), std_normalize=algo.std_normalize).tolist() for r in rewards]
    if algo.superrl.gate == "batch":
        gates = [batch_gate(rewards, algo.superrl.batch_min_success)] * len(prompts)
    else:
        gates = [prompt_gate(r, a, algo.superrl.gate) for r, a in zip(rewards, advantages)]

    records: list[ExperienceRecord] = []
    for prompt, group_id, ids, completions, r, a, gate in zip(prompts, group_ids, prompt_ids, groups, rewards, advantages, gates):
        ctx.stats["reward_sum"] += sum(r)
        ctx.stats["rewards_scored"] += len(r)
        ctx.stats["superrl_prompts"] += 1
        steps = prompt.metadata.get("expert_steps")
        if not gate and steps:
            ctx.stats["superrl_sft_prompts"] += 1
            records.append(_expert_record(ctx, prompt, group_id, ids, list(steps), reward=max(r)))
            continue
        if not gate:
            ctx.stats["superrl_prompts_without_expert"] += 1
        if algo.dynamic_sampling and not group_has_signal(r):
            ctx.stats["groups_dropped_no_signal"] += 1
            continue
        records += [
            trajectory_record(ctx, prompt=prompt, group_id=group_id, index=i, method="superrl", context_ids=ids,
                              prompt_length=len(ids), completion=c, advantage=adv, reward=reward)
            for i, (c, reward, adv) in enumerate(zip(completions, r, a))
        ]
    report_record_shortfall(ctx, len(prompts), len(records))
    return records


def _expert_record(ctx: RolloutContext, prompt: PromptRecord, group_id: str, ids: list[int], steps: list[str],
                   reward: float) -> ExperienceRecord:
    """Prompt + the expert solution (and the end-of-sequence token, so the model also learns where to stop)."""
    target = ctx.tokenizer.encode(expert_solution_text(steps, prompt.answer), add_special_tokens=False)
    if ctx.tokenizer.eos_token_id is not None:
        target.append(ctx.tokenizer.eos_token_id)
    return supervised_record(ctx, prompt=prompt, group_id=f"{group_id}/sft", method="superrl-sft", context_ids=ids,
                             target_ids=target, reward=reward)
