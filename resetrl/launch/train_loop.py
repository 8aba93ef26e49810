"""The train loop of `resetrl train`: feed prompts, ask the learner for a step, log, until the run ends.

Prompt feeding is also the flow control that bounds staleness: prompts for step s are fed only once the learner has
finished step s - 1 - max_staleness, so the rollout never runs more than max_staleness policy versions ahead of the
learner (docs/design.md, "Flow control and staleness").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from resetrl.config import RunConfig
from resetrl.console import RunDisplay, console, run_header
from resetrl.evaluation import eval_scalars
from resetrl.launch.services import RunAborted, RunServices
from resetrl.metrics import derived_rates, namespaced
from resetrl.queue import StreamQueue, dead_letter_stream, stream_length
from resetrl.record import PromptRecord, encode_prompt
from resetrl.run_state import (
    RunKeys, desired_workers, finish_requested, ledger_summary, mark_train_started, prompts_fed, read_stats,
)


@dataclass
class PromptFeeder:
    """Cycles through the dataset, giving each pass's prompts fresh ids (epoch suffix).

    The prompts and the data cursor (keys.prompts_fed) move in one step, and only from where the cursor is
    (StreamQueue.feed): a driver that dies mid-feed, or a call that redis-py retries, never feeds a prompt id twice.
    """

    queue: StreamQueue
    prompts: list[PromptRecord]
    fed: int = 0
    keys: RunKeys | None = None  # whose data cursor (prompts_fed) keeps `fed` in Redis, for a resumed run

    def prompt_id(self, index: int) -> str:
        return f"{self.prompts[index % len(self.prompts)].prompt_id}.e{index // len(self.prompts)}"

    def feed_until(self, target: int) -> int:
        payloads = []
        while self.fed + len(payloads) < target:
            index = self.fed + len(payloads)
            base = self.prompts[index % len(self.prompts)]
            prompt = PromptRecord(
                prompt_id=self.prompt_id(index), question=base.question, answer=base.answer,
                task=base.task, metadata=base.metadata,
            )
            payloads.append(encode_prompt(prompt))
        if not payloads:
            return 0
        before = self.fed
        ids = [self.prompt_id(before + i) for i in range(len(payloads))]
        # The cursor after the call: before + len(payloads), or wherever an earlier feed had already moved it (this
        # driver's previous life, say), in which case nothing was fed and the next call feeds from there. Returns
        # how far the cursor moved.
        self.fed = self.queue.feed(self.keys.prompts_fed, before, payloads, ids)
        return self.fed - before


def _feed_target(cfg: RunConfig, step: int, stats: dict, starved_batches: int) -> int:
    """How many prompts should have been fed by now: the staleness window, plus replacements for prompts that
    produced no trained records (dynamic sampling, stale drops) and for batches the learner went hungry on."""
    per_step = cfg.learner.prompts_per_step
    window = min(step + 1 + cfg.learner.max_staleness, cfg.total_steps) * per_step
    stale_prompts = int(stats.get("prompts_dropped_stale", 0))  # staleness drops whole processings
    return window + int(stats.get("prompts_without_records", 0)) + stale_prompts + starved_batches * per_step


# A step's worth of prompts this many times over, all without a trainable record and no step in between, means the
# method cannot learn from this policy and data (every sample malformed, every group's rewards equal): the run stops
# and says why instead of feeding replacement prompts forever. Dynamic sampling at a 95% drop rate needs ~20x.
STARVED_STEPS = 50


def nothing_to_train(cfg: RunConfig, stats_at_step: dict, stats: dict) -> str | None:
    """Why the run cannot go on, when the prompts done since the last step gave no trainable record for
    STARVED_STEPS steps' worth of prompts; else None. The counters that grew meanwhile name the cause."""
    empty = stats.get("prompts_without_records", 0) - stats_at_step.get("prompts_without_records", 0)
    limit = STARVED_STEPS * cfg.learner.prompts_per_step
    if empty < limit:
        return None
    grew = {name: value - stats_at_step.get(name, 0) for name, value in sorted(stats.items())
            if any(word in name for word in ("malformed", "dropped", "without", "no_signal"))
            and value - stats_at_step.get(name, 0) > 0}
    return (f"the last {empty:g} prompts gave no trainable record ({limit} = {STARVED_STEPS} steps' worth of "
            f"learner.prompts_per_step, no step in between), so the learner would wait forever. Counters since the "
            f"last step: {', '.join(f'{k} +{v:g}' for k, v in grew.items())}. The {cfg.algorithm.name} method cannot "
            "learn from this policy and data: check that the model answers in the format the method and verifier "
            "expect (e.g. algorithm.srl.require_think), and that groups' rewards can differ")


def generation_budget_spent(cfg: RunConfig, tokens_generated_by_step: list[int]) -> bool:
    """total_tokens is checked at step ends (tokens generated when each step ended), so a run stops on a whole step."""
    return bool(cfg.total_tokens and tokens_generated_by_step and tokens_generated_by_step[-1] >= cfg.total_tokens)


def train_loop(cfg, services, client, keys, prompt_queue, experience_queue, prompts, sink, pool,
                start_step: int = 0) -> dict:
    # The data cursor lives in Redis (keys.prompts_fed): a resumed run goes on where the previous one stopped.
    feeder = PromptFeeder(prompt_queue, prompts, fed=prompts_fed(client, keys), keys=keys)
    rewards: list[float] = []
    # Per trained step, for bench/ (async overlap, algorithm curves): loop time at its end, the learner's train
    # seconds, and the tokens generated so far.
    step_end_seconds: list[float] = []
    learner_train_seconds: list[float] = []
    tokens_generated_curve: list[int] = []
    generate_seconds_curve: list[float] = []  # the actors' summed generate_seconds counter
    step, version, last_metrics, starved_batches = start_step, start_step, None, 0
    stats_at_step = read_stats(client, keys)  # the counters when the last step ended (or the loop began)
    loop_started = time.monotonic()
    mark_train_started(client, keys)  # throughput in `resetrl status`; a resumed run keeps the first start
    held_out = services.held_out_eval
    evals_logged = 0  # held-out results already sent to the sink (each is logged once, as it arrives)
    queues = lambda: {"prompts": prompt_queue.depth(), "experience": experience_queue.depth()}  # noqa: E731
    view = RunDisplay(cfg.total_steps, cfg.run_path, run_header(cfg, services.dashboard_url))
    with view:
        while (ended_by := _end_reason(cfg, step, tokens_generated_curve, client, keys)) is None:
            feeder.feed_until(_feed_target(cfg, step, read_stats(client, keys), starved_batches))
            pending = services.learner.train_step.remote(timeout_s=5.0)
            while True:
                done, _ = ray.wait([pending], timeout=0.5)
                if lost := services.redis_lost():
                    raise RunAborted(lost)
                elapsed = time.monotonic() - loop_started
                stats = read_stats(client, keys)
                view.update(step, stats=stats, elapsed=elapsed, queues=queues())
                if done:
                    break
                if problem := nothing_to_train(cfg, stats_at_step, stats):
                    raise RunAborted(problem)
                # `resetrl scale` writes the wanted worker count to Redis; one GET per poll is the whole cost.
                pool.reconcile(desired_workers(client, keys))
                if pool.poll():  # first: a dead worker that scale added is dropped there, not raised below
                    write_actor_pids(cfg.run_path, pool)
                _raise_if_rollout_died(pool.active_runs)
            try:
                metrics = ray.get(pending)
            except ray.exceptions.RayActorError as exc:
                _wait_for_restarted_learner(cfg, services, exc, loop_started)  # RunAborted once restarts are used up
                continue
            if metrics is None:
                # Every fed prompt is done, yet the learner lacks records (strategies may yield fewer than
                # records_per_prompt, e.g. dropped groups): feed another step's worth.
                if prompt_queue.depth() == 0 and int(stats.get("prompts_done", 0)) >= feeder.fed:
                    starved_batches += 1
                continue
            step, version, last_metrics = metrics["step"], metrics["policy_version"], metrics
            rewards.append(metrics["reward_mean"])
            stats = stats_at_step = read_stats(client, keys)
            elapsed = time.monotonic() - loop_started
            step_end_seconds.append(round(elapsed, 3))
            learner_train_seconds.append(round(metrics.get("train_seconds", 0.0), 3))
            tokens_generated_curve.append(int(stats.get("tokens_generated", 0)))
            generate_seconds_curve.append(round(float(stats.get("generate_seconds", 0.0)), 3))
            scalars = namespaced(
                learner=metrics,
                rollout=derived_rates(stats, cfg.algorithm.method),
                system={
                    **stats,  # every counter of the run (resetrl/run_state.py incr_stats)
                    "queue_depth_experience": experience_queue.depth(),
                    "queue_depth_prompts": prompt_queue.depth(),
                    "samples_per_s": stats.get("samples_generated", 0) / max(elapsed, 1e-9),
                    "rollout_tokens_per_s": stats.get("tokens_generated", 0) / max(elapsed, 1e-9),
                },
            )
            sink.log(step, scalars)
            if held_out is not None:
                held_out.after_step(step)
                for point in held_out.results[evals_logged:]:  # at its policy version, while the run is up
                    sink.log(point["policy_version"], namespaced(eval=eval_scalars(point)))
                evals_logged = len(held_out.results)
            view.update(step, stats=stats, elapsed=elapsed, queues=queues(), scalars=scalars, step_ended=True,
                        eval_results=held_out.results if held_out is not None else None)
    return {
        "steps": step,
        "ended_by": ended_by,
        "policy_version": version,
        "reward_mean_first": rewards[0] if rewards else None,
        "reward_mean_last": rewards[-1] if rewards else None,
        "reward_curve": rewards,
        "train_loop_seconds": round(time.monotonic() - loop_started, 2),
        "prompts_fed": feeder.fed,
        "step_end_seconds": step_end_seconds,
        "learner_train_seconds": learner_train_seconds,
        "tokens_generated_curve": tokens_generated_curve,
        "generate_seconds_curve": generate_seconds_curve,
    }


def _end_reason(cfg: RunConfig, step: int, tokens_generated_curve: list[int], client, keys: RunKeys) -> str | None:
    """Why the train loop ends before the next step, or None while it goes on."""
    if step >= cfg.total_steps:
        return "total_steps"
    if generation_budget_spent(cfg, tokens_generated_curve):
        return "total_tokens"
    if finish_requested(client, keys):
        return "resetrl stop"
    return None


def write_actor_pids(run_dir: Path, pool) -> None:
    """Keep run.json's actor_pids (running workers, by index) current; written whole, then renamed into place."""
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text())
    pids = pool.pids()
    info["actor_pids"] = list(pids.values())
    info["actor_pid_by_worker"] = {str(index): pid for index, pid in pids.items()}
    partial = info_path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(info))
    partial.replace(info_path)


def _raise_if_rollout_died(actor_runs: list) -> None:
    finished, _ = ray.wait(actor_runs, num_returns=len(actor_runs), timeout=0)
    for ref in finished:
        ray.get(ref)  # raises the actor's error (after Ray has used up its restarts)
    if len(finished) == len(actor_runs):
        raise RuntimeError("every rollout worker stopped before training finished; see the Ray logs")


def prompt_accounting(client, keys: RunKeys, learner_accounting: dict, stats: dict) -> dict:
    """Where every fed prompt went, from the ledger in Redis (resetrl/run_state.py ledger_summary), not from the
    learner's dedupe: `ledger` = {fed, trained, dropped_stale, dropped_no_signal, dead_lettered, in_flight, lost,
    trained_twice, second_attempts}; lost and trained_twice must be 0. prompts_lost and duplicates_trained repeat
    the ledger's lost and trained_twice under their older names."""
    ledger = ledger_summary(client, keys)
    return {
        "ledger": ledger,
        "prompts_fed": ledger["fed"],
        "prompts_trained": ledger["trained"],
        "prompts_lost": ledger["lost"],
        "duplicates_trained": ledger["trained_twice"],
        "duplicates_dropped": int(stats.get("records_duplicate", 0)),  # dead-lettered as duplicates
        "records_dead_lettered": stream_length(client, dead_letter_stream(keys.experience)),
        "prompts_dead_lettered": stream_length(client, dead_letter_stream(keys.prompts)),
    }


def _wait_for_restarted_learner(cfg: RunConfig, services: RunServices, error: Exception, loop_started: float) -> None:
    """The learner died inside the run. Ray restarts it (learner.max_restarts) and it resumes from its newest
    checkpoint by itself (learner/learner.py); wait until it answers, note its new pid in run.json. Once Ray's
    restarts are used up, the run stops with what to do."""
    died = time.monotonic()
    reason = type(error).__name__  # Ray's messages run long; the actor's own log says more (RUN_DIR/logs)
    used = len(services.learner_restarts) + 1
    if not cfg.learner.checkpoint_every:
        raise RunAborted(f"the learner died ({reason}); this run keeps no checkpoints (learner.checkpoint_every=0), "
                         "so a restarted learner would begin again from the initial model and what it trained would "
                         "be lost. Set learner.checkpoint_every=N (e.g. 10) to have Ray restart it from the newest "
                         "checkpoint") from None
    if used > services.learner.max_restarts:
        raise RunAborted(f"the learner died ({reason}) and its restarts are used up (learner.max_restarts="
                         f"{services.learner.max_restarts}); `resetrl train --resume {cfg.run_path}` continues from "
                         "the newest checkpoint") from None
    console.log(f"the learner died ({reason}); Ray restarts it ({used} of learner.max_restarts="
                f"{services.learner.max_restarts}); it resumes from its newest checkpoint")
    while True:
        try:
            pid = ray.get(services.learner.pid.remote())
            version = ray.get(services.learner.policy_version.remote())
            break
        except ray.exceptions.ActorUnavailableError:  # still restarting: Ray answers so until its __init__ is done
            time.sleep(0.5)
        except ray.exceptions.RayActorError as exc:
            raise RunAborted(f"the learner died ({reason}) and did not come back ({exc}); `resetrl train --resume "
                             f"{cfg.run_path}` continues from the newest checkpoint") from None
    back = time.monotonic()
    services.learner_restarts.append({"died_after_s": round(died - loop_started, 2),
                                      "back_after_s": round(back - died, 2), "resumed_at_version": version})
    info_path = cfg.run_path / "run.json"
    info = {**json.loads(info_path.read_text()), "learner_pid": pid}
    partial = info_path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(info))
    partial.replace(info_path)
    console.log(f"the learner is back (pid {pid}) after {back - died:.1f} s, at policy version {version}")
