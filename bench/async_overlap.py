"""Async overlap: steady-state seconds per step with rollout and learner overlapped (max_staleness 1) vs
synchronous (max_staleness 0), against the generate-only and train-only time per step.

Each repeat runs `resetrl train` twice (a fresh process each, so Ray and Redis start clean), once per
max_staleness, alternating which goes first. From each run's summary JSON:
- steady-state seconds per step: the median gap between consecutive `step_end_seconds`, skipping the first
  --skip steps (engine warm-up, first weight loads);
- train seconds per step: the median of `learner_train_seconds` (the learner's forward/backward/step) over the
  same steps;
- generate seconds per step: the median step-to-step growth of the actors' summed `generate_seconds` counter
  (`generate_seconds_curve`) over the same steps / the number of actors that generate in parallel for one step
  (min(num_workers, ceil(prompts_per_step / prompts_per_batch))).
The primary ratio uses the async run's own generate and train times (same run, same load); the ratio against the
sync run's times (no CPU competition, but a different run) is reported too.
Goal: async <= 1.15 x max(generate, train) and clearly below generate + train.

    python bench/async_overlap.py                                     # configs/tiny.yaml, 12 steps, 3 repeats
    python bench/async_overlap.py --config configs/smollm2-arith.yaml --steps 6 --skip 2 --repeats 3
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, TINY, load_cfg, machine, stats, write_results

GOAL = 1.15


def run(config: str, staleness: int, args, tmp: Path, tag: str) -> dict:
    summary = tmp / f"{tag}.json"
    overrides = [f"learner.max_staleness={staleness}", f"total_steps={args.steps}", f"run_name=bench-async-{tag}",
                 f"run_dir={tmp}/{tag}", "tensorboard=false",
                 # other runs on the host may hold the dashboard's port; the benchmark needs no dashboard
                 "ray.include_dashboard=false", *args.override]
    command = [sys.executable, "-m", "resetrl.cli", "train", "--config", config, "--summary", str(summary), *overrides]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if proc.returncode != 0:
        raise SystemExit(f"run {tag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(summary.read_text())
    data["process_seconds"] = time.perf_counter() - started
    return data


def per_step(summary: dict, cfg, skip: int) -> dict:
    ends = summary["step_end_seconds"]
    gaps = [b - a for a, b in zip(ends[skip:], ends[skip + 1 :])]
    train = summary["learner_train_seconds"][skip + 1 :]
    parallel = min(cfg.rollout.num_workers, math.ceil(cfg.learner.prompts_per_step / cfg.rollout.prompts_per_batch))
    curve = summary["generate_seconds_curve"]
    generate = statistics.median(b - a for a, b in zip(curve[skip:], curve[skip + 1 :])) / parallel
    return {"step_seconds": statistics.median(gaps), "train_seconds": statistics.median(train),
            "generate_seconds": generate, "wall_seconds": summary["wall_seconds"],
            "dropped_stale": summary.get("queue_dropped_stale", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the steady state")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rereport", default=None, help="a previous async_overlap.json: recompute, do not run")
    parser.add_argument("--override", action="append", default=[],
                        help="config override key=value, e.g. rollout.max_new_tokens=64 (applies to both runs)")
    args = parser.parse_args()
    if args.steps < args.skip + 3:
        raise SystemExit(f"--steps {args.steps}: need at least --skip + 3 = {args.skip + 3} for a steady state")
    cfg = load_cfg(args.config, args.override)

    sync_runs, async_runs = [], []
    if args.rereport:  # recompute the figures from a previous result's per-run values, without running again
        old = json.loads(Path(args.rereport).read_text())
        for side, runs in (("sync", sync_runs), ("async", async_runs)):
            names = list(old[side])
            runs += [{k: old[side][k]["values"][i] for k in names} for i in range(len(old[side][names[0]]["values"]))]
    else:
        with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
            for rep in range(args.repeats):
                order = (0, 1) if rep % 2 == 0 else (1, 0)
                for staleness in order:
                    summary = run(args.config, staleness, args, Path(tmp), f"s{staleness}-r{rep}")
                    measured = per_step(summary, cfg, args.skip)
                    (async_runs if staleness else sync_runs).append(measured)
                    print(f"  repeat {rep + 1}/{args.repeats} max_staleness={staleness}: {measured}", file=sys.stderr,
                          flush=True)

    # Primary: the async run against its own generate and train times (same run, same load; under overlap both
    # compete for the CPU, so they are the true bound). Secondary: against the sync run's, where they do not compete
    # (a different run: on a shared machine the load may differ between the two).
    def ratios(bounds_from: list[dict]) -> tuple[list[float], list[float]]:
        over_max = [a["step_seconds"] / max(b["generate_seconds"], b["train_seconds"]) for a, b in zip(async_runs, bounds_from)]
        over_sum = [a["step_seconds"] / (b["generate_seconds"] + b["train_seconds"]) for a, b in zip(async_runs, bounds_from)]
        return over_max, over_sum

    ratios_max, ratios_sum = ratios(async_runs)
    sync_max, sync_sum = ratios(sync_runs)
    result = {
        "goal": f"async step <= {GOAL} x max(generate, train) and < generate + train",
        "setup": {"config": args.config, "overrides": args.override, "steps": args.steps, "skip": args.skip,
                  "repeats": args.repeats, "num_workers": cfg.rollout.num_workers,
                  "prompts_per_step": cfg.learner.prompts_per_step, "max_new_tokens": cfg.rollout.max_new_tokens},
        "machine": machine(),
        "sync": {k: stats([r[k] for r in sync_runs]) for k in sync_runs[0]},
        "async": {k: stats([r[k] for r in async_runs]) for k in async_runs[0]},
        "async_over_max_generate_train": stats(ratios_max),
        "async_over_sum_generate_train": stats(ratios_sum),
        "async_over_max_of_sync_run_generate_train": stats(sync_max),
        "async_over_sum_of_sync_run_generate_train": stats(sync_sum),
        "sync_over_async": stats([s["step_seconds"] / a["step_seconds"] for s, a in zip(sync_runs, async_runs)]),
    }
    if args.rereport:
        result["machine"] = old["machine"]
        result["recomputed_from"] = {"file": args.rereport, "command": old["command"], "finished": old["finished"]}
    result["meets_goal"] = result["async_over_max_generate_train"]["median"] <= GOAL and result["async_over_sum_generate_train"]["median"] < 1

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["generate", "train", "generate + train", "sync (staleness 0)", "async (staleness 1)"]
    g, t = result["async"]["generate_seconds"]["median"], result["async"]["train_seconds"]["median"]
    values = [g, t, g + t, result["sync"]["step_seconds"]["median"], result["async"]["step_seconds"]["median"]]
    ax.bar(labels, values, color=["#55A868", "#4C72B0", "#8172B2", "#DD8452", "#C44E52"])
    ax.axhline(GOAL * max(g, t), color="black", linestyle="--", label=f"goal: {GOAL} x max(generate, train)")
    ax.set_ylabel("seconds per step (median)")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    ax.set_title(f"{Path(args.config).name}: steady state, steps {args.skip + 1}..{args.steps}\n"
                 "generate / train: measured inside the async runs", fontsize=9)
    write_results("async_overlap", result, fig)


if __name__ == "__main__":
    main()
