"""RolloutContext.generate on the real HF engine (tiny random Llama, SmolLM2 tokenizer): compute-token counts,
per-prompt budgets, and thought-by-thought generation (actors/engines/thoughts.py).

The tiny model's greedy output repeats a token (e.g. "user user user approx approx ..."), so a delimiter taken from
it is emitted again and again: thought-by-thought greedy decoding must rebuild the one-piece greedy output, cut into
thoughts where the delimiter's text completes.
"""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest

from resetrl.actors.engines import SamplingSettings, make_engine
from resetrl.actors.trajectories import RolloutContext
from resetrl.config import ConfigError, config_from_dict

from conftest import CallCounter  # noqa: E402  (tests/conftest.py: the real engine, calls recorded)

PROMPTS = [[1, 9690, 198, 2683, 359], [1, 4093], [5, 6, 7, 8, 9, 10, 11]]


def context(engine, tokenizer, max_new_tokens: int, temperature: float = 1.0, **rollout) -> RolloutContext:
    cfg = config_from_dict({"rollout": {"max_new_tokens": max_new_tokens, "temperature": max(temperature, 0.1),
                                        **rollout}})
    sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
    return RolloutContext(cfg, engine, tokenizer, lambda text, prompt: 0.0, sampling, policy_version=0,
                          rng=random.Random(0))


def one_piece(engine, prompt, max_new_tokens=40):
    return engine.generate([prompt], 1, SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0))[0][0]


def thought_ends(tokenizer, token_ids, delimiter, thought_max_tokens, max_thoughts):
    """Where each thought of a greedy chain ends: at the first token whose thought text holds the delimiter, or after
    thought_max_tokens tokens."""
    ends, start = [], 0
    while len(ends) < max_thoughts and start < len(token_ids):
        end = next((k for k in range(start + 1, min(start + thought_max_tokens, len(token_ids)) + 1)
                    if delimiter in tokenizer.decode(token_ids[start:k])), start + thought_max_tokens)
        ends.append(end)
        start = end
    return ends


def test_compute_tokens_count_a_prompt_once_when_the_engine_shares_its_prefill(tiny_hf):
    engine, tokenizer = tiny_hf
    ctx = context(engine, tokenizer, max_new_tokens=5)
    ctx.generate(PROMPTS, 3)  # 9 samples of 5 tokens (the near-uniform model does not end sooner)
    assert (ctx.stats["tokens_generated"], ctx.stats["tokens_prefill"], ctx.stats["tokens_compute"]) == (45, 14, 59)
    ctx.stats.clear()
    ctx.generate(PROMPTS, 3, budgets=[2, 0, 5])  # 3 * 2 + 3 * 5 tokens; prompt 1 has no budget and is not run
    assert (ctx.stats["tokens_generated"], ctx.stats["tokens_prefill"], ctx.stats["tokens_compute"]) == (21, 12, 33)
    assert ctx.stats["samples_sampled"] == 9


def test_compute_tokens_count_a_prompt_per_sample_when_the_engine_reencodes_it(tiny_hf):
    engine, tokenizer = tiny_hf
    ctx = context(engine, tokenizer, max_new_tokens=5)
    engine.shares_prompt_prefill = False
    try:
        ctx.generate(PROMPTS, 3)
    finally:
        engine.shares_prompt_prefill = True
    assert (ctx.stats["tokens_generated"], ctx.stats["tokens_prefill"], ctx.stats["tokens_compute"]) == (45, 42, 87)


def test_thought_by_thought_rebuilds_the_greedy_response_one_call_per_thought(tiny_hf):
    engine, tokenizer = tiny_hf
    prompts = [PROMPTS[1], PROMPTS[0]]
    full = [one_piece(engine, p) for p in prompts]
    delimiter = tokenizer.decode(full[0].token_ids[-1:])  # the token prompt 0 ends up repeating
    assert delimiter not in full[1].text  # prompt 1's thoughts never close: each runs to thought_max_tokens
    counter = CallCounter(engine)
    counter.shares_prompt_prefill = engine.shares_prompt_prefill
    ctx = context(counter, tokenizer, max_new_tokens=40, temperature=0.0, thought_by_thought=True, max_thoughts=3,
                  thought_max_tokens=8, thought_delimiter=delimiter)
    result = ctx.generate(prompts, 2)

    assert counter.calls == [(2, 2), (4, 1), (4, 1)]  # the first thought n per prompt, then every chain at once
    for samples, reference in zip(result, full):
        ends = thought_ends(tokenizer, reference.token_ids, delimiter, 8, 3)
        for completion in samples:
            assert completion.extra["thought_ends"] == ends
            assert completion.token_ids == reference.token_ids[: ends[-1]]
            assert len(completion.logprobs) == len(completion.token_ids)
            assert completion.logprobs == pytest.approx(reference.logprobs[: ends[-1]], abs=1e-4)
            assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            assert completion.finish_reason == "length"  # max_thoughts reached without an answer
    assert len(result[0][0].extra["thought_ends"]) == 3 and result[0][0].extra["thought_ends"][0] > 1
    assert ctx.stats["samples_sampled"] == 4
    assert ctx.stats["tokens_generated"] == sum(len(c.token_ids) for s in result for c in s)
    # Prefill: the 2 prompts once (first call), then each chain's whole context per call (the HF engine keeps no
    # cache across calls); a prompt's 2 greedy chains are alike, so their context is encoded once.
    contexts = sum(len(p) + end for p, r in zip(prompts, full)
                   for end in thought_ends(tokenizer, r.token_ids, delimiter, 8, 3)[:2])
    assert ctx.stats["tokens_prefill"] == sum(len(p) for p in prompts) + contexts


def test_a_thought_matching_the_answer_pattern_ends_the_response(tiny_hf):
    engine, tokenizer = tiny_hf
    full = one_piece(engine, PROMPTS[1])
    delimiter = tokenizer.decode(full.token_ids[-1:])
    counter = CallCounter(engine)
    ctx = context(counter, tokenizer, max_new_tokens=40, temperature=0.0, thought_by_thought=True,
                  thought_max_tokens=8, thought_delimiter=delimiter, thought_answer_pattern=re.escape(delimiter))
    completion = ctx.generate([PROMPTS[1]], 1)[0][0]
    first = thought_ends(tokenizer, full.token_ids, delimiter, 8, 1)[0]
    assert counter.calls == [(1, 1)]
    assert completion.token_ids == full.token_ids[:first]
    assert (completion.finish_reason, completion.extra["answered"]) == ("stop", True)


def test_a_thought_ends_the_response_when_the_next_might_not_fit_its_budget(tiny_hf):
    engine, tokenizer = tiny_hf
    full = one_piece(engine, PROMPTS[1])
    delimiter = tokenizer.decode(full.token_ids[-1:])
    ctx = context(engine, tokenizer, max_new_tokens=40, temperature=0.0, thought_by_thought=True,
                  thought_max_tokens=4, thought_delimiter=delimiter)
    ends = thought_ends(tokenizer, full.token_ids, delimiter, 4, 20)
    budget = ends[1] + 3  # room for 2 thoughts, then len + 4 > budget
    short, none, late = ctx.generate([PROMPTS[1]] * 3, 1, budgets=[budget, 3, 40], prior_thoughts=[0, 0, 19])
    assert short[0].extra["thought_ends"] == ends[:2] and short[0].finish_reason == "length"
    assert (none[0].token_ids, none[0].finish_reason) == ([], "length")  # 0 + 4 > 3: no thought at all
    assert late[0].extra["thought_ends"] == ends[:1]  # 19 thoughts in its prefix: one more makes max_thoughts


def test_end_of_sequence_ends_the_response(tiny_path_eos):
    # The tiny model with the token it ends up repeating as its EOS; the delimiter is the token it starts with.
    engine, tokenizer = tiny_path_eos
    full = one_piece(engine, PROMPTS[1])
    assert full.finish_reason == "stop" and full.token_ids[-1] in engine.eos_token_ids
    delimiter = tokenizer.decode(full.token_ids[:1])
    ctx = context(engine, tokenizer, max_new_tokens=40, temperature=0.0, thought_by_thought=True,
                  thought_max_tokens=8, thought_delimiter=delimiter)
    completion = ctx.generate([PROMPTS[1]], 1)[0][0]
    assert completion.token_ids == full.token_ids
    assert completion.finish_reason == "stop" and not completion.extra["answered"]
    assert len(completion.extra["thought_ends"]) >= 2


def test_calls_with_their_own_sampling_generate_in_one_piece(tiny_hf):
    engine, tokenizer = tiny_hf
    counter = CallCounter(engine)
    ctx = context(counter, tokenizer, max_new_tokens=40, thought_by_thought=True, thought_max_tokens=4)
    localisation = SamplingSettings(max_new_tokens=12, temperature=0.3)  # e.g. SRPO's localisation
    result = ctx.generate(PROMPTS, 2, localisation)
    assert counter.calls == [(3, 2)]
    assert all(len(c.token_ids) == 12 for samples in result for c in samples)


def test_a_thought_longer_than_the_response_budget_is_refused():
    with pytest.raises(ConfigError, match="thought_max_tokens = 256 > max_new_tokens = 128"):
        config_from_dict({"rollout": {"thought_by_thought": True, "max_new_tokens": 128}})


@pytest.fixture(scope="module")
def tiny_path_eos(tmp_path_factory):
    """(HF engine, tokenizer) on a copy of the tiny model whose EOS is the token its greedy output settles on."""
    from transformers import AutoTokenizer

    from resetrl.config import ModelConfig
    from resetrl.models import resolve_model

    path = resolve_model(ModelConfig(name="tiny-llama"))
    plain = make_engine("hf", str(path))
    eos = one_piece(plain, PROMPTS[1]).token_ids[-1]
    plain.close()
    folder = tmp_path_factory.mktemp("tiny-eos") / "model"
    shutil.copytree(path, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = eos
    (folder / "generation_config.json").write_text(json.dumps(generation))
    engine = make_engine("hf", str(folder))
    yield engine, AutoTokenizer.from_pretrained(folder)
    engine.close()
