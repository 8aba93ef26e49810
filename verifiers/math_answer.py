"""The "math" verifier: extract the final answer of a response and compare it with the reference answer.

Extraction (`extract_answer`) is deliberately lenient about format, because a small model follows format
instructions loosely (docs/benchmarks.md, the SmolLM2 start-accuracy measurements: only 2-11% of its
samples contain a \\boxed{} answer when asked for one):
  1. the content of the last balanced `\\boxed{...}` (or `\\fbox{...}`), else
  2. the last phrase `Answer: X` / `Answer = X` / `The (final) answer is X` / `The answer to <...> is X` (any case,
     markdown emphasis allowed, the value may sit on the next line).
The value is then cleaned: `$`/`\\(`/`\\)` delimiters, `**`, `<...>` and trailing sentence punctuation go,
a unicode minus becomes `-`, thousands separators go from a plain number (`1,234` -> `1234`), and
`3 + 4 = 7` keeps its right-hand side when that is a plain number.

An unevaluated arithmetic expression of plain numbers ("4 - 1", "(3 + 4)") is never a correct answer: math-verify
would evaluate it, so restating the question would earn the reward. A plain fraction ("6/8") is a value.
Comparison: math-verify (`parse` + `verify`, symbolic and numeric), then a numeric fallback that also accepts a
number followed by a unit word (`12 apples`) and compares within a relative tolerance of 1e-6.
"""

from __future__ import annotations

import functools
import re
import threading
from fractions import Fraction

from math_verify import parse, verify

from resetrl.record import PromptRecord
from resetrl.verifiers import register

# Longer extracted values are not parsed with sympy: outside the main thread math-verify has no timeout.
_MAX_ANSWER_CHARS = 500
_TOLERANCE = 1e-6

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_PHRASE = re.compile(
    r"\b(?:final\s+)?answer\b(?:\s+to\b[^\n:=]{1,80}?)?[ \t*_]*(?:is\b[ \t*_]*:?|:|=)[ \t*_]*(?:\n[ \t*_]*)?([^\n]*)",
    re.IGNORECASE,
)
_PLAIN_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?"
_PLAIN_NUMBER_RE = re.compile(rf"{_PLAIN_NUMBER}")
_THOUSANDS_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ARITHMETIC_ONLY = re.compile(r"[\d\s.,+\-*/\u00d7\u00f7()]+")
_NUMBER_WITH_UNIT = re.compile(rf"\s*({_PLAIN_NUMBER})\s*([^\W\d_]+(?:\s+[^\W\d_]+)*\.?)?\s*")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} whose braces balance (a truncated one at the end is skipped)."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for end in range(match.end(), len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end() : end]
    return None


def _clean(value: str) -> str:
    value = value.replace("\u2212", "-").replace("{,}", ",")
    value = re.sub(r"\\[()\[\]]|\\?\$", "", value)
    value = value.strip(" \t\r\n*_`").rstrip(".,;:!= \t").strip(" \t*_`")
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    if "=" in value:
        right = value.rsplit("=", 1)[1].strip(" .")
        if _PLAIN_NUMBER_RE.fullmatch(right.replace(",", "")):
            value = right
    value = re.sub(r"^([-+])\s+(?=\d)", r"\1", value)
    if _THOUSANDS_NUMBER.fullmatch(value):
        value = value.replace(",", "")
    return value


def extract_answer(text: str) -> str | None:
    """The final answer of a response (see the module docstring for the rules), or None when there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return _clean(boxed) or None
    for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
        value = _clean(match.group(1))
        if value:
            return value
    return None


def _as_number(value: str) -> Fraction | None:
    match = _NUMBER_WITH_UNIT.fullmatch(value.strip())
    if match is None:
        return None
    try:
        return Fraction(match.group(1))
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere (a threaded Ray
    # actor) it must be None, and _MAX_ANSWER_CHARS bounds the work instead.
    return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
    return tuple(parse(f"${gold}$", parsing_timeout=timeout))


def answers_match(answer: str, gold: str) -> bool:
    """True when the extracted `answer` equals the reference `gold`, symbolically or numerically."""
    if len(answer) > _MAX_ANSWER_CHARS:
        return False
    if _ARITHMETIC_ONLY.fullmatch(answer) and not _PLAIN_NUMBER_RE.fullmatch(answer):
        return False  # "4 - 1" restates the question; math-verify would evaluate it and call it right
    timeout = _math_verify_timeout()
    gold_parsed = list(_parse_gold(gold, timeout))
    answer_parsed = parse(f"${answer}$", parsing_timeout=timeout)
    if gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=timeout):
        return True
    answer_number, gold_number = _as_number(answer), _as_number(_clean(gold))
    if answer_number is None or gold_number is None:
        return False
    return abs(answer_number - gold_number) <= _TOLERANCE * max(1, abs(gold_number))


@register("math")
def math_verifier(response_text: str, prompt: PromptRecord) -> float:
    answer = extract_answer(response_text)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, prompt.answer) else 0.0
