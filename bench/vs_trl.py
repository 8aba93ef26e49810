"""resetrl against TRL's GRPOTrainer on the same job, on the same box.

The job: configs/smollm2-arith.yaml (SmolLM2-135M-Instruct from the same local model folder, reasoning-gym
basic_arithmetic with its data seed, the preset's prompt template through the chat template, 8 prompts x G = 4
samples a step, at most 128 new tokens at T = 0.7, top-p 1, lr 2e-6 constant, AdamW, no weight decay, gradient
clipping 1.0, clipped policy loss eps 0.2 with a token mean over the batch (TRL's "dapo" loss = our token_mean), no
KL, rewards z-scored within a group, the "math" verifier, float32, gradient checkpointing). Neither side stops at
the preset's "\\n\\nQ:" stop string (TRL's generate is not given the tokenizer that stop strings need), unless
--resetrl-stop keeps it for resetrl.

- resetrl: `resetrl train` in a subprocess (vLLM when installed, rollout and learner overlapped, everything in the
  config's defaults: shared-prefix packing, token-budget micro-batches, threads following the work).
- TRL: GRPOTrainer in a subprocess with every core as torch threads (it generates and trains in turn, one process),
  per_device_train_batch_size 4 x gradient_accumulation_steps 8 = the step's 32 completions, HF generate (no vLLM).
Runs alternate (which side goes first alternates too), --repeats x --steps each. Seconds per step are steady-state:
(end of the last step - end of the first) / (steps - 1), so start-up (Ray, vLLM, model loading) and the first step
(resetrl's first generation has nothing to overlap with) are left out on both sides; *_s_per_step_with_first
counts from the start of training. samples/s = trained samples per step / seconds per step.

TRL is a bench-only extra (pip install trl; not a runtime dependency of resetrl).

    python bench/vs_trl.py --quick                 # 1 repeat of 3 steps each: a check, ~10 minutes on 2 cores
    python bench/vs_trl.py                         # 3 repeats of 10 steps each
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

from _common import REPO, load_cfg, machine, stats, write_results

PRESET = REPO / "configs" / "smollm2-arith.yaml"
GOAL = 3.0  # resetrl at least 3x TRL's samples/s on the default job


def _overrides(args, run_dir: Path | None = None) -> list[str]:
    """The job's config overrides, shared by both sides (resetrl's run also gets its run folder and switches)."""
    overrides = [f"total_steps={args.steps}", *args.override]
    if not args.resetrl_stop:
        overrides.append("rollout.stop=[]")
    if run_dir is not None:
        overrides += [f"run_dir={run_dir}", "tensorboard=false", "ray.include_dashboard=false",
                      "learner.checkpoint_every=0"]
        from resetrl.config import RunConfig

        if "monitor" in RunConfig.model_fields:
            overrides.append("monitor.plots=false")
    return overrides


def run_resetrl(args, work: Path, rep: int) -> dict:
    run_dir, summary = work / f"resetrl-{rep}", work / f"resetrl-{rep}.json"
    command = [str(Path(sys.executable).with_name("resetrl")), "train", "--config", str(args.config),
               "--summary", str(summary), *_overrides(args, run_dir)]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"resetrl train failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(summary.read_text())
    ends = result["step_end_seconds"]
    steps = len(ends)
    samples = result["samples_trained"] / max(steps, 1)
    return {
        "s_per_step": (ends[-1] - ends[0]) / (steps - 1) if steps > 1 else ends[-1],
        "s_per_step_with_first": ends[-1] / steps,
        "samples_per_step": samples,
        "rewards": result["reward_curve"],
        "wall_seconds": time.monotonic() - started,
        "engine": result.get("engine"),
    }


def run_trl(args, work: Path, rep: int) -> dict:
    out = work / f"trl-{rep}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.trl_threads)}
    command = [sys.executable, __file__, "--trl-worker", str(out), "--config", str(args.config),
               "--steps", str(args.steps), *[f"--override={o}" for o in args.override]]
    if args.resetrl_stop:
        command.append("--resetrl-stop")
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the TRL run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.monotonic() - started
    return result


def trl_worker(args) -> None:
    """One TRL GRPOTrainer run of the job (in its own process); writes its step times and rewards as JSON."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from resetrl.data import build_prompts, render_prompt
    from resetrl.models import resolve_model
    from resetrl.verifiers import get_verifier

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_cfg(args.config, _overrides(args))
    rollout, algo, learner = cfg.rollout, cfg.algorithm, cfg.learner
    model_path = str(resolve_model(cfg.model))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems = build_prompts(cfg.data)
    # The same rendered prompt (template + chat template) as resetrl's, given as text: TRL adds nothing to it.
    texts = [tokenizer.decode(render_prompt(tokenizer, cfg.data, p)) for p in problems]
    dataset = Dataset.from_dict({"prompt": texts, "problem": list(range(len(problems)))})
    verify = get_verifier(algo.verifier)

    def reward(prompts, completions, problem, **_):
        return [float(verify(text, problems[index])) for text, index in zip(completions, problem)]

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *_, **__):
            ends.append(time.monotonic())

        def on_step_end(self, *_, **__):
            ends.append(time.monotonic())

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        config = GRPOConfig(
            output_dir=out, max_steps=args.steps, seed=cfg.seed, use_cpu=not torch.cuda.is_available(),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=learner.prompts_per_step * rollout.group_size // 4,
            num_generations=rollout.group_size, max_completion_length=rollout.max_new_tokens,
            temperature=rollout.temperature, top_p=rollout.top_p,
            learning_rate=learner.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=learner.weight_decay,
            max_grad_norm=learner.grad_clip, beta=algo.kl_coef, epsilon=algo.clip_eps_low,
            epsilon_high=algo.clip_eps_high, loss_type="dapo", scale_rewards="group" if algo.std_normalize else "none",
            gradient_checkpointing=cfg.model.gradient_checkpointing, bf16=False, fp16=False,
            logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
        )
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepTimes()])
        trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    intervals = [b - a for a, b in zip(ends, ends[1:])]
    steps = len(intervals)
    Path(args.trl_worker).write_text(json.dumps({
        "s_per_step": sum(intervals[1:]) / (steps - 1) if steps > 1 else intervals[0],
        "s_per_step_with_first": sum(intervals) / steps,
        "samples_per_step": float(learner.prompts_per_step * rollout.group_size),
        "rewards": rewards,
        "torch_threads": torch.get_num_threads(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(PRESET))
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 3 steps each: a check")
    parser.add_argument("--trl-threads", type=int, default=os.cpu_count() or 1, help="TRL's torch threads")
    parser.add_argument("--resetrl-stop", action="store_true", help="keep the preset's stop string for resetrl")
    parser.add_argument("--override", action="append", default=[], help="extra config override key=value (both)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)  # internal: run TRL once, write JSON here
    args = parser.parse_args()
    machine_at_start = machine()  # its load average is the one before the runs
    if args.trl_worker:
        trl_worker(args)
        return
    if args.quick:
        args.repeats, args.steps = 1, 3
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2: seconds per step are measured between step ends")
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is a bench-only extra: .venv/bin/pip install trl") from None

    runs = {"resetrl": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        work = Path(tmp)
        for rep in range(args.repeats):
            order = ("resetrl", "trl") if rep % 2 == 0 else ("trl", "resetrl")
            for side in order:
                print(f"repeat {rep + 1}/{args.repeats}: {side}, {args.steps} steps ...", file=sys.stderr, flush=True)
                measured = run_resetrl(args, work, rep) if side == "resetrl" else run_trl(args, work, rep)
                runs[side].append(measured)
                print(f"  {side}: {measured['s_per_step']:.1f} s/step, rewards {measured['rewards']}",
                      file=sys.stderr, flush=True)

    def samples_per_s(run: dict) -> float:
        return run["samples_per_step"] / run["s_per_step"]

    ratios = [samples_per_s(r) / samples_per_s(t) for r, t in zip(runs["resetrl"], runs["trl"])]
    result = {
        "goal": GOAL,
        "setup": {"config": str(args.config), "steps": args.steps, "repeats": args.repeats, "quick": args.quick,
                  "trl_threads": args.trl_threads, "resetrl_stop": args.resetrl_stop, "overrides": args.override,
                  "trl_version": __import__("trl").__version__, "resetrl_engine": runs["resetrl"][0].get("engine")},
        "machine": machine_at_start,
        "resetrl_s_per_step": stats([r["s_per_step"] for r in runs["resetrl"]]),
        "trl_s_per_step": stats([r["s_per_step"] for r in runs["trl"]]),
        "resetrl_s_per_step_with_first": stats([r["s_per_step_with_first"] for r in runs["resetrl"]]),
        "trl_s_per_step_with_first": stats([r["s_per_step_with_first"] for r in runs["trl"]]),
        "resetrl_samples_per_s": stats([samples_per_s(r) for r in runs["resetrl"]]),
        "trl_samples_per_s": stats([samples_per_s(r) for r in runs["trl"]]),
        "ratio_samples_per_s": stats(ratios),
        "reward_curves": {side: [r["rewards"] for r in runs[side]] for side in runs},
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    result["meets_goal"] = result["ratio_samples_per_s"]["median"] >= GOAL

    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for side, color in (("resetrl", "#4C72B0"), ("trl", "#C44E52")):
        for i, rewards in enumerate(result["reward_curves"][side]):
            left.plot(range(1, len(rewards) + 1), rewards, color=color, alpha=0.8, label=side if i == 0 else None)
    left.set_xlabel("optimizer step")
    left.set_ylabel("mean reward of the step's samples")
    left.set_title("reward curves (each repeat)")
    left.legend()
    names = ["resetrl", "TRL GRPOTrainer"]
    medians = [result["resetrl_samples_per_s"]["median"], result["trl_samples_per_s"]["median"]]
    right.bar(names, medians, color=["#4C72B0", "#C44E52"])
    right.set_ylabel("samples/s (median, steady state)")
    ratio = result["ratio_samples_per_s"]
    right.set_title(f"resetrl / TRL = {ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}] (goal {GOAL})")
    write_results("vs_trl" + ("-quick" if args.quick else ""), result, fig)


if __name__ == "__main__":
    main()
