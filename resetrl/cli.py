"""`resetrl` command line: train, status."""

from __future__ import annotations

import json
import logging
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
    from resetrl.driver import train as run_training

    try:
        result = run_training(cfg, summary_path=summary, resume=resume is not None)
    except KeyboardInterrupt:
        typer.echo("interrupted: stopped the actors, the learner, Ray and Redis", err=True)
        raise typer.Exit(130)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "reward_curve"}, indent=2))


@app.command()
def status(
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="a run directory (reads run.json there)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="the run's Redis"),
    run_name: str = typer.Option("run", "--run-name"),
) -> None:
    """Show a running job's queues, policy version and counters, read from Redis."""
    from resetrl.queue import connect
    from resetrl.run_state import RunKeys, read_stats

    if run_dir is not None:
        info = json.loads((run_dir / "run.json").read_text())
        redis_url, run_name = redis_url or info["redis_url"], info["run_name"]
    if not redis_url:
        typer.echo("error: give --run-dir or --redis-url", err=True)
        raise typer.Exit(2)
    client = connect(redis_url)
    keys = RunKeys(run_name)
    weights = {k.decode(): v.decode() for k, v in client.hgetall(keys.weights).items()}
    report = {
        "run_name": run_name,
        "prompt_queue_depth": client.xlen(keys.prompts),
        "experience_queue_depth": client.xlen(keys.experience),
        "dead_letters": {"prompts": client.xlen(f"{keys.prompts}:dead"), "experience": client.xlen(f"{keys.experience}:dead")},
        "policy_version": int(weights.get("version", 0)),
        "stats": read_stats(client, keys),
    }
    typer.echo(json.dumps(report, indent=2))


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":
    main()
