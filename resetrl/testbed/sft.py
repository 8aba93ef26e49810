"""SFT from scratch for the chain testbed: a small Llama learns to solve chains and to localise errors (SRPO's
own localisation request, answered by re-deriving the steps), and stops as soon as its greedy held-out accuracy
enters the partial-competence band (docs/benchmarks.md, section 6).

Training data are drawn fresh every batch (problems never repeat a held-out question), so the model cannot
memorise; the stop is the held-out check every `eval_every` steps (or the step cap). Plain torch, one process:
this runs before any RL and needs nothing of Ray, Redis or DeepSpeed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from resetrl.config import DataConfig
from resetrl.record import PromptRecord
from resetrl.testbed.chain_task import ChainProblem, corrupted_steps, random_problem, response_text

# The prompt the RL preset (configs/testbed-chain.yaml, data.prompt_template) must use too: a test checks it.
PROMPT_TEMPLATE = "{question}\n"
DATA_CONFIG = DataConfig(prompt_template=PROMPT_TEMPLATE, use_chat_template=False)
# Enough for localisation_answer of a 9-step trace (~110 tokens); the preset's reset.localisation_max_tokens too.
LOCALISATION_MAX_TOKENS = 128


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    target_ids: list[int]  # trained on; ends with EOS


def record_of(problem: ChainProblem, prompt_id: str) -> PromptRecord:
    return PromptRecord(prompt_id, problem.question, str(problem.answer), "chain")


def solving_example(tokenizer, problem: ChainProblem) -> Example:
    from resetrl.data import render_prompt

    target = tokenizer.encode(response_text(problem.expert_steps(), problem.answer), add_special_tokens=False)
    return Example(render_prompt(tokenizer, DATA_CONFIG, record_of(problem, "sft")), target + [tokenizer.eos_token_id])


def localisation_request(problem: ChainProblem, rng: random.Random) -> tuple[str, int, int]:
    """(SRPO's localisation message about a corrupted trace of `problem`, its true first wrong step, step count).

    The message comes from resetrl.algorithms.resets.localisation_prompt at build time, so the model learns the
    request the RL run will send; the steps are shown as the reset rollout shows them (delimiter removed) and the
    final answer is read from the text with the math verifier's extract_answer, as the rollout reads it.
    """
    from resetrl.algorithms.resets import localisation_prompt
    from resetrl.verifiers.math_answer import extract_answer

    wrong = rng.randint(1, len(problem.operations) + 1)
    steps, final = corrupted_steps(problem, wrong, rng)
    text = response_text(steps[:-1], final)
    return localisation_prompt(problem.question, steps, extract_answer(text)), wrong, len(steps)


def localisation_answer(problem: ChainProblem, wrong_step: int) -> str:
    """The reply SFT teaches to SRPO's localisation request: the model re-derives each step itself, compares it
    with the attempt's, and stops at the first that differs, then boxes its number (what SRPO parses):

        1: 14*3=42 ok
        2: 42-8=34 ok
        3: 34+5=39 wrong
        \\boxed{3}

    Re-deriving a step is the computation the model already learns when it solves, and comparing two equations is
    a lookup, so localisation builds on the solving skill; naming k at once would need every step checked in one
    forward pass. The reference SRPO, too, lets the model reason before it boxes."""
    derived = problem.expert_steps() + [f"Answer: {problem.answer}"]
    lines = [f"{i}: {derived[i - 1]} {'ok' if i < wrong_step else 'wrong'}\n" for i in range(1, wrong_step + 1)]
    return "".join(lines) + f"\\boxed{{{wrong_step}}}"


def localisation_example(tokenizer, problem: ChainProblem, rng: random.Random) -> Example:
    from resetrl.data import render_text

    message, wrong, _count = localisation_request(problem, rng)
    target = tokenizer.encode(localisation_answer(problem, wrong), add_special_tokens=False)
    return Example(render_text(tokenizer, DATA_CONFIG, message), target + [tokenizer.eos_token_id])


def _batch(examples: list[Example], pad_id: int):
    import torch

    length = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        sequence = e.prompt_ids + e.target_ids
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(e.prompt_ids) : len(sequence)] = torch.tensor(e.target_ids)
        mask[row, : len(sequence)] = 1
    return ids, labels, mask


def greedy_outputs(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    import torch

    model.eval()
    texts = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        length = max(len(p) for p in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (length - len(p)) + p for p in chunk])  # left padding for generation
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        texts += [tokenizer.decode(row[length:], skip_special_tokens=True) for row in out]
    model.train()
    return texts


def solving_accuracy(model, tokenizer, problems: list[ChainProblem], max_new_tokens: int) -> float:
    """Greedy accuracy on `problems`, scored by the math verifier as the RL run's held-out evaluation scores it."""
    from resetrl.data import render_prompt
    from resetrl.verifiers import get_verifier

    verifier = get_verifier("math")
    records = [record_of(p, f"holdout-{i}") for i, p in enumerate(problems)]
    texts = greedy_outputs(model, tokenizer, [render_prompt(tokenizer, DATA_CONFIG, r) for r in records], max_new_tokens)
    return sum(float(verifier(text, record)) for text, record in zip(texts, records)) / len(records)


def localisation_accuracy(model, tokenizer, problems: list[ChainProblem], seed: int) -> float:
    """Greedy self-localisation accuracy on corrupted traces of `problems`, parsed as SRPO parses it."""
    from resetrl.algorithms.resets import parse_localised_step
    from resetrl.data import render_text

    rng = random.Random(seed)
    requests = [localisation_request(p, rng) for p in problems]
    texts = greedy_outputs(model, tokenizer, [render_text(tokenizer, DATA_CONFIG, m) for m, _k, _n in requests],
                           LOCALISATION_MAX_TOKENS)
    hits = sum(parse_localised_step(text, n)[0] == k for text, (_m, k, n) in zip(texts, requests))
    return hits / len(requests)


def train_until_band(model, tokenizer, settings, holdout: list[ChainProblem], log: Callable[[str], None]) -> dict:
    """SFT until a check (every settings.eval_every steps) finds the greedy held-out accuracy in [band_low,
    band_high]; it stops early when a check overshoots the band, or when max_steps (or max_seconds, when set) run
    out. From step localisation_start on, a localisation_fraction of the batches are localisation examples.
    Returns the SFT report, with wall and process CPU seconds: on a shared machine the CPU time over the torch
    threads is the better estimate of the time alone.
    """
    import torch

    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    held = {p.question for p in holdout}
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / settings.warmup_steps))

    def fresh_problem() -> ChainProblem:
        while (problem := random_problem(rng, settings.task)).question in held:
            pass
        return problem

    started, cpu_started, step, curve = time.perf_counter(), time.process_time(), 0, []
    losses: dict[bool, list[float]] = {False: [], True: []}  # per batch kind (localising?), since the last check
    max_seconds = settings.max_seconds if settings.max_seconds is not None else float("inf")
    accuracy, in_band, localisation_batches = 0.0, False, 0
    model.train()
    while step < settings.max_steps and time.perf_counter() - started < max_seconds:
        # A batch holds one kind: localisation requests are ~4x longer than traces, so trace batches stay short.
        localising = step >= settings.localisation_start and rng.random() < settings.localisation_fraction
        if localising:
            examples = [localisation_example(tokenizer, fresh_problem(), rng) for _ in range(settings.localisation_batch)]
        else:
            examples = [solving_example(tokenizer, fresh_problem()) for _ in range(settings.batch_size)]
        ids, labels, mask = _batch(examples, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
        localisation_batches += localising
        losses[localising].append(loss.item())
        step += 1
        if step % settings.eval_every:
            continue
        accuracy = solving_accuracy(model, tokenizer, holdout, settings.max_new_tokens)
        seconds = time.perf_counter() - started
        solving_loss, localisation_loss = (round(sum(v) / len(v), 4) if v else None for v in (losses[False], losses[True]))
        losses = {False: [], True: []}
        curve.append({"step": step, "seconds": round(seconds, 1), "accuracy": round(accuracy, 4),
                      "loss": solving_loss, "localisation_loss": localisation_loss})
        log(f"sft step {step}: {seconds:.0f} s, loss {solving_loss} (localisation {localisation_loss}), "
            f"held-out greedy accuracy {accuracy:.3f}")
        in_band = settings.band_low <= accuracy <= settings.band_high
        if accuracy >= settings.band_low:
            break  # in the band, or overshot it between two checks (then a smaller eval_every or lr is needed)
    return {"steps": step, "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1), "torch_threads": torch.get_num_threads(),
            "accuracy": round(accuracy, 4), "in_band": in_band, "band": [settings.band_low, settings.band_high],
            "localisation_examples": localisation_batches * settings.localisation_batch, "curve": curve}
