"""`resetrl submit`: run `resetrl train` on an existing Ray cluster as a Ray Job.

The config is validated here first, so a bad key fails on the user's machine, not minutes later on the cluster.
The job's runtime_env carries a working_dir holding just the config (and a relative `data.path` file), plus the
offline environment; the entrypoint is `resetrl train` on the cluster, whose image or venv has resetrl installed.
Inside the job the driver finds the cluster through RAY_ADDRESS (set by Ray's job supervisor, see
`services.start_ray`). We stream the job's logs and exit with its outcome, as `ray job submit` does.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from resetrl.config import RunConfig

# Environment of the job's driver and, through the job's runtime_env, of every actor it starts.
# Hub access is the user's choice (their HF_HUB_OFFLINE / HF_TOKEN via --env): hub model and dataset ids need it.
JOB_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "false",
    # The driver passes its own runtime_env (worker env defaults) to ray.init; Ray refuses to merge it with the
    # job's when keys overlap unless this is set, and then the driver's values win.
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """The job could not be submitted or followed; the message says what to do."""


def cluster_run_dir(cfg: RunConfig) -> str:
    """The run dir as a shell word for the entrypoint.

    A Ray Job runs in a temporary copy of its working_dir that Ray deletes later, so a relative run_dir
    (the presets' `runs/{run_name}`) is placed under the cluster user's home instead.
    """
    run_dir = cfg.run_dir.format(run_name=cfg.run_name)
    if run_dir.startswith("~/"):
        run_dir = run_dir[2:]
    elif Path(run_dir).is_absolute():
        return shlex.quote(run_dir)
    return '"$HOME"/' + shlex.quote(run_dir)


def build_job(config_path: Path, overrides: list[str], cfg: RunConfig, job_dir: Path,
              extra_env: dict[str, str]) -> tuple[str, dict]:
    """Fill job_dir (the working_dir) and return (entrypoint, runtime_env)."""
    shutil.copy(config_path, job_dir / config_path.name)
    if cfg.data.path and not Path(cfg.data.path).is_absolute() and Path(cfg.data.path).exists():
        # A relative data file is read on the cluster relative to the job's working dir: ship it along.
        source = Path(cfg.data.path)
        if not source.is_file():
            raise SubmitError(f"data.path={cfg.data.path} is a folder here; give a path that exists on the cluster "
                              "as an absolute path, or a local file to ship with the job")
        (job_dir / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, job_dir / source)
    run_dir = cluster_run_dir(cfg)
    words = ["resetrl", "train", "--config", shlex.quote(config_path.name),
             "--summary", f"{run_dir}/summary.json", *map(shlex.quote, overrides), f"run_dir={run_dir}"]
    runtime_env = {"working_dir": str(job_dir), "env_vars": {**JOB_ENV_DEFAULTS, **extra_env}}
    return " ".join(words), runtime_env


def job_client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    # Ray (>= 2.52) token auth checks `Authorization: Bearer <token>` on every dashboard request. Without a
    # token here, Ray adds one itself when this process has RAY_AUTH_MODE=token (~/.ray/auth_token).
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({exc}); is the head up and the "
                          "dashboard port (8265) reachable?") from exc


async def _stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def wait_for_job(client, job_id: str, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends; return its final status name."""
    try:
        asyncio.run(_stream_logs(client, job_id))
    except RuntimeError as exc:  # the log socket dropped (e.g. the head restarted): fall back to polling
        print(f"log stream ended early ({exc}); polling the job status", file=sys.stderr)
    while (status := str(client.get_job_status(job_id).value)) not in _TERMINAL:
        time.sleep(poll_s)
    return status


def _submit_when_ready(client, entrypoint: str, runtime_env: dict, metadata: dict, timeout_s: float = 120) -> str:
    # A head that has just started serves the dashboard before its job agent is up; Ray answers 500 "No available
    # agent to submit job" meanwhile (docker compose's submitter meets this right after the head turns healthy).
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise SubmitError(f"the cluster did not accept the job: {exc}") from exc
            time.sleep(2)


def submit(address: str, config_path: Path, overrides: list[str], cfg: RunConfig, *, wait: bool = True,
           token: str | None = None, extra_env: dict[str, str] | None = None) -> int:
    """Submit the run; with wait, follow it and return 0 if it SUCCEEDED, 1 otherwise."""
    from ray.exceptions import AuthenticationError

    if not cfg.queue.redis_url:
        print("warning: queue.redis_url is not set: the job starts an embedded Redis on the driver's node, bound "
              "to 127.0.0.1, which actors on other nodes cannot reach. Fine on a one-node cluster; otherwise "
              "set queue.redis_url=redis://:PASSWORD@HOST:6379/0", file=sys.stderr)
    try:
        client = job_client(address, token)
        with tempfile.TemporaryDirectory(prefix="resetrl-job-") as job_dir:
            entrypoint, runtime_env = build_job(config_path, overrides, cfg, Path(job_dir), extra_env or {})
            job_id = _submit_when_ready(client, entrypoint, runtime_env, {"resetrl_run_name": cfg.run_name})
    except AuthenticationError as exc:
        raise SubmitError(f"the Ray dashboard at {address} refused the request: {exc}\nPass the cluster's token "
                          "with --token or RAY_AUTH_TOKEN (on the head: `ray get-auth-token`).") from exc
    print(f"submitted job {job_id} to {address}\n  entrypoint: {entrypoint}\n  dashboard: {address}/#/jobs/{job_id}",
          file=sys.stderr)
    if not wait:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}", file=sys.stderr)
        return 0
    try:
        status = wait_for_job(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: ray job stop --address {address} {job_id}",
              file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}", file=sys.stderr)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        if info.message:
            print(f"  {info.message}", file=sys.stderr)
        return 1
    return 0
