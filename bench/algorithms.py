"""Algorithm comparison: GRPO vs RRPO vs SRPO (and SuperRL / SRL / repair when asked) on one preset, same seed,
same generated-token budget; held-out accuracy vs tokens generated, and the tokens each method needs to reach
GRPO's final held-out accuracy.

Each method runs `resetrl train --config PRESET algorithm.name=M total_tokens=B` in a fresh process: the run stops
after the first step at which its rollout has generated B tokens, so every method spends the same generation
budget whatever its samples per step (rrpo/srpo sample G1 fresh + G2 continuations per failed parent, grpo G).
The run's held-out evaluation (config section `eval`: the last eval.holdout problems, never trained on, greedy,
scored before the first step, every eval.every steps and after the last) gives `eval_curve`: accuracy at the tokens
generated when that policy version was published. "Tokens to reach GRPO's final accuracy" is the generated-token
count of a method's first evaluation at or above GRPO's last one (None if none is); the table gives it as a ratio to
GRPO's own count. Training reward per step (smoothed over --smooth steps) is reported and plotted beside it.

It takes long on CPU (each SmolLM2 step is about a minute on 2 cores); run it on demand, in the background:

    python bench/algorithms.py --config configs/smollm2-arith-steps.yaml --token-budget 5000   # ~35 min on 2 cores
    python bench/algorithms.py --config configs/tiny.yaml --token-budget 600 --holdout 4 --eval-every 1  # smoke
    # after a preset change only SRPO reads: read grpo's and rrpo's earlier runs back, run srpo again
    python bench/algorithms.py --token-budget 20000 --run-dir DIR --reuse grpo,rrpo
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, load_cfg, machine, write_results


def smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def run_method(method: str, args, tmp: Path) -> dict:
    cfg = load_cfg(args.config, [f"algorithm.name={method}", *args.override])
    summary_path = tmp / f"{method}.json"
    overrides = [f"algorithm.name={method}", f"total_tokens={args.token_budget}", f"total_steps={args.max_steps}",
                 f"seed={args.seed}", f"run_name=bench-algo-{method}", f"run_dir={args.run_dir}/{method}",
                 "ray.include_dashboard=false", *args.override]
    command = [sys.executable, "-m", "resetrl.cli", "train", "--config", args.config, "--summary", str(summary_path), *overrides]
    print(f"{method}: {args.token_budget} generated tokens, {cfg.records_per_step} records per step: "
          f"{' '.join(command[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    summary["process_seconds"] = round(time.perf_counter() - started, 1)
    summary["records_per_step"] = cfg.records_per_step
    (Path(args.run_dir) / f"{method}.summary.json").write_text(json.dumps(summary, indent=2))  # kept for later reading
    return summary


def reused_summary(method: str, args) -> dict:
    """An earlier run's summary, checked against this comparison's budget and seed so a stale file is not mixed in."""
    path = Path(args.run_dir) / f"{method}.summary.json"
    if not path.exists():
        raise SystemExit(f"--reuse {method}: {path} does not exist; run {method} (drop it from --reuse)")
    summary = json.loads(path.read_text())
    run_config = json.loads((Path(args.run_dir) / method / "config.json").read_text())
    for key, wanted in (("total_tokens", args.token_budget), ("seed", args.seed)):
        if run_config.get(key) != wanted:
            raise SystemExit(f"--reuse {method}: its run had {key}={run_config.get(key)}, this comparison {wanted}")
    print(f"{method}: reusing {path}", file=sys.stderr, flush=True)
    return summary


def tokens_to_reach(tokens: list[int], rewards: list[float], target: float) -> int | None:
    for t, r in zip(tokens, rewards):
        if r >= target - 1e-9:
            return t
    return None


def compare_summaries(summaries: dict, smooth_window: int, row_extras) -> tuple[float, dict, dict]:
    """(GRPO's final held-out accuracy, curves, table) from the run summaries of each method.

    curves[m]: the eval curve (accuracy vs tokens generated) and the per-step training reward, raw and smoothed.
    table[m]: steps, tokens, first/last/best accuracy and the tokens (and ratio to GRPO's) at which m first reached
    GRPO's final accuracy, plus row_extras(summary, curves[m]).
    """
    curves, table = {}, {}
    for method, s in summaries.items():
        rewards, tokens = s.get("reward_curve") or [], s.get("tokens_generated_curve") or []
        evals = s.get("eval_curve") or []
        if not evals or len(tokens) != len(rewards):
            raise SystemExit(f"{method}: the summary lacks eval_curve or the per-step reward/token curves")
        curves[method] = {
            "eval_tokens_generated": [point["tokens_generated"] for point in evals],
            "eval_accuracy": [point["accuracy"] for point in evals],
            "eval_policy_version": [point["policy_version"] for point in evals],
            "tokens_generated": tokens, "reward": rewards, "reward_smoothed": smooth(rewards, smooth_window),
        }
    target = curves["grpo"]["eval_accuracy"][-1]
    grpo_tokens = tokens_to_reach(curves["grpo"]["eval_tokens_generated"], curves["grpo"]["eval_accuracy"], target)
    for method, s in summaries.items():
        c = curves[method]
        reached = tokens_to_reach(c["eval_tokens_generated"], c["eval_accuracy"], target)
        table[method] = {
            "steps": s["steps"], "tokens_generated": s.get("tokens_generated"),
            "accuracy_first": c["eval_accuracy"][0], "accuracy_last": c["eval_accuracy"][-1],
            "accuracy_best": max(c["eval_accuracy"]),
            "tokens_to_grpo_final_accuracy": reached,
            "tokens_ratio_vs_grpo": None if reached is None or not grpo_tokens else round(reached / grpo_tokens, 3),
            **row_extras(s, c),
        }
    return target, curves, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-arith-steps.yaml")
    parser.add_argument("--methods", default="grpo,rrpo,srpo", help="comma list; grpo is the reference")
    parser.add_argument("--token-budget", type=int, default=5000, help="generated tokens per method")
    parser.add_argument("--max-steps", type=int, default=1000, help="a cap in steps, in case the budget is never met")
    parser.add_argument("--holdout", type=int, help="eval.holdout (default: the preset's)")
    parser.add_argument("--eval-every", type=int, help="eval.every (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window over steps (training reward)")
    parser.add_argument("--run-dir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--override", action="append", default=[], help="config override key=value for every method")
    parser.add_argument("--reuse", default="", help="comma list of methods whose RUN_DIR/<method>.summary.json from an "
                        "earlier run of the same preset, seed and budget is read instead of run again (e.g. after a "
                        "preset change that only one method reads)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if "grpo" not in methods:
        raise SystemExit("--methods must include grpo: it is the reference")
    if args.holdout is not None:
        args.override.append(f"eval.holdout={args.holdout}")
    if args.eval_every is not None:
        args.override.append(f"eval.every={args.eval_every}")
    if load_cfg(args.config, args.override).eval.holdout == 0:
        raise SystemExit("the comparison needs held-out problems: give --holdout N or set eval.holdout in the preset")

    reused = [m for m in args.reuse.split(",") if m]
    if reused and args.run_dir is None:
        raise SystemExit("--reuse needs --run-dir: the earlier runs' summaries are read from there")
    with tempfile.TemporaryDirectory(prefix="bench-algo-") as tmp:
        args.run_dir = args.run_dir or f"{tmp}/runs"
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        summaries = {m: reused_summary(m, args) if m in reused else run_method(m, args, Path(tmp)) for m in methods}

    target, curves, table = compare_summaries(summaries, args.smooth, lambda s, c: {
        "records_per_step": s["records_per_step"], "samples_trained": s.get("samples_trained"),
        "tokens_trained": s.get("tokens_trained"), "reward_first": s.get("reward_mean_first"),
        "reward_last_smoothed": round(c["reward_smoothed"][-1], 4), "wall_seconds": s.get("wall_seconds"),
        **{k: s[k] for k in ("reset_rate", "localisation_parse_rate", "g2_success_rate", "superrl_sft_fraction")
           if s.get(k) is not None},
    })
    result = {
        "setup": {"config": args.config, "methods": methods, "token_budget": args.token_budget, "seed": args.seed,
                  "smooth": args.smooth, "overrides": args.override, "reused": reused},
        "machine": machine(),
        "grpo_final_accuracy": target,
        "table": table,
        "curves": curves,
    }

    import matplotlib.pyplot as plt

    fig, (acc_ax, reward_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, c in curves.items():
        acc_ax.plot(c["eval_tokens_generated"], c["eval_accuracy"], marker="o", markersize=4, label=method)
        reward_ax.plot(c["tokens_generated"], c["reward_smoothed"], marker="o", markersize=2, label=method)
    acc_ax.axhline(target, color="gray", linestyle=":", label="GRPO final")
    acc_ax.set_xlabel("tokens generated")
    acc_ax.set_ylabel("held-out accuracy (greedy)")
    acc_ax.set_title(f"{Path(args.config).name}: same seed, {args.token_budget} generated tokens each")
    acc_ax.legend()
    reward_ax.set_xlabel("tokens generated")
    reward_ax.set_ylabel(f"training reward (moving mean over {args.smooth} steps)")
    reward_ax.legend()
    write_results("algorithms", result, fig)
    print("\nmethod   steps  tokens_gen  acc_first  acc_last  tokens_to_GRPO_final  ratio", file=sys.stderr)
    for method, row in table.items():
        print(f"{method:8s} {row['steps']:5d}  {row['tokens_generated']!s:>10}  {row['accuracy_first']:9.3f}  "
              f"{row['accuracy_last']:8.3f}  {row['tokens_to_grpo_final_accuracy']!s:>20}  {row['tokens_ratio_vs_grpo']}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
