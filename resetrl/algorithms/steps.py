"""Reasoning steps: where a response's steps start, as character spans and as token offsets.

A step is one unit of reasoning (docs/algorithms.md, "Vocabulary"). The rollout prompt asks for one step at a time, each
closed by a delimiter (default `</step>`); a response without delimiters is split on blank lines, then on sentence
ends. RRPO/SRPO reset a failed trajectory at a step, so the actor needs each step's first token: those offsets
travel in ExperienceRecord.step_boundaries. Pure functions, no Ray, Redis or DeepSpeed (docs/design.md, "Roles and data flow").
"""

from __future__ import annotations

import re
from typing import Callable

_BLANK_LINE = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?]\s+")


def split_steps(text: str, delimiter: str = "</step>") -> list[tuple[int, int]]:
    """Character spans (start, end) of the reasoning steps of `text`, covering it contiguously from 0 to len(text).

    - With the delimiter in the text, a step ends right after each delimiter (the delimiter stays in its step, and
      whatever follows it, a newline included, opens the next step). Text after the last delimiter is one more
      step (typically the final answer line) if it is not blank; blank trailing text joins the last step.
    - Without it: split after each blank-line run (`\\n\\s*\\n`, the run stays with the step before it); if that
      gives a single step, split after each sentence end (`[.!?]` and the whitespace after it); else one step.

    A piece that is blank once its delimiters are removed (e.g. the `</step>` of "a</step></step>") is not a step
    of its own: it joins the step before it, or the step after it when it leads the text. So every step has some
    non-blank content, except that a text that is all blank is one step. Empty text has no steps.
    """
    if not delimiter:
        raise ValueError("split_steps needs a non-empty step delimiter (ResetConfig.step_delimiter), got ''")
    if not text:
        return []
    if delimiter in text:
        cuts = [match.end() for match in re.finditer(re.escape(delimiter), text)]
        return _spans_between(text, cuts, delimiter)
    for separator in (_BLANK_LINE, _SENTENCE_END):
        spans = _spans_between(text, [match.end() for match in separator.finditer(text)], delimiter)
        if len(spans) > 1:
            return spans
    return [(0, len(text))]


def _spans_between(text: str, cuts: list[int], delimiter: str) -> list[tuple[int, int]]:
    """Spans between consecutive cut positions, with blank pieces merged into a neighbour (see split_steps)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for end in [*cuts, len(text)]:
        if end <= start:
            continue
        if text[start:end].replace(delimiter, "").strip():
            spans.append((start, end))
        elif spans:
            spans[-1] = (spans[-1][0], end)
        else:
            continue  # a blank lead-in: `start` stays put, so it becomes part of the next step
        start = end
    if not spans:
        spans.append((0, len(text)))
    return spans


def token_step_starts(
    token_ids: list[int], decode: Callable[[list[int]], str], delimiter: str = "</step>"
) -> list[int]:
    """Token offset (within `token_ids`, the response tokens) where each step starts; the first is 0.

    The response is decoded, split with split_steps, and each step's first character c is mapped to the first
    token offset t whose decoded prefix reaches c: decode(token_ids[:t]) is at least c characters long and its
    character c - 1 equals the text's. A token that straddles a step boundary therefore belongs to the step it
    starts in. Steps that map to the same offset (several steps inside one token) are merged, so the offsets are
    strictly increasing and every step has at least one token. Empty token_ids -> [].

    `decode` should skip special tokens (e.g. `lambda ids: tok.decode(ids, skip_special_tokens=True)`), so an
    end-of-sequence token decodes to nothing and stays in the last step instead of becoming a step of its own.

    Decoding is not always prefix-monotone: with byte-level BPE a prefix that ends inside a multi-byte character
    decodes to U+FFFD (or, with other error handlers, to several characters that vanish once the character is
    complete). The character check rejects such a prefix even when it is long enough, and the offset is found by
    bisection over t (O(steps * log T) decodes, not T): where the predicate is not monotone, bisection still
    returns an offset t whose prefix reaches c while the prefix of t - 1 does not.
    """
    if not token_ids:
        return []
    token_ids = list(token_ids)
    text = decode(token_ids)
    starts = [0]
    for char_start, _ in split_steps(text, delimiter)[1:]:
        lo, hi = starts[-1], len(token_ids)  # decode(token_ids[:hi]) == text reaches every char_start
        while lo < hi:
            mid = (lo + hi) // 2
            prefix = decode(token_ids[:mid])
            if len(prefix) >= char_start and prefix[char_start - 1] == text[char_start - 1]:
                hi = mid
            else:
                lo = mid + 1
        if starts[-1] < lo < len(token_ids):
            starts.append(lo)
    return starts
