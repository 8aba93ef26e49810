"""Supervision internalization (IOP, arXiv 2605.05226; docs/algorithms.md, "Self-repair"): the policy repairs its own failures.

Given the problem, a failed attempt and (when one exists) a correct sibling, the policy writes a corrected
trajectory. A repair the verifier accepts is trained as a positive sample *as an answer to the original prompt*
(the supervision is internalised: next time no repair prompt is needed), with the loss gated to the tokens where
it differs from the failed attempt: the credit goes to the fix, not to the text the two share.
Pure functions, no Ray, Redis or DeepSpeed (docs/design.md, "Roles and data flow").
"""

from __future__ import annotations

import difflib

import numpy as np

SPAN_MODES = ("k", "2k", "all")


def repair_prompt(question: str, failed_attempt: str, reference: str | None = None) -> str:
    """The user message asking the policy to repair a failed attempt (a correct sibling as reference, if any)."""
    parts = [f"Problem: {question}", f"A student's attempt, which reaches a wrong final answer:\n{failed_attempt.strip()}"]
    if reference is not None:
        parts.append(f"A correct solution, for reference:\n{reference.strip()}")
    parts.append(
        "Rewrite the student's attempt so that it is correct. Keep every part that is right and change only what is "
        "wrong. Write the corrected solution only, step by step, ending with a last line of the form 'Answer: <number>'."
    )
    return "\n\n".join(parts)


def diff_spans(failed_ids: list[int], repair_ids: list[int]) -> list[tuple[int, int]]:
    """Token spans [start, end) of the repair that differ from the failed attempt, in order (difflib opcodes
    'replace' and 'insert' on the token id sequences). A pure deletion has no repair tokens: it gives no span."""
    matcher = difflib.SequenceMatcher(None, list(failed_ids), list(repair_ids), autojunk=False)
    return [(j1, j2) for tag, _i1, _i2, j1, j2 in matcher.get_opcodes() if tag in ("replace", "insert") and j2 > j1]


def diff_mask(failed_ids: list[int], repair_ids: list[int], k: int, mode: str = "k") -> np.ndarray:
    """uint8 mask over the repair's tokens: 1 on the first K differing spans (mode "k"), the first 2K ("2k") or
    all of them ("all"). A repair identical to the failed attempt has an empty mask."""
    if mode not in SPAN_MODES:
        raise ValueError(f"unknown span mode '{mode}' (algorithm.repair.span_mode); use one of {', '.join(SPAN_MODES)}")
    if k < 1:
        raise ValueError(f"K must be >= 1 (algorithm.repair.diff_spans), got {k}")
    spans = diff_spans(failed_ids, repair_ids)
    keep = {"k": k, "2k": 2 * k, "all": len(spans)}[mode]
    mask = np.zeros(len(repair_ids), dtype=np.uint8)
    for start, end in spans[:keep]:
        mask[start:end] = 1
    return mask
