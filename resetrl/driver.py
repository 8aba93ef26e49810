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
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from resetrl.config import RunConfig
from resetrl.data import build_prompts, split_holdout
from resetrl.evaluation import HeldOutEval, eval_summary
from resetrl.metrics import MetricsSink, derived_rates
from resetrl.models import resolve_model
from resetrl.queue import StreamQueue, connect
from resetrl.ray_actors import kill_actor
from resetrl.record import PromptRecord, WireFormatError, decode_experience, decode_prompt, encode_prompt
from resetrl.redis_server import EmbeddedRedis, free_port
from resetrl.run_state import EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys, desired_workers, read_stats, request_stop

log = logging.getLogger(__name__)
console = Console(stderr=True)

# Environment every Ray worker of the run gets (also on a remote cluster, through the runtime_env).
_WORKER_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM's engine core runs inside the rollout actor's process: no extra processes to orphan or spawn-guard.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/resetrl/torch_extensions"),
}


@dataclass
class PromptFeeder:
    """Cycles through the dataset, giving each pass's prompts fresh ids (epoch suffix)."""

    queue: StreamQueue
    prompts: list[PromptRecord]
    fed: int = 0
    cursor_key: str | None = None  # where `fed` is kept in Redis, for a resumed run

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
        if payloads:
            self.queue.put_many(payloads)
            self.fed += len(payloads)
            if self.cursor_key:
                self.queue.client.set(self.cursor_key, self.fed)
        return len(payloads)


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


def _weights_root(cfg: RunConfig) -> Path:
    # /dev/shm keeps the weight hand-off in memory (DESIGN.md: save + reload_weights from /dev/shm).
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else cfg.run_path
    return base / f"resetrl-{cfg.run_name}-{uuid.uuid4().hex[:8]}" / "weights"


def _start_ray(cfg: RunConfig, services: RunServices) -> None:
    # RAY_AUTH_MODE travels to the workers; RAY_AUTH_TOKEN does not: a runtime_env is shown in the dashboard, and
    # workers get the cluster's token from their raylet.
    env = {**_WORKER_ENV_DEFAULTS, **{k: v for k, v in os.environ.items()
                                      if k.startswith(("VLLM_", "RAY_AUTH")) and k != "RAY_AUTH_TOKEN"}}
    env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.rollout.vllm_kv_cache_gib)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    # ray.init replaces the driver's SIGTERM handler with a bare sys.exit; keep the caller's (the CLI's unwinds the
    # run like Ctrl-C and exits 143).
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    try:
        _init_ray(cfg, services, {"env_vars": env})
    finally:
        if threading.current_thread() is threading.main_thread() and sigterm_handler is not None:
            signal.signal(signal.SIGTERM, sigterm_handler)


def _init_ray(cfg: RunConfig, services: RunServices, runtime_env: dict) -> None:
    # Inside a Ray Job (`resetrl submit`) the job supervisor sets RAY_ADDRESS to its cluster: join it, start
    # nothing. Outside a job RAY_ADDRESS is often the dashboard URL kept for `ray job` commands: not ours to use.
    in_ray_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    address = cfg.ray.address or (os.environ.get("RAY_ADDRESS") if in_ray_job else None)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        dashboard_port = cfg.ray.dashboard_port
        if cfg.ray.include_dashboard and not _port_is_free(cfg.ray.dashboard_host, dashboard_port):
            # Another local Ray (or anything else) holds the port: a second job on the machine should still start.
            dashboard_port = free_port()
            console.log(f"dashboard port {cfg.ray.dashboard_port} is taken; this run's dashboard: "
                        f"http://{cfg.ray.dashboard_host}:{dashboard_port}")
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host=cfg.ray.dashboard_host,
            dashboard_port=dashboard_port,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
        services.started_ray = True


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _reset_run_keys(client, keys: RunKeys) -> None:
    """A fresh run starts from empty streams and counters (resume is a separate path)."""
    for key in client.scan_iter(match=f"{keys.prefix}:*"):
        client.delete(key)


class _ProgressView:
    def __init__(self, total_steps: int):
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=console, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, status="starting actors")

    def update(self, completed: int, status: str) -> None:
        self.progress.update(self.task, completed=completed, status=status)


def _status_line(step_metrics: dict | None, stats: dict, depth: int, version: int, elapsed: float) -> str:
    reward = f"{step_metrics['reward_mean']:.3f}" if step_metrics else "-"
    samples_per_s = stats.get("samples_generated", 0) / max(elapsed, 1e-9)
    line = (
        f"reward {reward} | {samples_per_s:.2f} samples/s | queue {depth} | v{version} | "
        f"trained {stats.get('samples_trained', 0)} dropped {stats.get('samples_dropped_stale', 0)}"
    )
    reset_rate = derived_rates(stats)["reset_rate"]
    return line if reset_rate is None else f"{line} | resets {reset_rate:.0%}"


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
            services.redis = EmbeddedRedis(run_dir / "redis", durable=cfg.queue.durable).start()
            redis_url = services.redis.url
        client = services.client = connect(redis_url)
        services.keys = keys
        if resume:
            # Keep streams, pending entries and counters; forget the stop flag and the published weights (the
            # learner republishes its checkpoint's, which may be older than the last ones published).
            client.delete(keys.stop, keys.weights, keys.learner_version)
        else:
            _reset_run_keys(client, keys)
            # Checkpoints of an earlier run in this dir no longer match its (just wiped) queues and counters.
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        prompt_queue = StreamQueue(client, keys.prompts, PROMPT_GROUP, "driver")
        experience_queue = StreamQueue(client, keys.experience, EXPERIENCE_GROUP, "driver")
        prompt_queue.ensure_group()
        experience_queue.ensure_group()
        (run_dir / "run.json").write_text(json.dumps({"run_name": cfg.run_name, "redis_url": redis_url}))
        prompts, held_out = split_holdout(build_prompts(cfg.data), cfg.eval.holdout)

        _start_ray(cfg, services)
        sink = MetricsSink(run_dir / "tensorboard" if cfg.tensorboard else None)
        services.weights_root = _weights_root(cfg)
        services.weights_root.mkdir(parents=True, exist_ok=True)
        services.learner = LearnerGroup(cfg, model_path, redis_url, str(services.weights_root), resume=resume)
        if resume:  # actors must start from the checkpoint's weights, which the learner publishes as it loads
            ray.get(services.learner.policy_version.remote())
        actor_cls = ray.remote(RolloutActor).options(
            num_cpus=cfg.rollout.cpus_per_worker,
            num_gpus=cfg.rollout.gpus_per_worker,
            max_restarts=cfg.rollout.max_restarts,
            max_task_retries=-1,  # a restarted actor resumes its run() loop
        )
        # The pool starts rollout.num_workers actors; `resetrl scale` changes the count while the job runs.
        pool = services.rollout_pool = RolloutPool(
            lambda index: actor_cls.remote(cfg, index, model_path, redis_url, str(services.weights_root)),
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
                sink.log(point["policy_version"], {"eval_accuracy": point["accuracy"]})
        summary.update(_prompt_accounting(client, keys, prompts, accounting, read_stats(client, keys)))
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
            **{name: value for name, value in derived_rates(stats).items()},
            counters=stats,
        )
        summary["final_weights"] = _keep_final_weights(client, keys, model_path, run_dir)
        summary["ray_session_dir"] = _ray_session_dir()
    finally:
        _shutdown(services)
        if sink is not None:
            sink.close()
    summary["wall_seconds"] = round(time.monotonic() - wall_started, 2)
    summary["run_dir"] = str(run_dir)
    if summary_path:
        Path(summary_path).write_text(json.dumps(summary, indent=2))
    return summary


def _feed_target(cfg: RunConfig, step: int, stats: dict, starved_batches: int) -> int:
    """How many prompts should have been fed by now: the staleness window, plus replacements for prompts that
    produced no trained records (dynamic sampling, stale drops) and for batches the learner went hungry on."""
    per_step = cfg.learner.prompts_per_step
    window = min(step + 1 + cfg.learner.max_staleness, cfg.total_steps) * per_step
    stale_prompts = -(-int(stats.get("samples_dropped_stale", 0)) // cfg.records_per_prompt)
    return window + int(stats.get("prompts_without_records", 0)) + stale_prompts + starved_batches * per_step


def generation_budget_spent(cfg: RunConfig, tokens_generated_by_step: list[int]) -> bool:
    """total_tokens is checked at step ends (tokens generated when each step ended), so a run stops on a whole step."""
    return bool(cfg.total_tokens and tokens_generated_by_step and tokens_generated_by_step[-1] >= cfg.total_tokens)


def _train_loop(cfg, services, client, keys, prompt_queue, experience_queue, prompts, sink, pool,
                start_step: int = 0) -> dict:
    # The data cursor lives in Redis (keys.prompts_fed): a resumed run goes on where the previous one stopped.
    feeder = PromptFeeder(prompt_queue, prompts, fed=int(client.get(keys.prompts_fed) or 0), cursor_key=keys.prompts_fed)
    rewards: list[float] = []
    # Per trained step, for bench/ (async overlap, algorithm curves): loop time at its end, the learner's train
    # seconds, and the tokens generated so far.
    step_end_seconds: list[float] = []
    learner_train_seconds: list[float] = []
    tokens_generated_curve: list[int] = []
    generate_seconds_curve: list[float] = []  # the actors' summed generate_seconds counter
    step, version, last_metrics, starved_batches = start_step, start_step, None, 0
    loop_started = time.monotonic()
    client.set(keys.started_at, time.time(), nx=True)  # throughput in `resetrl status`; a resumed run keeps it
    view = _ProgressView(cfg.total_steps)
    with view.progress:
        while step < cfg.total_steps and not generation_budget_spent(cfg, tokens_generated_curve):
            feeder.feed_until(_feed_target(cfg, step, read_stats(client, keys), starved_batches))
            pending = services.learner.train_step.remote(timeout_s=5.0)
            while True:
                done, _ = ray.wait([pending], timeout=0.5)
                elapsed = time.monotonic() - loop_started
                stats = read_stats(client, keys)
                view.update(step, _status_line(last_metrics, stats, experience_queue.depth(), version, elapsed))
                if done:
                    break
                # `resetrl scale` writes the wanted worker count to Redis; one GET per poll is the whole cost.
                pool.reconcile(desired_workers(client, keys))
                if pool.poll():  # first: a dead worker that scale added is dropped there, not raised below
                    _write_actor_pids(cfg.run_path, pool)
                _raise_if_rollout_died(pool.active_runs)
            metrics = ray.get(pending)
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
            scalars = {
                **metrics,
                **derived_rates(stats),
                "queue_depth_experience": experience_queue.depth(),
                "queue_depth_prompts": prompt_queue.depth(),
                "samples_per_s": stats.get("samples_generated", 0) / max(elapsed, 1e-9),
                "rollout_tokens_per_s": stats.get("tokens_generated", 0) / max(elapsed, 1e-9),
                "samples_dropped_stale": stats.get("samples_dropped_stale", 0),
            }
            sink.log(step, scalars)
            if services.held_out_eval is not None:
                services.held_out_eval.after_step(step)
            view.update(step, _status_line(last_metrics, stats, experience_queue.depth(), version, elapsed))
            console.log(
                f"step {step}/{cfg.total_steps} v{version} reward {metrics['reward_mean']:.3f} "
                f"loss {metrics.get('loss', float('nan')):.4f} len {metrics.get('response_len_mean', 0):.1f}"
            )
    return {
        "steps": step,
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


def _start_evaluator(cfg: RunConfig, services: RunServices, model_path: str, redis_url: str,
                     held_out: list[PromptRecord]) -> HeldOutEval:
    from resetrl.actors.evaluator import Evaluator

    evaluator_cls = ray.remote(Evaluator).options(num_cpus=cfg.eval.cpus, num_gpus=cfg.eval.gpus)
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


def _keep_final_weights(client, keys: RunKeys, model_path: str, run_dir: Path) -> str | None:
    """Copy the newest published weights and the model's config/tokenizer into run_dir/final (a loadable HF folder)."""
    published = client.hgetall(keys.weights)
    if not published:
        return None
    source = Path(published[b"path"].decode())
    final = run_dir / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(model_path, final, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for weights_file in source.glob("*.safetensors"):
        shutil.copy2(weights_file, final / weights_file.name)
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
    if services.client is not None:
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
        _shutdown_redis(services.adopted_redis)
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
    import redis

    info_path = run_dir / "run.json"
    if not info_path.is_file():
        return None
    url = json.loads(info_path.read_text()).get("redis_url")
    if not url:
        return None
    probe = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        probe.ping()
        return url
    except redis.RedisError:
        return None
    finally:
        probe.close()


def _shutdown_redis(url: str) -> None:
    import redis

    probe = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        probe.shutdown()  # AOF (when on) is flushed first
    except redis.RedisError:
        pass
    finally:
        probe.close()


def _prompt_accounting(client, keys: RunKeys, prompts: list[PromptRecord], learner_accounting: dict, stats: dict) -> dict:
    """Where every fed prompt went: trained, dropped as stale, still queued (prompts or experience), or lost.

    prompts_lost = fed prompt ids found nowhere, less the prompts that legitimately produced no records
    (dynamic sampling drops whole groups); it must be 0. duplicates_trained comes from the learner: records
    trained more than once in the final model's history; it must be 0.
    """
    feeder = PromptFeeder(None, prompts)
    fed = int(client.get(keys.prompts_fed) or 0)
    accounted = set(learner_accounting["trained_prompt_ids"])
    accounted |= {member.decode() for member in client.smembers(keys.prompts_dropped_stale)}
    for stream, decode in ((keys.prompts, decode_prompt), (keys.experience, decode_experience)):
        for _entry_id, fields in client.xrange(stream):
            try:
                accounted.add(decode(fields.get(b"r", b"")).prompt_id)
            except WireFormatError:
                pass
    unaccounted = [feeder.prompt_id(index) for index in range(fed) if feeder.prompt_id(index) not in accounted]
    return {
        "prompts_fed": fed,
        "prompts_trained": len(learner_accounting["trained_prompt_ids"]),
        "prompts_unaccounted": len(unaccounted),
        "prompts_lost": max(0, len(unaccounted) - int(stats.get("prompts_without_records", 0))),
        "duplicates_trained": learner_accounting["duplicates_trained"],
        "duplicates_dropped": learner_accounting["duplicates_dropped"],
        "records_dead_lettered": int(client.xlen(f"{keys.experience}:dead")),
        "prompts_dead_lettered": int(client.xlen(f"{keys.prompts}:dead")),
    }
