"""Verifiers: score one sampled response against its prompt, by name.

A verifier is a callable `(response_text: str, prompt: PromptRecord) -> float` returning a reward in [0, 1].
Register one with `@register("name")`; look it up with `get_verifier(name)` (the name in
`algorithm.verifier` of the run config). Importing this package registers the built-in verifiers:
    "math"           final answer (\\boxed{} or `Answer: X`) compared with math-verify, plus a numeric fallback
    "reasoning_gym"  same answer extraction, scored by reasoning-gym's own scorer for the prompt's task
    "code"           the response's Python run against the prompt's tests in a sandboxed subprocess
"""

from __future__ import annotations

from typing import Callable

from resetrl.record import PromptRecord
from resetrl.registry import Registry

Verifier = Callable[[str, PromptRecord], float]

VERIFIERS: Registry[Verifier] = Registry("verifier", "algorithm.verifier")
register = VERIFIERS.register  # @register("name") makes a function available as get_verifier("name")
get_verifier = VERIFIERS.get


# Imported for their @register side effect; at the bottom because they import `register` from here.
from resetrl.verifiers import code_sandbox, math_answer, reasoning_gym_score  # noqa: E402,F401
