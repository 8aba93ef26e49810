"""RRPO / SRPO rollout (arXiv 2605.25507; ALGORITHMS.md): reset failed trajectories and resample from there.

Per prompt: fresh samples until G1 plus one failed parent exist (at most max_fresh_samples); no failure ->
a plain GRPO group of the same size. For a parent: split it into steps, choose the reset step k (RRPO: uniform;
SRPO: the model's own localisation; oracle: the true first wrong step, from reset.step_checker), and sample G2
continuations from prompt + steps 1..k-1. G1 and G2 are z-scored separately; G2 trains on its continuation tokens
only. With a step checker configured, every chosen k is also scored against the true first wrong step
(localisation_accuracy).

Every stage is batched over all prompts of the batch: one engine call per fresh-sampling round, one for all
localisations, one for all continuations; never one prompt at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from resetrl.actors.engines.base import Completion, SamplingSettings
from resetrl.actors.trajectories import RolloutContext, trajectory_record
from resetrl.algorithms.advantages import grpo_advantages
from resetrl.algorithms.resets import (
    localisation_prompt,
    offset_reset_step,
    oracle_reset_step,
    parse_localised_step,
    prefix_token_length,
    random_reset_step,
    reset_advantages,
    select_parent,
)
from resetrl.algorithms.shaping import group_has_signal
from resetrl.algorithms.step_checkers import get_step_checker
from resetrl.algorithms.steps import token_step_starts
from resetrl.data import render_text
from resetrl.record import ExperienceRecord, PromptRecord
from resetrl.verifiers.math_answer import extract_answer


@dataclass
class _PromptState:
    prompt: PromptRecord
    group_id: str
    prompt_ids: list[int]
    fresh: list[Completion] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    g1: list[int] = field(default_factory=list)
    parent: int | None = None


@dataclass
class _ResetPoint:
    state: _PromptState
    index: int  # r-th reset of this parent
    step: int  # k, 1-based
    num_steps: int
    context_ids: list[int]  # prompt + parent's steps 1..k-1
    prefix_text: str
    localisation: tuple[list[int], Completion] | None = None  # SRPO: (prompt ids, output) that chose k


def reset_rollout(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str], prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
    reset_cfg = ctx.cfg.algorithm.reset
    states = [_PromptState(p, g, ids) for p, g, ids in zip(prompts, group_ids, prompt_ids)]
    _sample_fresh(ctx, states)

    with_parent = [s for s in states if s.parent is not None]
    ctx.stats["reset_prompts"] += len(with_parent)
    ctx.stats["fallback_prompts"] += len(states) - len(with_parent)
    points = _reset_points(ctx, with_parent)
    continuations = ctx.generate([p.context_ids for p in points], reset_cfg.g2_size) if points else []

    records: list[ExperienceRecord] = []
    for state in states:
        if state.parent is None:
            records += _fallback_group(ctx, state)
    for state in with_parent:
        own = [(p, c) for p, c in zip(points, continuations) if p.state is state]
        records += _reset_groups(ctx, state, own)
    return records


def _sample_fresh(ctx: RolloutContext, states: list[_PromptState]) -> None:
    """Rounds of fresh samples for every prompt still without a parent, until G1 + parent or the budget."""
    reset_cfg = ctx.cfg.algorithm.reset
    searching = states
    while searching:
        n = min(reset_cfg.g1_size + 1, reset_cfg.max_fresh_samples - len(searching[0].fresh))
        groups = ctx.generate([s.prompt_ids for s in searching], n)
        for state, completions in zip(searching, groups):
            state.fresh += completions
            state.rewards += [ctx.score(state.prompt, c.text, c) for c in completions]
            state.g1, state.parent = select_parent(state.rewards, reset_cfg.g1_size, reset_cfg.success_threshold)
        # All prompts still searching have drawn the same number of samples, so one n fits the next round.
        searching = [s for s in searching if s.parent is None and len(s.fresh) < reset_cfg.max_fresh_samples]


def _reset_points(ctx: RolloutContext, states: list[_PromptState]) -> list[_ResetPoint]:
    reset_cfg = ctx.cfg.algorithm.reset
    parents = []
    for state in states:
        parent = state.fresh[state.parent]
        starts = token_step_starts(parent.token_ids, ctx.decode, reset_cfg.step_delimiter)
        ends = starts[1:] + [len(parent.token_ids)]
        # Shown to the model as "Step i: ...": without the delimiter (localisation_prompt expects it removed).
        steps = [ctx.decode(parent.token_ids[a:b]).replace(reset_cfg.step_delimiter, " ").strip() for a, b in zip(starts, ends)]
        parents.append((state, parent, starts, steps))

    # The true first wrong step of each parent, where a step checker can tell (synthetic tasks); else None.
    checker = get_step_checker(reset_cfg.step_checker) if reset_cfg.step_checker else None
    first_wrong = [checker(steps, state.prompt) if checker else None for state, _parent, _starts, steps in parents]
    ctx.stats["first_wrong_step_unknown"] += sum(checker is not None and k is None for k in first_wrong)

    chosen: list[list[tuple[int, tuple | None]]] = []  # per parent: [(k, localisation)] x resets_per_parent
    if ctx.cfg.algorithm.name == "srpo":
        chosen = _localise(ctx, parents)
    elif ctx.cfg.algorithm.name == "oracle":
        chosen = [[(oracle_reset_step(k, len(steps)), None)] * reset_cfg.resets_per_parent
                  for k, (_state, _parent, _starts, steps) in zip(first_wrong, parents)]
    else:
        chosen = [[(random_reset_step(len(steps), ctx.rng), None) for _ in range(reset_cfg.resets_per_parent)]
                  for _state, _parent, _starts, steps in parents]

    points = []
    for (state, parent, starts, steps), picks, true_step in zip(parents, chosen, first_wrong):
        for index, (step, localisation) in enumerate(picks):
            if true_step is not None:
                # Localisation accuracy: the chosen k (before step_offset) against the true first wrong step;
                # for rrpo that is the random baseline, for oracle 1 by construction.
                ctx.stats["localisation_checked"] += 1
                ctx.stats["localisation_correct"] += step == true_step
            step = offset_reset_step(step, reset_cfg.step_offset, len(steps))
            prefix = parent.token_ids[: prefix_token_length(starts, step)]
            ctx.stats["resets"] += 1
            ctx.stats["reset_step_fraction_sum"] += step / len(steps)
            ctx.stats["reset_step_sum"] += step
            ctx.stats["parent_steps_sum"] += len(steps)
            points.append(_ResetPoint(state, index, step, len(steps), state.prompt_ids + list(prefix), ctx.decode(list(prefix)), localisation))
    return points


def _localise(ctx: RolloutContext, parents: list) -> list[list[tuple[int, tuple]]]:
    """SRPO: ask the policy where its failed attempt went wrong; all parents in one engine call."""
    reset_cfg = ctx.cfg.algorithm.reset
    prompts_ids = []
    for state, parent, _starts, steps in parents:
        gold = state.prompt.answer if reset_cfg.reveal_gold_answer else None
        message = localisation_prompt(state.prompt.question, steps, extract_answer(parent.text), gold)
        prompts_ids.append(render_text(ctx.tokenizer, ctx.cfg.data, message))
    sampling = SamplingSettings(
        max_new_tokens=reset_cfg.localisation_max_tokens, temperature=reset_cfg.localisation_temperature
    )
    outputs = ctx.generate(prompts_ids, reset_cfg.resets_per_parent, sampling)
    chosen = []
    for (_state, _parent, _starts, steps), ids, completions in zip(parents, prompts_ids, outputs):
        picks = []
        for completion in completions:
            step, source = parse_localised_step(completion.text, len(steps))
            ctx.stats["localisations"] += 1
            ctx.stats["localisation_parsed"] += source != "fallback"
            picks.append((step, (ids, completion)))
        chosen.append(picks)
    return chosen


def _fallback_group(ctx: RolloutContext, state: _PromptState) -> list[ExperienceRecord]:
    """No failed trajectory: a plain GRPO group of the same size as G1 + G2 (ALGORITHMS.md, RRPO 2)."""
    size = ctx.cfg.algorithm.reset.records_per_prompt
    completions, rewards = state.fresh[:size], state.rewards[:size]
    ctx.stats["reward_sum"] += sum(rewards)
    ctx.stats["rewards_scored"] += len(rewards)
    if ctx.cfg.algorithm.dynamic_sampling and not group_has_signal(rewards):
        ctx.stats["prompts_without_records"] += 1
        ctx.stats["groups_dropped_no_signal"] += 1
        return []
    advantages = grpo_advantages(torch.tensor(rewards), std_normalize=ctx.cfg.algorithm.std_normalize).tolist()
    return [
        trajectory_record(ctx, prompt=state.prompt, group_id=state.group_id, index=i, method="grpo",
                          context_ids=state.prompt_ids, prompt_length=len(state.prompt_ids), completion=c,
                          advantage=a, reward=r)
        for i, (c, r, a) in enumerate(zip(completions, rewards, advantages))
    ]


def _reset_groups(ctx: RolloutContext, state: _PromptState, points: list[tuple[_ResetPoint, list[Completion]]]) -> list[ExperienceRecord]:
    algo = ctx.cfg.algorithm
    method = algo.name
    g1 = [state.fresh[i] for i in state.g1]
    g1_rewards = [state.rewards[i] for i in state.g1]
    ctx.stats["reward_sum"] += sum(g1_rewards)
    ctx.stats["rewards_scored"] += len(g1_rewards)
    g1_advantages = grpo_advantages(torch.tensor(g1_rewards), std_normalize=algo.std_normalize).tolist()
    records = [
        trajectory_record(ctx, prompt=state.prompt, group_id=f"{state.group_id}/g1", index=i, method=method,
                          context_ids=state.prompt_ids, prompt_length=len(state.prompt_ids), completion=c,
                          advantage=a, reward=r)
        for i, (c, r, a) in enumerate(zip(g1, g1_rewards, g1_advantages))
    ]
    for point, continuations in points:
        rewards = [ctx.score(state.prompt, point.prefix_text + c.text, c) for c in continuations]
        ctx.stats["g2_samples"] += len(rewards)
        ctx.stats["g2_successes"] += sum(r >= algo.reset.success_threshold for r in rewards)
        _, g2_advantages = reset_advantages(g1_rewards, rewards, std_normalize=algo.std_normalize)
        group_id = f"{state.group_id}/g2.{point.index}"
        records += [
            trajectory_record(ctx, prompt=state.prompt, group_id=group_id, index=i, method=method,
                              context_ids=point.context_ids, prompt_length=len(state.prompt_ids), completion=c,
                              advantage=a, reward=r)
            for i, (c, r, a) in enumerate(zip(continuations, rewards, g2_advantages.tolist()))
        ]
        if algo.reset.train_localisation and point.localisation and any(r >= algo.reset.success_threshold for r in rewards):
            # "The model learns to find its own mistakes": reinforce a localisation whose reset led to a success.
            ids, completion = point.localisation
            records.append(
                trajectory_record(ctx, prompt=state.prompt, group_id=f"{group_id}/localisation", index=0,
                                  method=f"{method}-localisation", context_ids=ids, prompt_length=len(ids),
                                  completion=completion, advantage=1.0, reward=1.0,
                                  temperature=algo.reset.localisation_temperature)
            )
            ctx.stats["localisation_records"] += 1
    return records
