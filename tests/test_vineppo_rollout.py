"""VinePPO's rollout (resetrl/methods/vineppo.py) on a scripted engine: every continuation is written out, so each
Monte Carlo value and step advantage below is computed by hand. The tokenizer is the real SmolLM2 one."""

from __future__ import annotations

import random

import numpy as np
import pytest

from resetrl.actors.engines.base import Completion, Engine, SamplingSettings
from resetrl.actors.trajectories import RolloutContext
from resetrl.algorithms.steps import token_step_starts
from resetrl.config import config_from_dict
from resetrl.methods import get_method
from resetrl.record import PromptRecord


class ScriptedEngine(Engine):
    """Answers each context with the texts `script(response_so_far)` gives (n of them), log-prob -1 per token."""

    name = "scripted"

    def __init__(self, tokenizer, prompt_text_length: int, script):
        self.tokenizer, self.prompt_text_length, self.script = tokenizer, prompt_text_length, script
        self.calls = []

    def generate(self, prompts_token_ids, n, sampling, **_):
        self.calls.append((len(prompts_token_ids), n))
        out = []
        for ids in prompts_token_ids:
            so_far = self.tokenizer.decode(ids, skip_special_tokens=True)[self.prompt_text_length:]
            texts = self.script(so_far, n)
            assert len(texts) == n
            out.append([self._completion(text) for text in texts])
        return out

    def _completion(self, text):
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return Completion(ids, [-1.0] * len(ids), text, "stop")

    def load_weights(self, weights_dir):  # pragma: no cover - not used here
        raise NotImplementedError


# Fresh samples and continuations, keyed by the response so far (what the context holds after the prompt).
SCRIPT = {
    "": ["1</step>2</step>X", "1</step>3</step>4"],
    "1</step>": ["2</step>X", "5</step>6"],
    "1</step>2</step>": ["X", "X"],
    "1</step>3</step>": ["4", "4"],
}


def reward_x(text: str, prompt) -> float:
    return 1.0 if "X" in text else 0.0


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from resetrl.config import ModelConfig
    from resetrl.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(ModelConfig(name="tiny-llama")))


def run(tokenizer, **vineppo):
    cfg = config_from_dict({"algorithm": {"name": "vineppo", "vineppo": {"k": 2, **vineppo}},
                            "rollout": {"group_size": 2, "max_new_tokens": 32}})
    prompt = PromptRecord("p0", "Q", "X", "test")
    prompt_ids = tokenizer.encode("Q:", add_special_tokens=False)
    engine = ScriptedEngine(tokenizer, len("Q:"), lambda so_far, n: SCRIPT[so_far])
    ctx = RolloutContext(cfg, engine, tokenizer, reward_x, SamplingSettings(max_new_tokens=32),
                         policy_version=3, rng=random.Random(0))
    records = get_method("vineppo").rollout(ctx, [prompt], ["p0@0"], [prompt_ids])
    return ctx, engine, records


def chunk_advantages(tokenizer, record, delimiter="</step>"):
    response = list(record.token_ids[record.prompt_length:])
    starts = token_step_starts(response, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), delimiter)
    return [float(record.advantages[record.prompt_length + s]) for s in starts]


def test_step_advantages_are_differences_of_monte_carlo_values(tokenizer):
    ctx, engine, records = run(tokenizer)
    # V(0) = mean of the two fresh rewards (1, 0) = 0.5.
    # Sample 1 "1 | 2 | X" (reward 1): V(after 1) = mean(1, 0) = 0.5; V(after 2) = mean(1, 1) = 1.
    #   A = [0.5 - 0.5, 1 - 0.5, 1 - 1] = [0, 0.5, 0]
    # Sample 2 "1 | 3 | 4" (reward 0): V(after 1) = 0.5; V(after 2) = mean(0, 0) = 0.
    #   A = [0, 0 - 0.5, 0 - 0] = [0, -0.5, 0]
    assert [r.reward for r in records] == [1.0, 0.0]
    assert chunk_advantages(tokenizer, records[0]) == pytest.approx([0.0, 0.5, 0.0])
    assert chunk_advantages(tokenizer, records[1]) == pytest.approx([0.0, -0.5, 0.0])
    # One call for the fresh samples, one for all four boundaries of the batch (K = 2 each).
    assert engine.calls == [(1, 2), (4, 2)]
    assert ctx.stats["vineppo_boundaries"] == 4 and ctx.stats["vineppo_continuations"] == 8
    for r in records:
        assert r.method == "vineppo" and r.policy_version == 3
        assert r.loss_mask[: r.prompt_length].sum() == 0 and r.loss_mask[r.prompt_length:].all()
        assert (r.advantages[: r.prompt_length] == 0).all()


def test_a_cap_on_boundaries_groups_steps_into_chunks(tokenizer):
    # max_boundaries 1: one chunk, no continuation; the advantage is the outcome advantage R - V(0) on every token.
    _ctx, engine, records = run(tokenizer, max_boundaries=1)
    assert engine.calls == [(1, 2)]
    for record, expected in zip(records, (0.5, -0.5)):
        trained = record.advantages[record.prompt_length:]
        assert np.allclose(trained, expected)
