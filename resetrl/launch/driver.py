"""The driver of `resetrl train`: the only place that starts processes.

`train` starts (or connects to) Redis and Ray, creates the learner group, the rollout pool and the evaluator, runs
the train loop (resetrl/launch/train_loop.py), gathers the summary, and stops everything it started
(resetrl/launch/services.py), Ctrl-C included.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import ray

from resetrl.config import RunConfig
from resetrl.console import console, run_end_lines
from resetrl.data import build_prompts, split_holdout
from resetrl.evaluation import eval_scalars, eval_summary
from resetrl.launch.redis_server import EmbeddedRedis
from resetrl.launch.services import (
    RunAborted, RunServices, keep_final_weights, live_run_redis, new_weights_root, ray_session_dir, shutdown,
    start_evaluator, start_prometheus, start_ray, write_run_plots,
)
from resetrl.launch.train_loop import prompt_accounting, train_loop, write_actor_pids
from resetrl.metrics import MetricsSink, derived_rates, namespaced, start_wandb
from resetrl.models import resolve_model
from resetrl.prometheus import RAY_EXPORT_INTERVAL_S
from resetrl.queue import RedisGone, StreamQueue, connect
from resetrl.run_state import EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys, prepare_resume, read_stats, request_stop, wipe_run
from resetrl.worker_logs import actor_options

log = logging.getLogger(__name__)

__all__ = ["RunAborted", "train"]


def train(cfg: RunConfig, summary_path: str | Path | None = None, resume: bool = False) -> dict:
    """Run a job; with resume=True continue the run in cfg.run_path (checkpoint, queues, counters) instead."""
    from resetrl.launch.rollout_pool import RolloutPool
    from resetrl.actors.rollout_actor import RolloutActor
    from resetrl.launch.learner_group import LearnerGroup

    run_dir = cfg.run_path
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    services = RunServices()
    keys = RunKeys(cfg.run_name)
    wall_started = time.monotonic()
    summary: dict = {}
    sink: MetricsSink | None = None
    finished = False
    try:
        model_path = str(resolve_model(cfg.model))
        if cfg.queue.redis_url:
            redis_url = cfg.queue.redis_url
        elif resume and (alive := live_run_redis(run_dir)):
            redis_url = services.adopted_redis = alive  # the dead driver's embedded redis is still up: adopt it
        else:
            if resume and not cfg.queue.durable:
                log.warning("resume without queue.durable: the embedded Redis kept nothing; unacked experience "
                            "of the previous run is lost, training continues from the checkpoint")
            # With AOF on, the same data dir brings back the streams, groups and counters of the previous run.
            services.redis = EmbeddedRedis(run_dir / "redis", durable=cfg.queue.durable,
                                           fsync=cfg.queue.appendfsync).start()
            redis_url = services.redis.url
            # The driver supervises what it started: a redis-server that dies is restarted from its AOF, or the run
            # stops with what was lost (RunAborted: the loop checks services.redis_lost, and the driver's client
            # gives up its retries).
            services.redis.supervise(say=console.log)
        client = services.client = connect(redis_url, give_up=services.redis_lost)
        services.keys = keys
        if resume:
            prepare_resume(client, keys)  # streams, pending entries and counters stay; stop flag and weights go
        else:
            wipe_run(client, keys)  # a fresh run starts from empty streams and counters
            # Checkpoints of an earlier run in this dir no longer match its (just wiped) queues and counters.
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        prompt_queue = StreamQueue(client, keys.prompts, PROMPT_GROUP, "driver", ledger=keys.ledger_keys)
        experience_queue = StreamQueue(client, keys.experience, EXPERIENCE_GROUP, "driver")
        prompt_queue.ensure_group()
        experience_queue.ensure_group()
        (run_dir / "run.json").write_text(json.dumps({"run_name": cfg.run_name, "redis_url": redis_url}))
        prompts, held_out = split_holdout(build_prompts(cfg.data), cfg.eval.holdout)

        start_ray(cfg, services)
        if services.prometheus is not None:
            start_prometheus(services.prometheus)
        sink = MetricsSink(run_dir / "tensorboard" if cfg.tensorboard else None, wandb_run=start_wandb(
            cfg.logging.wandb, run_dir, cfg.run_name, cfg.model_dump(mode="json"), resume=resume))
        services.weights_root = new_weights_root(cfg)
        services.weights_root.mkdir(parents=True, exist_ok=True)
        services.learner = LearnerGroup(cfg, model_path, redis_url, str(services.weights_root), resume=resume)
        if resume:  # actors must start from the checkpoint's weights, which the learner publishes as it loads
            ray.get(services.learner.policy_version.remote())
        actor_cls = ray.remote(RolloutActor)
        rollout_options = dict(
            num_cpus=cfg.rollout.cpus_per_worker,
            num_gpus=cfg.rollout.gpus_per_worker,
            max_restarts=cfg.rollout.max_restarts,
            max_task_retries=-1,  # a restarted actor resumes its run() loop
        )
        # The pool starts rollout.num_workers actors; `resetrl scale` changes the count while the job runs.
        pool = services.rollout_pool = RolloutPool(
            lambda index: actor_cls.options(**rollout_options, **actor_options(cfg, f"rollout-{index}")).remote(
                cfg, index, model_path, redis_url, str(services.weights_root)),
            client, keys, prompt_queue, say=console.log,
        )
        pool.start(cfg.rollout.num_workers)
        engine_names = ray.get(pool.engine_refs)
        start_step = ray.get(services.learner.policy_version.remote())
        # Process ids, for `resetrl status` and the fault tests (tests/faults) that kill them; the pool keeps
        # actor_pids up to date as workers come and go.
        pids = {"learner_pid": ray.get(services.learner.pid.remote())}
        (run_dir / "run.json").write_text(json.dumps({"run_name": cfg.run_name, "redis_url": redis_url, **pids}))
        write_actor_pids(run_dir, pool)
        if held_out:
            start_evaluator(cfg, services, model_path, redis_url, held_out).run_now()  # the starting accuracy

        summary = train_loop(cfg, services, client, keys, prompt_queue, experience_queue, prompts, sink, pool,
                              start_step=start_step)
        summary["engine"] = engine_names[0]
        summary["resumed_from_step"] = start_step if resume else None
        request_stop(client, keys)
        summary["workers_stopped_mid_batch"] = pool.wait_stopped(timeout_s=120)
        summary.update(pool.summary())
        accounting = ray.get(services.learner.finish.remote())  # last checkpoint, every trained entry acked
        if services.held_out_eval is not None:
            services.held_out_eval.run_now()  # the final policy
            summary.update(eval_summary(services.held_out_eval.results, summary["tokens_generated_curve"]))
            for point in summary["eval_curve"]:
                sink.log(point["policy_version"], namespaced(eval=eval_scalars(point)))
        summary.update(prompt_accounting(client, keys, accounting, read_stats(client, keys)))
        summary["learner_restarts"] = services.learner_restarts
        summary["redis_restarts"] = services.redis.restarts if services.redis is not None else []
        stats = read_stats(client, keys)
        summary.update(
            samples_generated=int(stats.get("samples_generated", 0)),
            samples_trained=int(stats.get("samples_trained", 0)),
            queue_dropped_stale=int(stats.get("samples_dropped_stale", 0)),
            samples_left_in_queue=experience_queue.depth(),
            verifier_errors=int(stats.get("verifier_errors", 0)),
            records_rejected=int(stats.get("records_rejected", 0)),
            weight_loads=int(stats.get("weight_loads", 0)),
            tokens_generated=int(stats.get("tokens_generated", 0)),
            tokens_trained=int(stats.get("tokens_trained", 0)),
            samples_per_s=round(stats.get("samples_generated", 0) / max(summary["train_loop_seconds"], 1e-9), 3),
            method=cfg.algorithm.name,
            **derived_rates(stats, cfg.algorithm.method),
            metrics_last=dict(sorted(sink.last.items())) if sink is not None else {},
            counters=stats,
        )
        summary["final_weights"] = keep_final_weights(services, model_path, run_dir)
        summary["ray_session_dir"] = ray_session_dir()
        if services.prometheus is not None:
            # The run's last values (the final evaluation, the last step) reach Prometheus only through Ray's next
            # export and the scrape after it: keep Ray up until one has happened (at most 40 s).
            services.prometheus.wait_for_scrape("ray_resetrl_learner_policy_version",
                                                after=time.time() + RAY_EXPORT_INTERVAL_S, timeout_s=40)
        finished = True
    except RedisGone as exc:  # the driver's own Redis call gave up: the embedded server is gone for good
        raise RunAborted(str(exc)) from None
    finally:
        shutdown(services)
        if sink is not None:
            sink.close()
            if not finished and cfg.monitor.plots:  # a run that stops early still leaves its pictures so far
                write_run_plots(run_dir, summary)
    summary["wall_seconds"] = round(time.monotonic() - wall_started, 2)
    summary["run_dir"] = str(run_dir)
    if cfg.monitor.plots:
        summary["plots_dir"] = write_run_plots(run_dir, summary)
    if summary_path:
        Path(summary_path).write_text(json.dumps(summary, indent=2))
    for line in run_end_lines(summary):
        console.print(line, highlight=False)
    return summary

