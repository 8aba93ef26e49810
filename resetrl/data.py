"""Prompts: reasoning-gym problems as PromptRecords, and their rendering into prompt token ids."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS

from resetrl.config import DataConfig
from resetrl.record import PromptRecord

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
    """The cfg.size problems of cfg.task, deterministic in (task, task_config, seed)."""
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
                metadata=_msgpack_safe(entry.get("metadata") or {}),
            )
        )
    return prompts


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
