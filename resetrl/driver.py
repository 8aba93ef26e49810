# Over 400 lines: the run's whole lifecycle (services, train loop, evaluation, shutdown, summary); next: split into a launch package.
"""The driver of `resetrl train`: the only place that starts processes.

It starts (or connects to) Redis and Ray, creates the learner and the rollout actors, feeds prompts, shows
progress, and stops everything cleanly, Ctrl-C included. Prompt feeding is also the flow control that bounds
staleness: prompts for step s are fed only once the learner has finished step s - 1 - max_staleness, so the
rollout never runs more than max_staleness policy versions ahead of the learner.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray

from resetrl.config import RunConfig
from resetrl.console import RunDisplay, console, run_end_lines, run_header
from resetrl.data import build_prompts, split_holdout
from resetrl.evaluation import HeldOutEval, eval_scalars, eval_summary
from resetrl.metrics import MetricsSink, derived_rates, namespaced, start_wandb
from resetrl.models import resolve_model
from resetrl.prometheus import RAY_EXPORT_INTERVAL_S, LocalPrometheus, pick_port
from resetrl.net import free_port, port_is_free
from resetrl.queue import (
    RedisGone, StreamQueue, connect, dead_letter_stream, shutdown_server, stream_length, unreachable,
)
from resetrl.ray_actors import kill_actor
from resetrl.record import PromptRecord, encode_prompt
from resetrl.redis_server import EmbeddedRedis
from resetrl.worker_logs import SETUP_HOOK, actor_options
from resetrl.run_state import (
    EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys, desired_workers, finish_requested, ledger_summary, mark_train_started, prepare_resume,
    prompts_fed, read_stats, request_stop, wipe_run,
)
from resetrl.weights import WEIGHTS_FILE

log = logging.getLogger(__name__)

class RunAborted(RuntimeError):
    """The run cannot go on, for a reason its message gives a person to act on; the CLI prints it, no traceback."""

# Environment every Ray worker of the run gets (also on a remote cluster, through the runtime_env). HF_HUB_OFFLINE
# is the user's to set, not forced: the driver resolves a hub model id once (resetrl/hub.py) and every role loads
# the local snapshot folder it resolved to.
_WORKER_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM's engine core runs inside the rollout actor's process: no extra processes to orphan or spawn-guard.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/resetrl/torch_extensions"),
}


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


@dataclass
class RunServices:
    """What the driver started, so it can stop exactly that."""

    redis: EmbeddedRedis | None = None
    started_ray: bool = False
    weights_root: Path | None = None
    actors: list = field(default_factory=list)
    rollout_pool: object | None = None  # the RolloutPool once created; it owns the rollout actors from then on
    learner: object | None = None
    client: object | None = None
    keys: RunKeys | None = None
    adopted_redis: str | None = None  # URL of the embedded redis-server a dead driver left running (resume)
    evaluator: object | None = None
    held_out_eval: HeldOutEval | None = None
    dashboard_url: str | None = None
    prometheus: LocalPrometheus | None = None  # monitor.prometheus
    learner_restarts: list = field(default_factory=list)  # {died_after_s, back_after_s} per restart by Ray

    def redis_lost(self) -> str | None:
        """Why the run's embedded redis-server is gone for good (it died without an AOF), or None."""
        return self.redis.lost if self.redis is not None else None


def _weights_root(cfg: RunConfig) -> Path:
    # /dev/shm keeps the weight hand-off in memory (docs/design.md, "Weight channels": save + reload_weights from /dev/shm).
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else cfg.run_path
    return base / f"resetrl-{cfg.run_name}-{uuid.uuid4().hex[:8]}" / "weights"


def _start_ray(cfg: RunConfig, services: RunServices) -> None:
    # RAY_AUTH_MODE travels to the workers; RAY_AUTH_TOKEN does not: a runtime_env is shown in the dashboard, and
    # workers get the cluster's token from their raylet. Likewise the user's HF_HUB_OFFLINE / HF_ENDPOINT travel,
    # HF_TOKEN and HF_HOME (a path on this node) do not.
    env = {**_WORKER_ENV_DEFAULTS, **{k: v for k, v in os.environ.items()
                                      if (k.startswith(("VLLM_", "RAY_AUTH")) and k != "RAY_AUTH_TOKEN")
                                      or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}}
    env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.rollout.vllm_kv_cache_gib)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    if cfg.monitor.prometheus:
        # Chosen before ray.init: the dashboard reads RAY_PROMETHEUS_HOST as it starts (its Metrics tab).
        services.prometheus = LocalPrometheus(cfg.run_path, pick_port(cfg.monitor.prometheus_port))
        os.environ.setdefault("RAY_PROMETHEUS_HOST", services.prometheus.url)
    # ray.init replaces the driver's SIGTERM handler with a bare sys.exit; keep the caller's (the CLI's unwinds the
    # run like Ctrl-C and exits 143).
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    try:
        # Every worker's output goes to RUN_DIR/logs/<role>.log, not the console (resetrl/worker_logs.py).
        _init_ray(cfg, services, {"env_vars": env, "worker_process_setup_hook": SETUP_HOOK})
    finally:
        if threading.current_thread() is threading.main_thread() and sigterm_handler is not None:
            signal.signal(signal.SIGTERM, sigterm_handler)


def _init_ray(cfg: RunConfig, services: RunServices, runtime_env: dict) -> None:
    # Inside a Ray Job (`resetrl submit`) the job supervisor sets RAY_ADDRESS to its cluster: join it, start
    # nothing. Outside a job RAY_ADDRESS is often the dashboard URL kept for `ray job` commands: not ours to use.
    in_ray_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    address = cfg.ray.address or (os.environ.get("RAY_ADDRESS") if in_ray_job else None)
    # The Jobs view of the dashboard (and `ray list jobs --detail`) names the run and its whole config.
    job_config = ray.job_config.JobConfig(metadata={
        "resetrl_run": cfg.run_name, "resetrl_run_dir": str(cfg.run_path), "resetrl_method": cfg.algorithm.name,
        "resetrl_model": cfg.model.name, "resetrl_config": cfg.model_dump_json(),
    })
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "job_config": job_config}
    if address:
        context = ray.init(address=address, runtime_env=runtime_env, **quiet)
    else:
        dashboard_port = cfg.ray.dashboard_port
        if cfg.ray.include_dashboard and not port_is_free(cfg.ray.dashboard_host, dashboard_port):
            # Another local Ray (or anything else) holds the port: a second job on the machine should still start.
            dashboard_port = free_port()
            console.log(f"dashboard port {cfg.ray.dashboard_port} is taken; this run's dashboard: "
                        f"http://{cfg.ray.dashboard_host}:{dashboard_port}")
        if cfg.ray.loopback_only:
            _bind_ray_to_loopback()
        context = ray.init(
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host=cfg.ray.dashboard_host,
            dashboard_port=dashboard_port,
            runtime_env=runtime_env,
            **quiet,
        )
        services.started_ray = True
        if cfg.ray.loopback_only and ray.util.get_node_ip_address() != "127.0.0.1":
            console.log(f"ray.loopback_only: this Ray version ignored the switch; its node address is "
                        f"{ray.util.get_node_ip_address()} and its processes listen on every interface")
    services.dashboard_url = getattr(context, "dashboard_url", None) or None


def _bind_ray_to_loopback() -> None:
    """Ray's own switch for a one-machine cluster (what it does on macOS and Windows): the node's address is
    127.0.0.1, so the GCS, raylet, object manager, workers, dashboard agent and metrics export listen there only
    (README, "Security"). Ray reads the constant in this process as it starts the node, the variable in the
    processes it starts."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def train(cfg: RunConfig, summary_path: str | Path | None = None, resume: bool = False) -> dict:
    """Run a job; with resume=True continue the run in cfg.run_path (checkpoint, queues, counters) instead."""
    from resetrl.actors.pool import RolloutPool
    from resetrl.actors.rollout_actor import RolloutActor
    from resetrl.learner.group import LearnerGroup

    run_dir = cfg.run_path
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    services = RunServices()
    keys = RunKeys(cfg.run_name)
    wall_started = time.monotonic()
    summary: dict = {}
    sink: MetricsSink | None = None
    try:
        model_path = str(resolve_model(cfg.model))
        if cfg.queue.redis_url:
            redis_url = cfg.queue.redis_url
        elif resume and (alive := _live_run_redis(run_dir)):
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

        _start_ray(cfg, services)
        if services.prometheus is not None:
            _start_prometheus(services.prometheus)
        sink = MetricsSink(run_dir / "tensorboard" if cfg.tensorboard else None, wandb_run=start_wandb(
            cfg.logging.wandb, run_dir, cfg.run_name, cfg.model_dump(mode="json"), resume=resume))
        services.weights_root = _weights_root(cfg)
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
        _write_actor_pids(run_dir, pool)
        if held_out:
            _start_evaluator(cfg, services, model_path, redis_url, held_out).run_now()  # the starting accuracy

        summary = _train_loop(cfg, services, client, keys, prompt_queue, experience_queue, prompts, sink, pool,
                              start_step=start_step)
        summary["engine"] = engine_names[0]
        summary["resumed_from_step"] = start_step if resume else None
        request_stop(client, keys)
        pool.wait_stopped(timeout_s=120)
        summary.update(pool.summary())
        accounting = ray.get(services.learner.finish.remote())  # last checkpoint, every trained entry acked
        if services.held_out_eval is not None:
            services.held_out_eval.run_now()  # the final policy
            summary.update(eval_summary(services.held_out_eval.results, summary["tokens_generated_curve"]))
            for point in summary["eval_curve"]:
                sink.log(point["policy_version"], namespaced(eval=eval_scalars(point)))
        summary.update(_prompt_accounting(client, keys, accounting, read_stats(client, keys)))
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
        summary["final_weights"] = _keep_final_weights(services, model_path, run_dir)
        summary["ray_session_dir"] = _ray_session_dir()
        if services.prometheus is not None:
            # The run's last values (the final evaluation, the last step) reach Prometheus only through Ray's next
            # export and the scrape after it: keep Ray up until one has happened (at most 40 s).
            services.prometheus.wait_for_scrape("ray_resetrl_learner_policy_version",
                                                after=time.time() + RAY_EXPORT_INTERVAL_S, timeout_s=40)
    except RedisGone as exc:  # the driver's own Redis call gave up: the embedded server is gone for good
        raise RunAborted(str(exc)) from None
    finally:
        _shutdown(services)
        if sink is not None:
            sink.close()
    summary["wall_seconds"] = round(time.monotonic() - wall_started, 2)
    summary["run_dir"] = str(run_dir)
    if cfg.monitor.plots:
        summary["plots_dir"] = _write_plots(run_dir, summary)
    if summary_path:
        Path(summary_path).write_text(json.dumps(summary, indent=2))
    for line in run_end_lines(summary):
        console.print(line, highlight=False)
    return summary


def _start_prometheus(prometheus: LocalPrometheus) -> None:
    try:
        prometheus.start(_ray_session_dir())
    except (OSError, RuntimeError) as exc:  # watching is optional: the run goes on without it
        log.warning("monitor.prometheus: %s; the run goes on without Prometheus", exc)
        return
    console.print(f"Prometheus for this run: {prometheus.url} (e.g. the query ray_resetrl_learner_reward_mean); "
                  "Grafana: docs/monitoring.md", highlight=False)


def _write_plots(run_dir: Path, summary: dict) -> str | None:
    from resetrl.plots import write_plots

    try:
        write_plots(run_dir, summary)
    except Exception as exc:  # a picture must never fail a finished run
        log.warning("plots not written to %s: %s", run_dir / "plots", exc)
        return None
    return str(run_dir / "plots")


def _feed_target(cfg: RunConfig, step: int, stats: dict, starved_batches: int) -> int:
    """How many prompts should have been fed by now: the staleness window, plus replacements for prompts that
    produced no trained records (dynamic sampling, stale drops) and for batches the learner went hungry on."""
    per_step = cfg.learner.prompts_per_step
    window = min(step + 1 + cfg.learner.max_staleness, cfg.total_steps) * per_step
    stale_prompts = int(stats.get("prompts_dropped_stale", 0))  # staleness drops whole processings
    return window + int(stats.get("prompts_without_records", 0)) + stale_prompts + starved_batches * per_step


def generation_budget_spent(cfg: RunConfig, tokens_generated_by_step: list[int]) -> bool:
    """total_tokens is checked at step ends (tokens generated when each step ended), so a run stops on a whole step."""
    return bool(cfg.total_tokens and tokens_generated_by_step and tokens_generated_by_step[-1] >= cfg.total_tokens)


def _train_loop(cfg, services, client, keys, prompt_queue, experience_queue, prompts, sink, pool,
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
                # `resetrl scale` writes the wanted worker count to Redis; one GET per poll is the whole cost.
                pool.reconcile(desired_workers(client, keys))
                if pool.poll():  # first: a dead worker that scale added is dropped there, not raised below
                    _write_actor_pids(cfg.run_path, pool)
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
            stats = read_stats(client, keys)
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


def _start_evaluator(cfg: RunConfig, services: RunServices, model_path: str, redis_url: str,
                     held_out: list[PromptRecord]) -> HeldOutEval:
    from resetrl.actors.evaluator import Evaluator

    # Ray restarts an evaluator that dies (its engine loads the newest weights at each evaluation) and retries the
    # evaluation it was running.
    evaluator_cls = ray.remote(Evaluator).options(num_cpus=cfg.eval.cpus, num_gpus=cfg.eval.gpus,
                                                  max_restarts=cfg.rollout.max_restarts, max_task_retries=-1,
                                                  **actor_options(cfg, "evaluator"))
    services.evaluator = evaluator_cls.remote(cfg, model_path, redis_url, str(services.weights_root), held_out)
    services.held_out_eval = HeldOutEval(services.evaluator, cfg.eval.every)
    return services.held_out_eval


def _write_actor_pids(run_dir: Path, pool) -> None:
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


def _keep_final_weights(services: RunServices, model_path: str, run_dir: Path) -> str | None:
    """The learner's final weights (asked of the learner itself, so every weight channel gives them, nccl too) and
    the model's config/tokenizer, into run_dir/final: a loadable HF folder."""
    blob = ray.get(services.learner.export_weights.remote())
    if blob is None:
        return None
    final = run_dir / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(model_path, final, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    (final / WEIGHTS_FILE).write_bytes(blob)
    adapter = ray.get(services.learner.export_adapter.remote())  # learner.lora: merged above, the adapter beside it
    if adapter:
        (final / "adapter").mkdir()
        for name, data in adapter.items():
            (final / "adapter" / name).write_bytes(data)
    return str(final)


def _ray_session_dir() -> str | None:
    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:
        return None


def _shutdown(services: RunServices) -> None:
    """Stop what this run started, in reverse order; every step runs even if an earlier one failed.

    Actors are killed, not asked to close: the engines (vLLM's core included) live in the actor processes, so
    ending the process frees everything, and a busy actor (mid-generation after Ctrl-C) cannot delay the stop.
    """
    if services.client is not None and not services.redis_lost():  # a lost Redis would only be retried, ~27 s
        try:
            request_stop(services.client, services.keys)
        except Exception:
            pass
    actors = services.rollout_pool.handles if services.rollout_pool is not None else services.actors
    for handle in actors:
        kill_actor(handle)
    if services.learner is not None:
        try:
            services.learner.kill()  # every rank, and their placement group
        except Exception:
            pass
    kill_actor(services.evaluator)
    if services.keys is not None and ray.is_initialized():
        _kill_weight_store(services.keys.run_name)
    if services.client is not None:
        services.client.close()
    if services.started_ray and ray.is_initialized():
        ray.shutdown()
    if services.redis is not None:
        services.redis.stop()
    if services.adopted_redis:
        shutdown_server(services.adopted_redis)  # AOF (when on) is flushed first
    if services.prometheus is not None:
        services.prometheus.stop()
    if services.weights_root is not None:
        shutil.rmtree(services.weights_root.parent, ignore_errors=True)


def _kill_weight_store(run_name: str) -> None:
    """learner.weight_channel=ray_object_store keeps versions in a detached actor, which would outlive the job on a
    cluster that stays up."""
    from resetrl.weights import RayObjectStoreWeightChannel

    try:
        store = ray.get_actor(RayObjectStoreWeightChannel.store_name_for(run_name),
                              namespace=RayObjectStoreWeightChannel.NAMESPACE)
    except ValueError:
        return  # another channel, or already gone
    kill_actor(store)


def _live_run_redis(run_dir: Path) -> str | None:
    """The URL of the run's embedded redis-server if it still answers (its driver died without stopping it)."""
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        return None
    url = json.loads(info_path.read_text()).get("redis_url")
    if not url:
        return None
    return url if unreachable(url, connect_timeout_s=1, timeout_s=2) is None else None


def _prompt_accounting(client, keys: RunKeys, learner_accounting: dict, stats: dict) -> dict:
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
