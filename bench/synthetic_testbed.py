"""Synthetic testbed (BENCHMARKS.md, "Algorithm comparison: two testbeds", 2): GRPO vs RRPO vs SRPO vs the oracle
reset on chain arithmetic, where every step is checkable, so the true first wrong step is known.

One command does it all, in bench/results/synthetic_testbed/:
1. generates chain problems of one-digit terms ("3 + 5 - 2 + 4") with step-by-step traces, one equation per line
   ("3 + 5 = 8\\n8 - 2 = 6\\n6 + 4 = 10\\nAnswer: 10"), and localisation examples in SRPO's own format
   (resetrl.algorithms.resets.localisation_prompt -> "\\boxed{k}", k the true first wrong step of a corrupted
   trace), so the policy starts with some self-localisation skill;
2. trains a small Llama from scratch on them (SmolLM2's tokenizer, as resetrl.models builds tiny-llama) with plain
   torch SFT, and stops at partial competence (greedy held-out accuracy >= --target-accuracy, or a step/time cap);
   the model is saved as a Hugging Face folder;
3. writes the problems as JSONL (data.source=jsonl), the held-out problems last (eval.holdout);
4. runs `resetrl train` for each method with bench/algorithms.py's run_method: same seed, same generated-token
   budget, held-out evaluation, algorithm.reset.step_checker=arithmetic_lines (so rrpo/srpo/oracle report
   localisation_accuracy: rrpo is the random baseline, oracle 1 by construction);
5. reports held-out accuracy vs generated tokens (PNG + JSON), tokens to reach GRPO's final accuracy (ratio),
   localisation accuracy and wall time per method.

    python bench/synthetic_testbed.py --quick   # smoke test: a few minutes on 2 CPU cores
    python bench/synthetic_testbed.py           # a fuller comparison (tens of minutes on 2 CPU cores)

SFT trick: the untied output layer keeps the rows of tokens that never occur in the data at exactly zero, so their
logits are 0 for any input and the full-vocabulary softmax equals a softmax over the occurring tokens plus one
"sink" logit log(number of unused tokens). Training computes only that (exact, ~1000x fewer output logits than the
49k-token vocabulary); the saved model is an ordinary LlamaForCausalLM.
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine, write_results
from algorithms import compare_summaries, run_method

NAME = "synthetic_testbed"
PROMPT_TEMPLATE = "Q: {question}\n"


# ---- data -------------------------------------------------------------------------------------------------------

def chain_problem(rng: random.Random, min_terms: int, max_terms: int) -> list[tuple[str, int]]:
    """[('+', a), (op, b), ...]: one-digit terms; '-' only where the running total stays >= 0."""
    terms = [("+", rng.randint(1, 9))]
    total = terms[0][1]
    for _ in range(rng.randint(min_terms, max_terms) - 1):
        term = rng.randint(1, 9)
        op = rng.choice("+-") if total >= term else "+"
        total += term if op == "+" else -term
        terms.append((op, term))
    return terms


def problem_text(terms: list[tuple[str, int]]) -> str:
    return " ".join([str(terms[0][1])] + [f"{op} {term}" for op, term in terms[1:]])


def trace_lines(terms: list[tuple[str, int]], wrong_step: int | None = None, rng: random.Random | None = None) -> list[str]:
    """The equations and the answer line; with wrong_step j, step j is corrupted (a miscalculation, a mis-copied
    operand or a flipped operator; j = the answer line: a wrong answer) and later steps carry the wrong value on."""
    total, lines = terms[0][1], []
    for number, (op, term) in enumerate(terms[1:], start=1):
        if number == wrong_step:
            kind = rng.choice(["result", "operand", "operator"])
            if kind == "operand":
                term = rng.choice([t for t in range(1, 10) if t != term])
            elif kind == "operator":
                op = "+" if op == "-" else "-"
        result = total + term if op == "+" else total - term
        if number == wrong_step and kind == "result":
            result += rng.choice([-2, -1, 1, 2])
        lines.append(f"{total} {op} {term} = {result}")
        total = result
    if wrong_step == len(terms):
        total += rng.choice([-1, 1])
    lines.append(f"Answer: {total}")
    return lines


def build_examples(tokenizer, data_cfg, problems: list, rng: random.Random, localisation_fraction: float):
    """(prompt ids, target ids) pairs: solved traces, plus localisation requests about corrupted ones."""
    from resetrl.data import render_prompt
    from resetrl.record import PromptRecord

    eos = tokenizer.eos_token_id
    traces, localisations = [], []
    for index, terms in enumerate(problems):
        record = PromptRecord(f"sft-{index}", problem_text(terms), str(_value(terms)), "synthetic")
        response = "\n".join(trace_lines(terms))
        traces.append((render_prompt(tokenizer, data_cfg, record), tokenizer.encode(response) + [eos]))
        if rng.random() < localisation_fraction:
            localisations.append(localisation_example(tokenizer, data_cfg, record, terms, rng))
    return traces, localisations


def localisation_example(tokenizer, data_cfg, record, terms, rng):
    """SRPO's localisation request about a corrupted trace and the answer "\\boxed{k}" (k checked by the step
    checker, so the label is the same truth the RL run scores against)."""
    from resetrl.algorithms.resets import localisation_prompt
    from resetrl.algorithms.step_checkers import arithmetic_lines
    from resetrl.data import render_text
    from resetrl.verifiers.math_answer import extract_answer

    # Mostly equation errors; an answer-line error (k = the last step) now and then.
    wrong = rng.randint(1, len(terms) - 1) if rng.random() < 0.85 else len(terms)
    lines = trace_lines(terms, wrong, rng)
    assert arithmetic_lines(lines, record) == wrong, (lines, wrong)
    message = localisation_prompt(record.question, lines, extract_answer("\n".join(lines)))
    target = tokenizer.encode(f"\n\\boxed{{{wrong}}}") + [tokenizer.eos_token_id]
    return render_text(tokenizer, data_cfg, message), target, wrong, len(lines)


def _value(terms) -> int:
    return sum(term if op == "+" else -term for op, term in terms)


def unique_problems(rng: random.Random, count: int, min_terms: int, max_terms: int, exclude: set = frozenset()) -> list:
    seen, out = set(exclude), []
    while len(out) < count:
        terms = chain_problem(rng, min_terms, max_terms)
        if problem_text(terms) not in seen:
            seen.add(problem_text(terms))
            out.append(terms)
    return out


# ---- SFT --------------------------------------------------------------------------------------------------------

def sft(args, tokenizer, data_cfg, train_problems, holdout_problems, out: Path) -> dict:
    """Plain torch SFT from scratch until greedy held-out accuracy reaches args.target_accuracy (or a cap)."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    traces, localisations = build_examples(tokenizer, data_cfg, train_problems, rng, args.localisation_fraction)
    loc_holdout = [localisation_example(tokenizer, data_cfg, *_record_terms(i, t), rng) for i, t in enumerate(holdout_problems)]
    used = sorted({i for p, t in traces for i in p + t} | {i for p, t, _k, _n in localisations + loc_holdout for i in p + t})
    to_used = {token: index for index, token in enumerate(used)}
    compact = lambda ids: [to_used[i] for i in ids]  # noqa: E731
    # Localisation requests are ~4x longer than traces: batch each kind on its own so trace batches stay short.
    kinds = [[(compact(p), compact(t)) for p, t in traces],
             [(compact(p), compact(t)) for p, t, _k, _n in localisations]]
    config = LlamaConfig(
        vocab_size=len(used), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32, num_key_value_heads=max(1, args.hidden // 64),
        intermediate_size=4 * args.hidden, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=to_used[tokenizer.eos_token_id], pad_token_id=to_used[tokenizer.eos_token_id],
    )
    model = LlamaForCausalLM(config)
    sink = math.log(len(tokenizer) - len(used))  # log-sum-exp of the zero logits of the unused tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    pad = config.pad_token_id
    holdout = [(compact(p), r) for p, r in _holdout_prompts(tokenizer, data_cfg, holdout_problems)]
    decode = lambda ids: tokenizer.decode([used[i] for i in ids], skip_special_tokens=True)  # noqa: E731

    curve, started, step = [], time.perf_counter(), 0
    accuracy = evaluate_solving(model, holdout, decode, pad)
    curve.append({"step": 0, "seconds": 0.0, "accuracy": accuracy})
    while accuracy < args.target_accuracy and step < args.sft_max_steps and time.perf_counter() - started < args.sft_max_seconds:
        model.train()
        kind = kinds[1] if kinds[1] and rng.random() < args.localisation_fraction else kinds[0]
        batch = rng.sample(kind, args.sft_batch)
        length = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), length), pad)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, (p, t) in enumerate(batch):
            ids[row, : len(p) + len(t)] = torch.tensor(p + t)
            labels[row, len(p) : len(p) + len(t)] = torch.tensor(t)
            mask[row, : len(p) + len(t)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logits = torch.cat([logits, torch.full_like(logits[..., :1], sink)], dim=-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % args.sft_eval_every == 0:
            accuracy = evaluate_solving(model, holdout, decode, pad)
            curve.append({"step": step, "seconds": round(time.perf_counter() - started, 1), "accuracy": accuracy,
                          "loss": round(loss.item(), 4)})
            print(f"  sft step {step}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f}", file=sys.stderr, flush=True)
    seconds = round(time.perf_counter() - started, 1)
    localisation_accuracy = evaluate_localisation(model, [(compact(p), k, n) for p, _t, k, n in loc_holdout], decode, pad)
    full = expand_vocabulary(model, tokenizer, used)
    full.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The saved full-vocabulary model, scored once more: its greedy answers must be the compact model's.
    saved_accuracy = evaluate_solving(full, _holdout_prompts(tokenizer, data_cfg, holdout_problems),
                                      lambda ids: tokenizer.decode(ids, skip_special_tokens=True), tokenizer.eos_token_id)
    return {
        "folder": str(out), "steps": step, "seconds": seconds, "accuracy": accuracy,
        "saved_model_accuracy": saved_accuracy, "localisation_accuracy": localisation_accuracy, "curve": curve,
        "examples": {"traces": len(traces), "localisations": len(localisations)},
        "architecture": {"hidden": args.hidden, "layers": args.layers, "vocab_used": len(used),
                         "parameters_trained": sum(p.numel() for p in model.parameters())},
    }


def expand_vocabulary(model, tokenizer, used: list[int]):
    """The compact model as an ordinary LlamaForCausalLM over the tokenizer's whole vocabulary: used tokens keep
    their rows, every other output row is zero (logit 0: the sink the training softmax accounted for)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from resetrl.models import _set_special_tokens  # the same special-token invariant as every resetrl model

    config = LlamaConfig(**{**model.config.to_dict(), "vocab_size": len(tokenizer)})
    full = LlamaForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    full.load_state_dict(state, strict=False)
    index = torch.tensor(used)
    with torch.no_grad():
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            target = full.get_parameter(name)
            target.zero_()
            target[index] = model.get_parameter(name)
    _set_special_tokens(full, tokenizer)
    return full


def _holdout_prompts(tokenizer, data_cfg, problems):
    from resetrl.data import render_prompt

    records = [_record_terms(i, t)[0] for i, t in enumerate(problems)]
    return [(render_prompt(tokenizer, data_cfg, r), r) for r in records]


def _record_terms(index: int, terms):
    from resetrl.record import PromptRecord

    return PromptRecord(f"holdout-{index}", problem_text(terms), str(_value(terms)), "synthetic"), terms


def _greedy(model, prompts: list[list[int]], pad: int, max_new_tokens: int) -> list[list[int]]:
    import torch

    model.eval()
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts])  # left padding for generation
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=model.config.eos_token_id, pad_token_id=pad)
    return [row[length:].tolist() for row in out]


def evaluate_solving(model, holdout, decode, pad) -> float:
    """Greedy accuracy (the math verifier, as the RL run's eval) on the held-out (prompt ids, record) pairs."""
    from resetrl.verifiers import get_verifier

    verifier = get_verifier("math")
    outputs = _greedy(model, [p for p, _r in holdout], pad, 48)
    return round(sum(verifier(decode(o), r) for o, (_p, r) in zip(outputs, holdout)) / len(holdout), 4)


def evaluate_localisation(model, examples, decode, pad) -> float:
    """Greedy self-localisation accuracy on corrupted held-out traces, read as SRPO reads it (parse_localised_step)."""
    from resetrl.algorithms.resets import parse_localised_step

    outputs = _greedy(model, [p for p, _k, _n in examples], pad, 12)
    hits = sum(parse_localised_step(decode(o), n)[0] == k for o, (_p, k, n) in zip(outputs, examples))
    return round(hits / len(examples), 4)


# ---- RL comparison ----------------------------------------------------------------------------------------------

def write_preset(args, model_dir: Path, data_path: Path, out: Path) -> Path:
    preset = {
        "run_name": "synthetic", "seed": args.seed,
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"source": "jsonl", "path": str(data_path), "prompt_template": PROMPT_TEMPLATE, "use_chat_template": False},
        "rollout": {"num_workers": 1, "engine": args.engine, "group_size": 8, "prompts_per_batch": args.prompts_per_step,
                    "max_new_tokens": 48, "cpus_per_worker": 1},
        "algorithm": {"verifier": "math",
                      "reset": {"step_delimiter": "\n", "step_checker": "arithmetic_lines", "localisation_max_tokens": 12}},
        "learner": {"prompts_per_step": args.prompts_per_step, "micro_batch_size": 8, "lr": args.rl_lr,
                    "zero_stage": 2, "max_staleness": 1, "cpus": 1},
        "eval": {"holdout": args.holdout, "every": args.eval_every, "max_new_tokens": 48},
        "ray": {"num_cpus": 2, "include_dashboard": False},
        "tensorboard": False,
    }
    path = out / "synthetic.yaml"
    path.write_text(json.dumps(preset, indent=2))  # JSON is YAML
    return path


def compare(args, preset: Path, out: Path) -> dict:
    runs = argparse.Namespace(config=str(preset), override=[], token_budget=args.token_budget,
                              max_steps=args.max_rl_steps, seed=args.seed, run_dir=str(out / "runs"))
    Path(runs.run_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="synthetic-") as tmp:
        return {m: run_method(m, runs, Path(tmp)) for m in args.methods.split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: a few minutes on 2 CPU cores")
    parser.add_argument("--methods", default="grpo,rrpo,srpo,oracle", help="comma list; grpo is the reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-terms", type=int, default=3)
    parser.add_argument("--max-terms", type=int, default=4)
    parser.add_argument("--problems", type=int, help="RL training problems (default 2000; quick 400)")
    parser.add_argument("--holdout", type=int, help="held-out problems, SFT and RL (default 64; quick 32)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sft-problems", type=int, default=4000)
    parser.add_argument("--localisation-fraction", type=float, default=0.3, help="SFT problems that also give a localisation example")
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--sft-batch", type=int, default=32)
    parser.add_argument("--sft-eval-every", type=int, default=50)
    parser.add_argument("--sft-max-steps", type=int, help="default 1500; quick 600")
    parser.add_argument("--sft-max-seconds", type=float, help="default 900; quick 240")
    parser.add_argument("--target-accuracy", type=float, default=0.3, help="stop SFT at this greedy held-out accuracy")
    parser.add_argument("--token-budget", type=int, help="generated tokens per method (default 40000; quick 5000)")
    parser.add_argument("--max-rl-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, help="eval.every in learner steps (default 4; quick 2)")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--rl-lr", type=float, default=1e-4)
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--smooth", type=int, default=3)
    parser.add_argument("--reuse-sft", action="store_true", help="reuse the SFT model of the last run with the same "
                        "--seed/--holdout (results dir sft-model/ and sft.json) instead of training it again")
    args = parser.parse_args()
    quick = args.quick
    defaults = {"problems": (2000, 400), "holdout": (64, 32), "sft_max_steps": (1500, 600),
                "sft_max_seconds": (900.0, 240.0), "token_budget": (40000, 5000), "eval_every": (4, 2)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if "grpo" not in args.methods.split(","):
        raise SystemExit("--methods must include grpo: it is the reference")

    from resetrl.config import DataConfig
    from resetrl.models import smollm2_tokenizer

    out = RESULTS / NAME
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = smollm2_tokenizer("~/.cache/resetrl/models")
    data_cfg = DataConfig(source="jsonl", path="unused", prompt_template=PROMPT_TEMPLATE, use_chat_template=False)
    rng = random.Random(args.seed)
    holdout = unique_problems(rng, args.holdout, args.min_terms, args.max_terms)
    held = {problem_text(t) for t in holdout}
    sft_problems = unique_problems(rng, args.sft_problems, args.min_terms, args.max_terms, exclude=held)
    rl_problems = unique_problems(rng, args.problems, args.min_terms, args.max_terms, exclude=held)

    data_path = out / "problems.jsonl"
    with data_path.open("w") as handle:  # held-out last: eval.holdout takes the last N problems
        for index, terms in enumerate(rl_problems + holdout):
            handle.write(json.dumps({"id": f"chain-{index}", "problem": problem_text(terms), "answer": str(_value(terms)),
                                     "steps": trace_lines(terms)}) + "\n")

    if args.reuse_sft and (out / "sft.json").is_file():
        policy = json.loads((out / "sft.json").read_text())  # same seed and sizes give the same problems
    else:
        print(f"SFT: {args.hidden}x{args.layers} Llama from scratch until held-out accuracy >= {args.target_accuracy}",
              file=sys.stderr, flush=True)
        policy = sft(args, tokenizer, data_cfg, sft_problems, holdout, out / "sft-model")
        (out / "sft.json").write_text(json.dumps(policy, indent=2))
    print(f"SFT: {policy['steps']} steps, {policy['seconds']} s, held-out accuracy {policy['accuracy']}, "
          f"self-localisation accuracy {policy['localisation_accuracy']}", file=sys.stderr, flush=True)

    preset = write_preset(args, out / "sft-model", data_path, out)
    summaries = compare(args, preset, out)
    report(args, policy, preset, summaries)


def report(args, policy: dict, preset: Path, summaries: dict) -> None:
    target, curves, table = compare_summaries(summaries, args.smooth, lambda s, c: {
        "localisation_accuracy": s.get("localisation_accuracy"),
        "localisation_checked": (s.get("counters") or {}).get("localisation_checked"),
        "reset_rate": s.get("reset_rate"), "g2_success_rate": s.get("g2_success_rate"),
        "wall_seconds": s.get("wall_seconds"), "process_seconds": s.get("process_seconds"),
    })
    result = {
        "setup": {k: v for k, v in vars(args).items()}, "preset": str(preset), "machine": machine(),
        "sft": policy, "grpo_final_accuracy": target, "table": table, "curves": curves,
    }

    import matplotlib.pyplot as plt

    fig, (acc_ax, loc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, c in curves.items():
        acc_ax.plot(c["eval_tokens_generated"], c["eval_accuracy"], marker="o", markersize=4, label=method)
    acc_ax.axhline(target, color="gray", linestyle=":", label="GRPO final")
    acc_ax.set_xlabel("tokens generated")
    acc_ax.set_ylabel("held-out accuracy (greedy)")
    acc_ax.set_title(f"chain arithmetic, SFT start {policy['accuracy']:.2f}, {args.token_budget} tokens each")
    acc_ax.legend()
    located = {m: row["localisation_accuracy"] for m, row in table.items() if row["localisation_accuracy"] is not None}
    names = {"rrpo": "rrpo (random)", "srpo": "srpo (self)", "oracle": "oracle"}
    loc_ax.bar([names.get(m, m) for m in located], list(located.values()), color="#4C72B0")
    loc_ax.set_ylim(0, 1.05)
    loc_ax.set_ylabel("reset step = true first wrong step")
    loc_ax.set_title("localisation accuracy during RL")
    write_results(NAME, result, fig)
    print("\nmethod  steps tokens_gen acc_first acc_last tokens_to_GRPO_final ratio  loc_acc  wall_s", file=sys.stderr)
    for method, row in table.items():
        loc = row["localisation_accuracy"]
        print(f"{method:7s} {row['steps']:5d} {row['tokens_generated']!s:>10} {row['accuracy_first']:9.3f} "
              f"{row['accuracy_last']:8.3f} {row['tokens_to_grpo_final_accuracy']!s:>20} {row['tokens_ratio_vs_grpo']!s:>5}  "
              f"{'-' if loc is None else f'{loc:.3f}':>7} {row['wall_seconds']!s:>7}", file=sys.stderr)


if __name__ == "__main__":
    main()
