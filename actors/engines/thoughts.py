"""Thought-by-thought generation (rollout.thought_by_thought), as SRPO's reference generates its chains (github
Ankur-Samanta/SRPO, training/thought_agent_loop.py; docs/algorithms.md, SRPO).

Each engine call writes one thought: it stops at the thought delimiter (kept in the output), the thought is appended
to its chain's context, and the next call continues every chain still running, all in one batch. A chain ends when a
thought matches the final-answer pattern, comes back empty, or ends without the delimiter (end-of-sequence or a
rollout.stop string), after max_thoughts thoughts, or when the next thought might not fit in the response budget
(tokens so far + thought_max_tokens > budget: the reference's check, so no response overshoots and nothing is cut).
The thoughts' tokens and log-probs are concatenated into one Completion per chain.

Where this differs from the reference: a thought that ends at end-of-sequence ends the chain (the reference asks for
another thought after it), and the final-answer pattern also accepts an `Answer:` line (the reference only looks for
`\\boxed{`), since resetrl's tasks end with either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

from resetrl.actors.engines.base import Completion, SamplingSettings, empty_completion, request_budgets

# generate(prompts_token_ids, n, sampling) -> result[i][j], as Engine.generate
Generate = Callable[[list[list[int]], int, SamplingSettings], list[list[Completion]]]


@dataclass(frozen=True)
class ThoughtLimits:
    delimiter: str
    max_thoughts: int
    thought_max_tokens: int
    answer_pattern: str  # a regular expression, searched per thought with re.MULTILINE


@dataclass
class _Chain:
    prompt: int  # index of its prompt
    budget: int  # response tokens at most
    thoughts: int  # thoughts in its context so far (a reset prefix's count towards max_thoughts)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    thought_ends: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None while running
    answered: bool = False

    def room_for_a_thought(self, limits: ThoughtLimits) -> bool:
        return (self.thoughts < limits.max_thoughts
                and len(self.token_ids) + limits.thought_max_tokens <= self.budget)


def generate_by_thought(
    generate: Generate,
    tokenizer,
    prompts_token_ids: list[list[int]],
    n: int,
    sampling: SamplingSettings,
    limits: ThoughtLimits,
    budgets: list[int] | None = None,
    prior_thoughts: list[int] | None = None,
) -> list[list[Completion]]:
    """n chains per prompt, written one thought per `generate` call; result[i][j] as Engine.generate.

    budgets[i] caps prompt i's response below sampling.max_new_tokens (a G2 continuation: the response budget minus
    its prefix); prior_thoughts[i] is the number of thoughts already in prompt i (a reset prefix's steps).
    """
    response_budgets = request_budgets(prompts_token_ids, n, sampling, budgets)
    if prior_thoughts is not None and len(prior_thoughts) != len(prompts_token_ids):
        raise ValueError(f"{len(prior_thoughts)} prior_thoughts for {len(prompts_token_ids)} prompts: give one per "
                         "prompt")
    answer = re.compile(limits.answer_pattern, re.MULTILINE)
    chains = [
        _Chain(prompt=i, budget=response_budgets[i], thoughts=prior_thoughts[i] if prior_thoughts is not None else 0)
        for i in range(len(prompts_token_ids))
        for _ in range(n)
    ]
    extra_stops = tuple(stop for stop in sampling.stop if stop != limits.delimiter)
    thought_sampling = replace(
        sampling, max_new_tokens=limits.thought_max_tokens, stop=(limits.delimiter, *extra_stops)
    )

    # First thought: the n chains of a prompt share it as their context, so they go as one prompt with n samples.
    started = sorted({c.prompt for c in chains if c.room_for_a_thought(limits)})
    for chain in chains:
        if chain.prompt not in started:
            chain.finish_reason = "length"
    calls = 0
    if started:
        groups = generate([prompts_token_ids[i] for i in started], n, _call_sampling(thought_sampling, calls))
        for i, group in zip(started, groups):
            for chain, completion in zip(chains[i * n : (i + 1) * n], group):
                _add_thought(chain, completion, tokenizer, answer, limits)
    running = [c for c in chains if c.finish_reason is None]
    while running:
        calls += 1
        contexts = [prompts_token_ids[c.prompt] + c.token_ids for c in running]
        groups = generate(contexts, 1, _call_sampling(thought_sampling, calls))
        for chain, group in zip(running, groups):
            _add_thought(chain, group[0], tokenizer, answer, limits)
        running = [c for c in running if c.finish_reason is None]

    completions = [_completion(chain, tokenizer) for chain in chains]
    return [completions[i * n : (i + 1) * n] for i in range(len(prompts_token_ids))]


def _call_sampling(sampling: SamplingSettings, call: int) -> SamplingSettings:
    # A seeded request seeds every call differently: one seed for all would replay the same noise in each thought.
    if sampling.seed is None:
        return sampling
    return replace(sampling, seed=(sampling.seed * 1_000_033 + call) % 2**31)


def _add_thought(chain: _Chain, completion: Completion, tokenizer, answer: re.Pattern, limits: ThoughtLimits) -> None:
    if not completion.token_ids:
        chain.finish_reason = "stop"
        return
    chain.token_ids += completion.token_ids
    chain.logprobs += completion.logprobs
    chain.thought_ends.append(len(chain.token_ids))
    chain.thoughts += 1
    # Special tokens kept: a delimiter the tokenizer treats as special must still be seen.
    text = tokenizer.decode(completion.token_ids, skip_special_tokens=False)
    if answer.search(text):
        chain.finish_reason, chain.answered = "stop", True
    elif completion.finish_reason == "stop" and limits.delimiter not in text:
        chain.finish_reason = "stop"  # end-of-sequence or a rollout.stop string: the response is over
    elif not chain.room_for_a_thought(limits):
        chain.finish_reason = "length"


def _completion(chain: _Chain, tokenizer) -> Completion:
    if not chain.token_ids:  # no room for a first thought, or it came back empty
        return replace(empty_completion(), finish_reason=chain.finish_reason)
    return Completion(
        token_ids=chain.token_ids,
        logprobs=chain.logprobs,
        text=tokenizer.decode(chain.token_ids, skip_special_tokens=True),
        finish_reason=chain.finish_reason,
        extra={"thought_ends": chain.thought_ends, "answered": chain.answered},
    )
