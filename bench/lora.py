"""LoRA against full fine-tuning on one preset (the default job, configs/smollm2-arith.yaml), in the same run of this
script: learner tokens/s, weight-sync bytes and seconds, and batch and held-out reward after N steps.

Each arm is `resetrl train --config PRESET total_steps=N` in a fresh process, the same seed and data; the LoRA arm
adds `learner.lora={rank, alpha, dropout, target_modules}` and its own learning rate (LoRA wants a larger one than
full fine-tuning: 10x by default, after Schulman et al. 2025, "LoRA Without Regret"). With --repeats R the arms
alternate which goes first (bench/_common.py, interleaved). The weight channel is ray_object_store by default, the
one CPU channel that counts its bytes and seconds (weight_sync_bytes, weight_sync_seconds; shared_folder counts
neither); the engines' side is weight_load_seconds.

Per arm: learner tokens/s = trained tokens / the learner's summed train seconds (forward, backward, optimizer step;
publishing excluded); per sync: bytes and learner seconds, per load: engine seconds; batch reward = the mean of the
last --last steps' batch rewards (and of the first as many); held-out accuracy before the first and after the last
step (eval.holdout problems, greedy). Ratios are LoRA / full.

A SmolLM2 step takes about a minute on 2 CPU cores: run it alone, in the background.

    python bench/lora.py                                   # 30 steps per arm, ~1 h on 2 cores
    python bench/lora.py --steps 2 --last 1 --override eval.holdout=4    # smoke
    python bench/lora.py --steps 10 --last 3 --repeats 3 --merge-for-sync  # LoRA shipped merged (bench/results/lora-merged)
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, interleaved, load_cfg, machine, stats, write_results


def run_arm(name: str, overrides: list[str], args, tmp: Path) -> dict:
    """One `resetrl train` run; its measurements."""
    summary_path = tmp / f"{name}-{time.monotonic_ns()}.json"
    command = [sys.executable, "-m", "resetrl.cli", "train", "--config", args.config, "--summary", str(summary_path),
               f"total_steps={args.steps}", f"seed={args.seed}", f"run_name=bench-lora-{name}",
               f"run_dir={args.run_dir}/{name}", f"learner.weight_channel={args.channel}",
               "ray.include_dashboard=false", *args.override, *overrides]
    print(f"{name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    (Path(args.run_dir) / f"{name}.summary.json").write_text(json.dumps(summary, indent=2))  # kept for reading
    return measure(summary, args.last, time.perf_counter() - started)


def measure(summary: dict, last: int, process_seconds: float) -> dict:
    counters = summary["counters"]
    rewards = summary["reward_curve"]
    train_seconds = sum(summary["learner_train_seconds"])
    syncs, loads = counters.get("weight_syncs", 0), counters.get("weight_loads", 0)
    return {
        "learner_tokens_per_s": counters.get("tokens_trained", 0) / max(train_seconds, 1e-9),
        "learner_train_seconds": train_seconds,
        "sync_bytes": counters["weight_sync_bytes"] / syncs if syncs else None,
        "sync_seconds": counters["weight_sync_seconds"] / syncs if syncs else None,
        "load_seconds": counters.get("weight_load_seconds", 0.0) / loads if loads else None,
        "batch_reward_first": statistics.mean(rewards[:last]),
        "batch_reward_last": statistics.mean(rewards[-last:]),
        "eval_accuracy_first": summary.get("eval_accuracy_first"),
        "eval_accuracy_last": summary.get("eval_accuracy_last"),
        "steps": summary["steps"],
        "wall_seconds": process_seconds,
        # Where the wall time goes: the rollout engines' generate calls (summed over workers), the train loop (first
        # step to last), and what is outside the loop (start-up: Ray, engines, the first evaluation; end: last
        # evaluation, final weights, plots).
        "generate_seconds": counters.get("generate_seconds"),
        "generate_seconds_per_sample": counters["generate_seconds"] / max(counters.get("samples_generated", 0), 1)
        if counters.get("generate_seconds") is not None else None,
        "train_loop_seconds": summary.get("train_loop_seconds"),
        "outside_loop_seconds": process_seconds - summary["train_loop_seconds"]
        if summary.get("train_loop_seconds") is not None else None,
        "reward_curve": rewards,
    }


def summarise(pairs: list[tuple[dict, dict]]) -> dict:
    """Per arm, each measurement's stats over the repeats; LoRA / full ratios of the rates and sizes."""
    out: dict = {"full": {}, "lora": {}, "ratio_lora_to_full": {}}
    for key in pairs[0][0]:
        if key == "reward_curve":
            continue
        for arm, index in (("full", 0), ("lora", 1)):
            values = [pair[index][key] for pair in pairs]
            out[arm][key] = stats(values) if all(v is not None for v in values) else None
    for key in ("learner_tokens_per_s", "sync_bytes", "sync_seconds", "load_seconds", "wall_seconds",
                "generate_seconds_per_sample", "train_loop_seconds", "outside_loop_seconds"):
        if all(full[key] and lora[key] for full, lora in pairs):
            out["ratio_lora_to_full"][key] = stats([lora[key] / full[key] for full, lora in pairs])
    return out


def figure(pairs: list[tuple[dict, dict]]):
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for (full, lora), rep in zip(pairs, range(len(pairs))):
        curves.plot(full["reward_curve"], color="#4C72B0", alpha=0.8, label="full" if rep == 0 else None)
        curves.plot(lora["reward_curve"], color="#C44E52", alpha=0.8, label="LoRA" if rep == 0 else None)
    curves.set(xlabel="step", ylabel="batch reward", title="batch reward per step")
    curves.legend()
    keys = ["learner_tokens_per_s", "sync_bytes", "sync_seconds"]
    ratios = [statistics.median(lora[k] / full[k] for full, lora in pairs) if all(full[k] and lora[k] for full, lora
              in pairs) else 0.0 for k in keys]
    bars.bar(["learner tokens/s", "sync bytes", "sync seconds"], ratios, color="#4C72B0")
    bars.axhline(1.0, color="grey", linestyle="--")
    bars.set_yscale("log")
    bars.set(title="LoRA / full (median)")
    for i, ratio in enumerate(ratios):
        bars.text(i, ratio, f"{ratio:.3g}", ha="center", va="bottom")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2-arith.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per arm (N)")
    parser.add_argument("--last", type=int, default=5, help="batch reward: the mean of the last (and first) this many")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", default="all-linear", help="'all-linear' or a comma-separated list")
    parser.add_argument("--lora-lr", type=float, default=None, help="default: 10x the preset's learner.lr")
    parser.add_argument("--merge-for-sync", action="store_true", help="the LoRA arm ships merged weights "
                        "(learner.lora.merge_for_sync): engines generate without adapter kernels, at a full sync's cost")
    parser.add_argument("--channel", default="ray_object_store", choices=["ray_object_store", "shared_folder"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", nargs="*", default=[], help="extra dotted.key=value for both arms")
    parser.add_argument("--run-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--name", default=None, help="results folder under bench/results (default: lora, or "
                        "lora-<preset> for another preset)")
    args = parser.parse_args()
    if args.last > args.steps:
        parser.error(f"--last {args.last} > --steps {args.steps}: average over at most the steps taken")
    cfg = load_cfg(args.config, args.override)
    lora_lr = args.lora_lr if args.lora_lr is not None else 10 * cfg.learner.lr
    targets = "all-linear" if args.target_modules == "all-linear" else \
        "[" + ", ".join(t.strip() for t in args.target_modules.split(",")) + "]"
    lora = [f"learner.lora={{rank: {args.rank}, alpha: {args.alpha}, dropout: {args.dropout}, "
            f"target_modules: {targets}, merge_for_sync: {str(args.merge_for_sync).lower()}}}",
            f"learner.lr={lora_lr:.6g}"]
    load_cfg(args.config, [*args.override, *lora])  # a bad setting stops here, before any run

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        args.run_dir = args.run_dir or str(Path(tmp) / "runs")
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        pairs = interleaved(args.repeats, lambda: run_arm("full", [], args, Path(tmp)),
                            lambda: run_arm("lora", lora, args, Path(tmp)))
    if args.channel != "ray_object_store":
        print("note: shared_folder counts no sync bytes or seconds; use --channel ray_object_store for them",
              file=sys.stderr)
    result = {
        "config": args.config, "steps": args.steps, "repeats": args.repeats, "channel": args.channel,
        "lora_settings": {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "target_modules": targets,
                          "lr": lora_lr, "merge_for_sync": args.merge_for_sync},
        "full_lr": cfg.learner.lr, "machine": machine(),
        **summarise(pairs),
        "reward_curves": {"full": [full["reward_curve"] for full, _ in pairs],
                          "lora": [lora["reward_curve"] for _, lora in pairs]},
    }
    name = args.name or ("lora" if Path(args.config).name == "smollm2-arith.yaml" else f"lora-{Path(args.config).stem}")
    name += "-merged" if args.merge_for_sync and not args.name else ""
    write_results(name, result, figure(pairs))


if __name__ == "__main__":
    main()
