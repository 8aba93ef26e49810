"""VinePPO (Kazemnejad et al. 2024, arXiv 2410.01679; docs/algorithms.md, "VinePPO"): per-step credit from Monte
Carlo values, with no critic.

Per prompt: G fresh samples (one engine call for the batch), scored. Each sample is split into steps (the step
delimiter, else blank lines, else sentences; resetrl/algorithms/steps.py) and cut into at most `max_boundaries`
chunks; at every interior chunk boundary t, K continuations are sampled from prompt + steps 1..t (the reset
primitive of RRPO/SRPO, applied at every boundary; all boundaries of the batch in one engine call) and their mean
reward is V(t). V(0) is the mean reward of the prompt's G samples and V(end) the sample's own reward. Chunk t's
tokens get A_t = V(t) - V(t-1) (resetrl/algorithms/vineppo.py), trained with the policy loss (PPO-clip by default).
The continuations only estimate values: they are never trained on.
"""

from __future__ import annotations

from pydantic import Field

from resetrl.actors.trajectories import RolloutContext, count_rewards, trajectory_record
from resetrl.algorithms.steps import token_step_starts
from resetrl.algorithms.vineppo import boundary_steps, mc_values, step_advantages, token_advantages
from resetrl.methods.base import Method, OptionsSection, ratio, register_method
from resetrl.record import ExperienceRecord, PromptRecord


class VinePPOConfig(OptionsSection):
    """algorithm.vineppo: Monte Carlo step values from K continuations per step boundary."""

    k: int = Field(4, ge=1, description="continuations sampled from each step boundary (the paper's K; it uses 9)")
    step_delimiter: str = Field("</step>", min_length=1, description="closes each step; responses are split on it")
    max_boundaries: int = Field(
        8, ge=1, description="at most this many chunks per trajectory (consecutive steps are grouped): bounds the "
        "continuations to k x (max_boundaries - 1) per sample"
    )


@register_method
class VinePPO(Method):
    name = "vineppo"
    summary = ("per-step credit: V(t) = mean reward of vineppo.k continuations from prompt + steps 1..t; the tokens "
               "of step t get V(t) - V(t-1); PPO-clip")
    options_key = "vineppo"
    Options = VinePPOConfig
    derived_metrics = {
        "vineppo_boundaries_per_sample": ("VinePPO value estimates (interior boundaries) per trained sample",
                                          lambda s: ratio(s.get("vineppo_boundaries", 0), s.get("vineppo_samples", 0))),
        "vineppo_abs_advantage_mean": ("VinePPO mean |A_t| over chunks",
                                       lambda s: ratio(s.get("vineppo_abs_advantage_sum", 0), s.get("vineppo_chunks", 0))),
    }

    def rollout(self, ctx, prompts, group_ids, prompt_ids):
        return vineppo_rollout(ctx, prompts, group_ids, prompt_ids)


def vineppo_rollout(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str],
                    prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
    options: VinePPOConfig = ctx.cfg.algorithm.vineppo
    groups = ctx.generate(prompt_ids, ctx.cfg.rollout.group_size)
    samples = []  # (prompt, group id, prompt ids, index, completion, reward, v_start, step starts, chunk ends)
    for prompt, group_id, ids, completions in zip(prompts, group_ids, prompt_ids, groups):
        rewards = [ctx.score(prompt, c.text, c) for c in completions]
        count_rewards(ctx, rewards)
        v_start = sum(rewards) / len(rewards)
        for index, (completion, reward) in enumerate(zip(completions, rewards)):
            starts = token_step_starts(completion.token_ids, ctx.decode, options.step_delimiter) or [0]
            ends = boundary_steps(len(starts), options.max_boundaries)
            samples.append((prompt, group_id, ids, index, completion, reward, v_start, starts, ends))

    # Every interior boundary of the batch: continue from prompt + steps 1..t, K times, in one engine call.
    contexts, owners = [], []
    for s, (_prompt, _gid, ids, _i, completion, _r, _v, starts, ends) in enumerate(samples):
        for end in ends[:-1]:
            contexts.append(ids + list(completion.token_ids[: starts[end]]))
            owners.append((s, starts[end]))
    # A continuation gets what is left of the response budget after its prefix, as the sample itself had.
    budgets = [max(1, ctx.sampling.max_new_tokens - prefix_length) for _s, prefix_length in owners]
    continuations = ctx.generate(contexts, options.k, budgets=budgets) if contexts else []
    values: list[list[list[float]]] = [[] for _ in samples]
    for (s, prefix_length), outputs in zip(owners, continuations):
        prompt, completion = samples[s][0], samples[s][4]
        prefix_text = ctx.decode(list(completion.token_ids[:prefix_length]))
        values[s].append([ctx.score(prompt, prefix_text + c.text, c) for c in outputs])
    ctx.stats["vineppo_boundaries"] += len(contexts)
    ctx.stats["vineppo_continuations"] += len(contexts) * options.k

    records = []
    for s, (prompt, group_id, ids, index, completion, reward, v_start, starts, ends) in enumerate(samples):
        advantages = step_advantages(v_start, mc_values(values[s]), reward)
        chunk_starts = [0] + [starts[end] for end in ends[:-1]]
        per_token = token_advantages(chunk_starts, advantages, len(completion.token_ids))
        ctx.stats["vineppo_samples"] += 1
        ctx.stats["vineppo_chunks"] += len(advantages)
        ctx.stats["vineppo_abs_advantage_sum"] += sum(abs(a) for a in advantages)
        records.append(trajectory_record(
            ctx, prompt=prompt, group_id=group_id, index=index, method=VinePPO.name, context_ids=ids,
            prompt_length=len(ids), completion=completion, advantage=per_token, reward=reward,
        ))
    return records
