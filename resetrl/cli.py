"""`resetrl` command line: train, status, scale, submit, plot."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from resetrl.config import ConfigError, config_from_dict, load_config, parse_override, set_dotted

app = typer.Typer(add_completion=False, no_args_is_help=True, help="resetrl: RL for reasoning LMs with reset-based credit")


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML preset, e.g. configs/tiny.yaml"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted.key=value overrides, e.g. learner.lr=1e-5"),
    summary: Optional[Path] = typer.Option(None, "--summary", help="write a JSON summary of the run here"),
    log_level: str = typer.Option("WARNING", "--log-level", help="Python logging level of the driver"),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="continue the run in this RUN_DIR from its newest checkpoint (its config.json, "
        "then --config and overrides on top), replaying its unacknowledged experience",
    ),
) -> None:
    """Run a training job (embedded Redis + local Ray unless queue.redis_url / ray.address are set)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if resume is not None and not (resume / "config.json").is_file():
        typer.echo(f"error: --resume {resume}: no config.json there; give the RUN_DIR of an earlier run", err=True)
        raise typer.Exit(2)
    try:
        if resume is not None:
            # The run's own config (JSON is YAML); --config and overrides may change it; the run dir stays.
            base = load_config(resume / "config.json").model_dump(mode="json")
            if config is not None:
                base = _merge(base, load_config(config).model_dump(mode="json", exclude_unset=True))
            for item in overrides or []:
                key, value = parse_override(item)
                set_dotted(base, key, value)
            base["run_dir"] = str(resume.resolve())
            cfg = config_from_dict(base)
        else:
            cfg = load_config(config, overrides or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    from resetrl.launch.driver import RunAborted, train as run_training

    # SIGTERM (kill, Kubernetes, `ray job stop`) stops the run as Ctrl-C does: actors, learner, Ray and Redis.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        result = run_training(cfg, summary_path=summary, resume=resume is not None)
    except KeyboardInterrupt as exc:
        typer.echo("interrupted: stopped the actors, the learner, Ray and Redis", err=True)
        raise typer.Exit(143 if isinstance(exc, _Terminated) else 130)
    except RunAborted as exc:  # the run cannot go on; the message says why and what to do
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "reward_curve"}, indent=2))


@app.command()
def status(
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="a run directory (reads run.json there)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="the run's Redis"),
    run_name: str = typer.Option("run", "--run-name"),
    alive_seconds: float = typer.Option(60.0, "--alive-seconds", help="a worker unseen for longer is not alive"),
) -> None:
    """Show a running job's queues, policy versions, rollout workers, throughput and counters, read from Redis."""
    import time

    from resetrl.queue import StreamQueue, dead_letter_stream, stream_length
    from resetrl.run_state import (
        PROMPT_GROUP, desired_workers, learner_version as read_learner_version, ledger_summary, published_weights,
        read_heartbeats, read_stats, train_started_at, worker_count,
    )

    client, keys = _run_redis(run_dir, redis_url, run_name)
    published = published_weights(client, keys)
    learner_version = read_learner_version(client, keys)
    stats = read_stats(client, keys)
    now = time.time()
    try:
        held = StreamQueue(client, keys.prompts, PROMPT_GROUP, "status").consumers()
    except Exception:  # the group does not exist yet (the driver is still starting)
        held = {}
    workers = []
    for index, beat in sorted(read_heartbeats(client, keys).items()):
        seen_ago = now - beat.get("last_seen", 0)
        workers.append({
            "index": index, **beat, "version_lag": learner_version - beat.get("policy_version", 0),
            "seconds_since_seen": round(seen_ago, 1),
            "alive": beat.get("state") != "retired" and seen_ago <= alive_seconds,
            "pending_prompts": held.get(beat.get("consumer", f"rollout-{index}"), 0),
        })
    started_at = train_started_at(client, keys)
    elapsed = now - started_at if started_at else None
    report = {
        "run_name": keys.run_name,
        "prompt_queue_depth": stream_length(client, keys.prompts),
        "experience_queue_depth": stream_length(client, keys.experience),
        "dead_letters": {"prompts": stream_length(client, dead_letter_stream(keys.prompts)),
                         "experience": stream_length(client, dead_letter_stream(keys.experience))},
        "policy_version": published[0] if published else 0,
        "learner_policy_version": learner_version,
        "workers_desired": desired_workers(client, keys) or 0,
        "worker_count": worker_count(client, keys) or 0,
        "workers_alive": sum(worker["alive"] for worker in workers),
        "workers": workers,
        "prompt_consumers": held,  # consumer name -> prompts it holds unacknowledged
        "elapsed_seconds": round(elapsed, 1) if elapsed is not None else None,
        "tokens_per_s": round(stats.get("tokens_generated", 0) / elapsed, 2) if elapsed else None,
        "samples_per_s": round(stats.get("samples_generated", 0) / elapsed, 3) if elapsed else None,
        "ledger": ledger_summary(client, keys),  # every fed prompt id's state (trained ones once checkpointed)
        "stats": stats,
    }
    typer.echo(json.dumps(report, indent=2))


@app.command()
def scale(
    workers: int = typer.Option(..., "--workers", "-n", help="how many rollout workers the job should run (>= 1)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="a run directory (reads run.json there)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="the run's Redis"),
    run_name: str = typer.Option("run", "--run-name"),
) -> None:
    """Add or remove rollout workers of a running job; a removed worker first finishes the prompts it holds."""
    from resetrl.run_state import set_desired_workers

    if workers < 1:
        typer.echo(f"error: --workers {workers}: a job needs at least 1 rollout worker", err=True)
        raise typer.Exit(2)
    client, keys = _run_redis(run_dir, redis_url, run_name)
    running = _running_workers(client, keys)
    set_desired_workers(client, keys, workers)
    # The driver applies it within a second; `resetrl status` shows the workers as they join or retire.
    typer.echo(json.dumps({"run_name": keys.run_name, "workers_desired": workers, "workers_running": running}))


@app.command()
def stop(
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="a run directory (reads run.json there)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="the run's Redis"),
    run_name: str = typer.Option("run", "--run-name"),
) -> None:
    """End a running job after its current step, as if it had reached total_steps: a last checkpoint, every
    trained record acknowledged, the summary written (ended_by: "resetrl stop"). Ctrl-C stops at once instead."""
    from resetrl.run_state import request_finish

    client, keys = _run_redis(run_dir, redis_url, run_name)
    _running_workers(client, keys)
    request_finish(client, keys)
    typer.echo(json.dumps({"run_name": keys.run_name, "stopping": "after the current step"}))


def _running_workers(client, keys) -> int:
    """The running job's worker count; exit 1 with what to check when no job of that name is running."""
    from resetrl.run_state import stop_requested, worker_count

    running = worker_count(client, keys)
    if running is None or stop_requested(client, keys):
        typer.echo(f"error: no running job '{keys.run_name}' in that Redis (finished, stopping, or still starting "
                   "its workers; check --run-name / `resetrl status`)", err=True)
        raise typer.Exit(1)
    return running


def _run_redis(run_dir: Optional[Path], redis_url: Optional[str], run_name: str):
    """(client, RunKeys) of a run named by --run-dir (its run.json) or --redis-url and --run-name."""
    import re

    from resetrl.queue import connect, unreachable
    from resetrl.run_state import RunKeys

    if run_dir is not None:
        info_path = run_dir / "run.json"
        if not info_path.is_file():
            typer.echo(f"error: --run-dir {run_dir}: no run.json there; give the RUN_DIR of a started run", err=True)
            raise typer.Exit(2)
        info = json.loads(info_path.read_text())
        redis_url, run_name = redis_url or info["redis_url"], info["run_name"]
    if not redis_url:
        typer.echo("error: give --run-dir or --redis-url", err=True)
        raise typer.Exit(2)
    problem = unreachable(redis_url, connect_timeout_s=2, timeout_s=5)
    if problem is not None:
        where = re.sub(r"//[^@/]*@", "//***@", redis_url)  # no password in the message
        typer.echo(f"error: cannot reach the run's Redis at {where} ({problem}); has the run finished?", err=True)
        raise typer.Exit(1)
    return connect(redis_url), RunKeys(run_name)


@app.command()
def submit(
    address: str = typer.Option(..., "--address", envvar="RAY_DASHBOARD_ADDRESS",
                                help="the cluster's dashboard, e.g. http://HEAD:8265"),
    config: Path = typer.Option(..., "--config", "-c", help="YAML preset, e.g. configs/tiny.yaml"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted.key=value overrides, e.g. learner.lr=1e-5"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="stream the job's logs and exit with its status"),
    token: Optional[str] = typer.Option(None, "--token", envvar="RAY_AUTH_TOKEN", show_default=False,
                                        help="the cluster's Ray auth token (RAY_AUTH_MODE=token clusters)"),
    env: Optional[list[str]] = typer.Option(None, "--env", help="KEY=VALUE for the job's environment (repeatable)"),
) -> None:
    """Run `resetrl train` on an existing Ray cluster as a Ray Job; exits 0 when the job SUCCEEDED."""
    from resetrl.launch.submit import SubmitError, submit as submit_job

    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    extra_env = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            typer.echo(f"error: --env {item}: expected KEY=VALUE", err=True)
            raise typer.Exit(2)
        extra_env[key] = value
    try:
        code = submit_job(address, config, list(overrides or []), cfg, wait=wait, token=token, extra_env=extra_env)
    except SubmitError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    raise typer.Exit(code)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="a run directory, e.g. runs/tiny"),
    summary: Optional[Path] = typer.Option(None, "--summary", help="the run's --summary JSON (held-out accuracy); "
                                           "default: RUN_DIR/summary.json or the one beside RUN_DIR, if it is this run's"),
    out: Optional[Path] = typer.Option(None, "--out", help="where the PNGs go (default RUN_DIR/plots)"),
) -> None:
    """Write PNGs of a run: reward, held-out accuracy, throughput, queue depths and lag, resets, learner."""
    from resetrl.plots import NoRunData, write_plots

    if not run_dir.is_dir():
        typer.echo(f"error: {run_dir} is not a directory; give a RUN_DIR such as runs/tiny", err=True)
        raise typer.Exit(2)
    try:
        data = json.loads(summary.read_text()) if summary is not None else None
    except (OSError, json.JSONDecodeError) as exc:
        typer.echo(f"error: --summary {summary}: {exc}", err=True)
        raise typer.Exit(2)
    try:
        written = write_plots(run_dir, summary=data, out_dir=out)
    except NoRunData as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    for path, series in written.items():
        typer.echo(f"{path}: {', '.join(series)}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the driver is, so it unwinds through the same cleanup as Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":
    main()
