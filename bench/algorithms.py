"""Algorithm comparison: GRPO vs RRPO vs SRPO (and SuperRL / SRL / repair when asked) on one preset, same seed,
same trained-sample budget; reward vs tokens generated, and the tokens each method needs to reach GRPO's final
reward.

Each method runs `resetrl train --config PRESET algorithm.name=M total_steps=N_M` in a fresh process, where N_M is
the number of steps that trains --budget samples with M's records per step (rrpo/srpo train G1 + G2 records per
prompt, grpo G), so every method trains on about the same number of samples. From the run summaries:
`reward_curve` (mean reward of the records trained at each step) against `tokens_generated_curve` (tokens the
actors had generated when that step ended). Rewards are smoothed over --smooth steps. "Tokens to reach GRPO's
final reward" is the generated-token count at the first step where a method's smoothed reward reaches GRPO's
smoothed final reward (None if it never does); the table gives it as a ratio to GRPO's own count.

This measures training reward, not held-out accuracy: the summary has no evaluation yet. It takes long on CPU
(each SmolLM2 step is about a minute); run it on demand, in the background:

    python bench/algorithms.py --config configs/smollm2-arith.yaml --budget 512          # hours on 2 cores
    python bench/algorithms.py --config configs/tiny.yaml --budget 16 --methods grpo,rrpo,srpo   # smoke, minutes
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import json
import math
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
    steps = max(1, math.ceil(args.budget / cfg.records_per_step))
    summary_path = tmp / f"{method}.json"
    overrides = [f"algorithm.name={method}", f"total_steps={steps}", f"seed={args.seed}",
                 f"run_name=bench-algo-{method}", f"run_dir={args.run_dir}/{method}", "ray.include_dashboard=false",
                 *args.override]
    command = [sys.executable, "-m", "resetrl.cli", "train", "--config", args.config, "--summary", str(summary_path), *overrides]
    print(f"{method}: {steps} steps x {cfg.records_per_step} records: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    summary["process_seconds"] = round(time.perf_counter() - started, 1)
    summary["records_per_step"] = cfg.records_per_step
    return summary


def tokens_to_reach(tokens: list[int], rewards: list[float], target: float) -> int | None:
    for t, r in zip(tokens, rewards):
        if r >= target - 1e-9:
            return t
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-arith.yaml")
    parser.add_argument("--methods", default="grpo,rrpo,srpo", help="comma list; grpo is the reference")
    parser.add_argument("--budget", type=int, default=512, help="trained samples per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window over steps")
    parser.add_argument("--run-dir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--override", action="append", default=[], help="config override key=value for every method")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if "grpo" not in methods:
        raise SystemExit("--methods must include grpo: it is the reference")

    with tempfile.TemporaryDirectory(prefix="bench-algo-") as tmp:
        args.run_dir = args.run_dir or f"{tmp}/runs"
        summaries = {m: run_method(m, args, Path(tmp)) for m in methods}

    curves, table = {}, {}
    for method, s in summaries.items():
        rewards = s.get("reward_curve") or []
        tokens = s.get("tokens_generated_curve") or []
        if not rewards or len(tokens) != len(rewards):
            raise SystemExit(f"{method}: the summary has no per-step reward/token curve (reward_curve, tokens_generated_curve)")
        curves[method] = {"tokens_generated": tokens, "reward": rewards, "reward_smoothed": smooth(rewards, args.smooth)}
    target = curves["grpo"]["reward_smoothed"][-1]
    grpo_tokens = tokens_to_reach(curves["grpo"]["tokens_generated"], curves["grpo"]["reward_smoothed"], target)
    for method, s in summaries.items():
        reached = tokens_to_reach(curves[method]["tokens_generated"], curves[method]["reward_smoothed"], target)
        table[method] = {
            "steps": s["steps"], "records_per_step": s["records_per_step"], "samples_trained": s.get("samples_trained"),
            "tokens_generated": s.get("tokens_generated"), "tokens_trained": s.get("tokens_trained"),
            "reward_first": s.get("reward_mean_first"), "reward_last_smoothed": round(curves[method]["reward_smoothed"][-1], 4),
            "tokens_to_grpo_final": reached,
            "tokens_ratio_vs_grpo": None if reached is None or not grpo_tokens else round(reached / grpo_tokens, 3),
            "wall_seconds": s.get("wall_seconds"),
            **{k: s[k] for k in ("reset_rate", "localisation_parse_rate", "g2_success_rate") if s.get(k) is not None},
        }
    result = {
        "setup": {"config": args.config, "methods": methods, "budget_trained_samples": args.budget, "seed": args.seed,
                  "smooth": args.smooth, "overrides": args.override},
        "machine": machine(),
        "grpo_final_reward_smoothed": round(target, 4),
        "table": table,
        "curves": curves,
    }

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, c in curves.items():
        ax.plot(c["tokens_generated"], c["reward_smoothed"], marker="o", markersize=3, label=method)
    ax.axhline(target, color="gray", linestyle=":", label="GRPO final (smoothed)")
    ax.set_xlabel("tokens generated")
    ax.set_ylabel(f"training reward (moving mean over {args.smooth} steps)")
    ax.set_title(f"{Path(args.config).name}: same seed, ~{args.budget} trained samples each")
    ax.legend()
    write_results("algorithms", result, fig)
    print("\nmethod   steps  tokens_gen  reward_last  tokens_to_GRPO_final  ratio", file=sys.stderr)
    for method, row in table.items():
        print(f"{method:8s} {row['steps']:5d}  {row['tokens_generated']!s:>10}  {row['reward_last_smoothed']:11.3f}  "
              f"{row['tokens_to_grpo_final']!s:>20}  {row['tokens_ratio_vs_grpo']}", file=sys.stderr)


if __name__ == "__main__":
    main()
