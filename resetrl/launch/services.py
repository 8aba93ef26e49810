"""What a run starts and stops: Ray (started or joined), Prometheus, the evaluator, the weights folder, and the
shutdown that stops exactly what was started, in reverse order (docs/design.md, "Processes and ports")."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray

from resetrl.config import RunConfig
from resetrl.console import console
from resetrl.evaluation import HeldOutEval
from resetrl.launch.ray_actors import kill_actor
from resetrl.launch.redis_server import EmbeddedRedis
from resetrl.net import free_port, port_is_free
from resetrl.prometheus import LocalPrometheus, pick_port
from resetrl.queue import shutdown_server, unreachable
from resetrl.record import PromptRecord
from resetrl.run_state import RunKeys, request_stop
from resetrl.weights import WEIGHTS_FILE
from resetrl.worker_logs import SETUP_HOOK, actor_options

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


def new_weights_root(cfg: RunConfig) -> Path:
    # /dev/shm keeps the weight hand-off in memory (docs/design.md, "Weight channels": save + reload_weights from /dev/shm).
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else cfg.run_path
    return base / f"resetrl-{cfg.run_name}-{uuid.uuid4().hex[:8]}" / "weights"


def start_ray(cfg: RunConfig, services: RunServices) -> None:
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


def start_prometheus(prometheus: LocalPrometheus) -> None:
    try:
        prometheus.start(ray_session_dir())
    except (OSError, RuntimeError) as exc:  # watching is optional: the run goes on without it
        log.warning("monitor.prometheus: %s; the run goes on without Prometheus", exc)
        return
    console.print(f"Prometheus for this run: {prometheus.url} (e.g. the query ray_resetrl_learner_reward_mean); "
                  "Grafana: docs/monitoring.md", highlight=False)


def ray_session_dir() -> str | None:
    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:
        return None


def start_evaluator(cfg: RunConfig, services: RunServices, model_path: str, redis_url: str,
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


def keep_final_weights(services: RunServices, model_path: str, run_dir: Path) -> str | None:
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


def write_run_plots(run_dir: Path, summary: dict) -> str | None:
    from resetrl.plots import write_plots

    try:
        write_plots(run_dir, summary)
    except Exception as exc:  # a picture must never fail a finished run
        log.warning("plots not written to %s: %s", run_dir / "plots", exc)
        return None
    return str(run_dir / "plots")


def live_run_redis(run_dir: Path) -> str | None:
    """The URL of the run's embedded redis-server if it still answers (its driver died without stopping it)."""
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        return None
    url = json.loads(info_path.read_text()).get("redis_url")
    if not url:
        return None
    return url if unreachable(url, connect_timeout_s=1, timeout_s=2) is None else None


def shutdown(services: RunServices) -> None:
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
