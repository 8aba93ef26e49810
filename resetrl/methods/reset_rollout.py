"""Resets (arXiv 2605.25507; docs/algorithms.md, "RRPO" and "SRPO"): the machinery that RRPO, SRPO and the oracle
share. Reset failed trajectories and resample from there.

Per prompt: fresh samples until G1 plus one failed parent exist (at most max_fresh_samples); no failure ->
a plain GRPO group of G1 plus newly sampled chains, the size a reset would have given. For a parent: split it into steps, choose the reset step k (each reset
method's `choose_steps`: RRPO uniform, SRPO the model's own localisation, oracle the true first wrong step from
reset.step_checker), and sample G2 continuations from prompt + steps 1..k-1. G1 and G2 are z-scored separately;
G2 trains on its continuation tokens only. With a step checker configured, every chosen k is also scored against
the true first wrong step (localisation_accuracy).

Every stage is batched over all prompts of the batch: one engine call per fresh-sampling round, one for all
localisations, one for all continuations; never one prompt at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field, field_validator

from resetrl.actors.engines.base import Completion
from resetrl.actors.trajectories import RolloutContext, ScoredGroup, count_rewards, credit_groups, trajectory_record
from resetrl.algorithms.resets import offset_reset_step, prefix_token_length, select_parent
from resetrl.algorithms.shaping import group_has_signal
from resetrl.algorithms.step_checkers import get_step_checker, registered
from resetrl.algorithms.steps import token_step_starts
from resetrl.methods.base import Method, OptionsSection, ratio
from resetrl.methods.grpo import GRPO
from resetrl.record import ExperienceRecord, PromptRecord


class ResetConfig(OptionsSection):
    """algorithm.reset: RRPO / SRPO / oracle (defaults from the paper's code: 4 fresh + 4 reset trajectories)."""

    g1_size: int = Field(4, ge=1, description="fresh trajectories trained per prompt (G1)")
    g2_size: int = Field(4, ge=1, description="continuations sampled from each reset point (G2)")
    max_fresh_samples: int = Field(12, ge=2, description="fresh samples drawn at most while looking for a failed parent")
    success_threshold: float = Field(1.0, description="a trajectory with reward below this failed (may be a parent)")
    step_delimiter: str = Field("</step>", min_length=1, description="closes each step; responses are split on it")
    step_offset: int = Field(0, ge=0, description="reset m steps before the chosen step (k - m, clamped)")
    resets_per_parent: int = Field(1, ge=1, description="reset points per failed parent, each with its own G2")
    localisation_temperature: float = Field(0.3, gt=0, description="SRPO: sampling temperature of the localisation")
    localisation_max_tokens: int = Field(
        4096, ge=1, description="SRPO: token budget of the localisation answer (the reference's 4096: a model that "
        "reasons before its \\boxed{k} must not be cut off; small-model presets lower it)"
    )
    reveal_gold_answer: bool = Field(False, description="SRPO variant: show the gold answer in the localisation prompt")
    train_localisation: bool = Field(
        False, description="SRPO: also train on the localisation text (advantage +1) when a continuation from its reset succeeds"
    )
    train_parent: bool = Field(
        False, description="also train the failed parent as a member of G1 (off, as the reference: the parent is used "
        "for the reset only)"
    )
    step_checker: str | None = Field(
        None, description="a name registered in resetrl.algorithms.step_checkers (e.g. arithmetic_lines): finds the "
        "true first wrong step of a parent. Required by the oracle (it resets there); with rrpo/srpo it scores the "
        "chosen step (localisation_accuracy)"
    )

    @property
    def records_per_prompt(self) -> int:
        return self.g1_size + int(self.train_parent) + self.g2_size * self.resets_per_parent

    @field_validator("step_checker")
    @classmethod
    def _registered_checker(cls, name: str | None) -> str | None:
        if name is not None and name not in registered():
            raise ValueError(f"{name!r} is not a registered step checker; registered: {', '.join(registered())}")
        return name


def _rate(numerator: str, denominator: str):
    return lambda s: ratio(s.get(numerator, 0), s.get(denominator, 0))


class ResetMethod(Method):
    """A method that resets failed parents: subclasses say how the reset step k is chosen (`choose_steps`)."""

    options_key = "reset"
    Options = ResetConfig
    # The paper's code clips negative advantages with a dual clip of 3 (docs/algorithms.md, "RRPO").
    algorithm_defaults = {"dual_clip": 3.0}
    # The reference z-scores G1 and G2 with the population std (np.std).
    advantage_ddof = 0
    records_per_prompt_text = "(reset.g1_size + reset.train_parent + reset.g2_size * resets_per_parent)"
    derived_metrics = {
        "reset_rate": ("prompts that got a reset (a failed parent) / prompts",
                       lambda s: ratio(s.get("reset_prompts", 0), s.get("reset_prompts", 0) + s.get("fallback_prompts", 0))),
        "fallback_rate": ("prompts without a failed parent (plain GRPO group) / prompts",
                          lambda s: ratio(s.get("fallback_prompts", 0), s.get("reset_prompts", 0) + s.get("fallback_prompts", 0))),
        "localisation_parse_rate": ("SRPO localisations whose step number parsed / localisations",
                                    _rate("localisation_parsed", "localisations")),
        "localisation_accuracy": ("chosen reset steps equal to the true first wrong step (reset.step_checker) / checked",
                                  _rate("localisation_correct", "localisation_checked")),
        "reset_step_mean": ("mean reset step k", _rate("reset_step_sum", "resets")),
        "parent_steps_mean": ("mean number of steps of the reset parents", _rate("parent_steps_sum", "resets")),
        "reset_step_fraction": ("mean k / steps of the parent", _rate("reset_step_fraction_sum", "resets")),
        "g2_success_rate": ("continuations from a reset that succeeded / continuations", _rate("g2_successes", "g2_samples")),
    }

    def records_per_prompt(self, cfg):
        return cfg.algorithm.reset.records_per_prompt

    def validate(self, cfg):
        reset = cfg.algorithm.reset
        if reset.max_fresh_samples < reset.g1_size + 1:
            raise ValueError(
                f"algorithm.reset.max_fresh_samples ({reset.max_fresh_samples}) must be at least g1_size + 1 "
                f"({reset.g1_size + 1}): G1 and a failed parent are looked for among them"
            )

    def choose_steps(self, ctx: RolloutContext, parents: list, first_wrong: list[int | None]) -> list[list[tuple]]:
        """Per parent (state, completion, step starts, step texts): resets_per_parent picks (k, localisation), k in
        1..num_steps; localisation is the (prompt ids, completion) that chose k, or None."""
        raise NotImplementedError

    def rollout(self, ctx, prompts, group_ids, prompt_ids):
        return reset_rollout(self, ctx, prompts, group_ids, prompt_ids)


@dataclass
class _PromptState:
    prompt: PromptRecord
    group_id: str
    prompt_ids: list[int]
    fresh: list[Completion] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    g1: list[int] = field(default_factory=list)
    parent: int | None = None
    fallback: list[Completion] = field(default_factory=list)  # no parent: G1 + newly sampled chains
    fallback_rewards: list[float] = field(default_factory=list)


@dataclass
class _ResetPoint:
    state: _PromptState
    index: int  # r-th reset of this parent
    step: int  # k, 1-based
    num_steps: int
    context_ids: list[int]  # prompt + parent's steps 1..k-1
    prefix_text: str
    localisation: tuple[list[int], Completion] | None = None  # SRPO: (prompt ids, output) that chose k


def reset_rollout(method: ResetMethod, ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str],
                  prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
    reset_cfg = ctx.cfg.algorithm.reset
    states = [_PromptState(p, g, ids) for p, g, ids in zip(prompts, group_ids, prompt_ids)]
    _sample_fresh(ctx, states)

    with_parent = [s for s in states if s.parent is not None]
    fallback = [s for s in states if s.parent is None]
    ctx.stats["reset_prompts"] += len(with_parent)
    ctx.stats["fallback_prompts"] += len(fallback)
    _top_up_fallback(ctx, fallback)
    points = _reset_points(method, ctx, with_parent)
    # A continuation gets what is left of the response budget after its prefix, as a fresh sample would have.
    budgets = [max(1, ctx.sampling.max_new_tokens - (len(p.context_ids) - len(p.state.prompt_ids))) for p in points]
    # In thought-by-thought mode the prefix's steps count towards rollout.max_thoughts, as in the reference.
    continuations = ctx.generate([p.context_ids for p in points], reset_cfg.g2_size, budgets=budgets,
                                 prior_thoughts=[p.step - 1 for p in points]) if points else []

    records: list[ExperienceRecord] = []
    for state in fallback:
        records += _fallback_group(ctx, state)
    for state in with_parent:
        own = [(p, c) for p, c in zip(points, continuations) if p.state is state]
        records += _reset_groups(method, ctx, state, own)
    for state in states:
        _count_discarded(ctx, state)
    return records


def _sample_fresh(ctx: RolloutContext, states: list[_PromptState]) -> None:
    """Fresh samples for every prompt until G1 + a failed parent exist, or max_fresh_samples are drawn.

    The first round draws G1 + 1 per prompt (all prompts in one engine call); later rounds draw one more per prompt
    still searching, as the reference draws chains one by one: no sample is drawn that the reference would not
    draw, so equal-token comparisons do not charge the reset methods for batching (docs/algorithms.md, "SRPO").
    """
    reset_cfg = ctx.cfg.algorithm.reset
    searching = states
    n = min(reset_cfg.g1_size + 1, reset_cfg.max_fresh_samples)
    while searching:
        groups = ctx.generate([s.prompt_ids for s in searching], n)
        for state, completions in zip(searching, groups):
            state.fresh += completions
            state.rewards += [ctx.score(state.prompt, c.text, c) for c in completions]
            state.g1, state.parent = select_parent(state.rewards, reset_cfg.g1_size, reset_cfg.success_threshold)
        searching = [s for s in searching if s.parent is None and len(s.fresh) < reset_cfg.max_fresh_samples]
        n = 1


def _top_up_fallback(ctx: RolloutContext, states: list[_PromptState]) -> None:
    """No failed parent: the GRPO group is G1 plus newly sampled chains, up to the records a reset would have given
    (the reference's "4 of G1 plus 4 new"). Reusing the all-success draws instead would make every advantage 0."""
    if not states:
        return
    reset_cfg = ctx.cfg.algorithm.reset
    extra = ctx.cfg.records_per_prompt - reset_cfg.g1_size
    groups = ctx.generate([s.prompt_ids for s in states], extra) if extra > 0 else [[] for _ in states]
    for state, completions in zip(states, groups):
        state.fallback = [state.fresh[i] for i in state.g1] + list(completions)
        state.fallback_rewards = [state.rewards[i] for i in state.g1] + [
            ctx.score(state.prompt, c.text, c) for c in completions]


def _count_discarded(ctx: RolloutContext, state: _PromptState) -> None:
    """Generated tokens never trained: the parent (unless reset.train_parent) and fresh samples beyond G1."""
    trained = set(state.g1)
    if state.parent is not None and ctx.cfg.algorithm.reset.train_parent:
        trained.add(state.parent)
    discarded = [c for i, c in enumerate(state.fresh) if i not in trained]
    ctx.stats["samples_discarded"] += len(discarded)
    ctx.stats["tokens_discarded"] += sum(len(c.token_ids) for c in discarded)


def _reset_points(method: ResetMethod, ctx: RolloutContext, states: list[_PromptState]) -> list[_ResetPoint]:
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

    chosen = method.choose_steps(ctx, parents, first_wrong)

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


def _fallback_group(ctx: RolloutContext, state: _PromptState) -> list[ExperienceRecord]:
    """No failed trajectory: a plain GRPO group of the same size as G1 + G2 (docs/algorithms.md, "RRPO")."""
    group = ScoredGroup(state.prompt, state.group_id, state.prompt_ids, len(state.prompt_ids),
                        state.fallback, state.fallback_rewards)
    count_rewards(ctx, group.rewards)
    if ctx.cfg.algorithm.dynamic_sampling and not group_has_signal(group.rewards):
        ctx.stats["prompts_without_records"] += 1
        ctx.stats["groups_dropped_no_signal"] += 1
        return []
    return credit_groups(ctx, [group], GRPO.name)


def _reset_groups(method: ResetMethod, ctx: RolloutContext, state: _PromptState,
                  points: list[tuple[_ResetPoint, list[Completion]]]) -> list[ExperienceRecord]:
    """G1 and each reset point's G2, each its own baseline group; a G2 trains on its continuation tokens only."""
    reset_cfg = ctx.cfg.algorithm.reset
    # reset.train_parent: the parent also trains, as one more member of G1 (the reference never trains it).
    members = state.g1 + ([state.parent] if reset_cfg.train_parent else [])
    g1 = ScoredGroup(state.prompt, f"{state.group_id}/g1", state.prompt_ids, len(state.prompt_ids),
                     [state.fresh[i] for i in members], [state.rewards[i] for i in members])
    count_rewards(ctx, g1.rewards)
    groups = [g1]
    for point, continuations in points:
        rewards = [ctx.score(state.prompt, point.prefix_text + c.text, c) for c in continuations]
        ctx.stats["g2_samples"] += len(rewards)
        ctx.stats["g2_successes"] += sum(r >= reset_cfg.success_threshold for r in rewards)
        groups.append(ScoredGroup(state.prompt, f"{state.group_id}/g2.{point.index}", point.context_ids,
                                  len(state.prompt_ids), continuations, rewards))
    records = credit_groups(ctx, groups, method.name)
    for (point, _), group in zip(points, groups[1:]):
        if reset_cfg.train_localisation and point.localisation and any(r >= reset_cfg.success_threshold for r in group.rewards):
            # "The model learns to find its own mistakes": reinforce a localisation whose reset led to a success.
            ids, completion = point.localisation
            records.append(
                trajectory_record(ctx, prompt=state.prompt, group_id=f"{group.group_id}/localisation", index=0,
                                  method=f"{method.name}-localisation", context_ids=ids, prompt_length=len(ids),
                                  completion=completion, advantage=1.0, reward=1.0,
                                  temperature=reset_cfg.localisation_temperature)
            )
            ctx.stats["localisation_records"] += 1
    return records
