"""Where the run's other processes write: each actor's output goes to RUN_DIR/logs/<role>.log, not the console.

The driver starts Ray with log_to_driver=False, so no worker output is streamed to its terminal, and creates every
actor with `actor_options`: a name for the Ray dashboard (`<run>/rollout-0`, `<run>/learner-rank0`,
`<run>/evaluator`) and the environment that `route_worker_output` reads. Ray runs that function in each new worker
process before the actor is created (the job's `worker_process_setup_hook`), so everything the process writes from
then on (vLLM's and DeepSpeed's logging, C++ warnings, progress bars) lands in the role's file, and still in Ray's
own worker log too (the dashboard's Logs tab). vLLM's verbosity comes from VLLM_LOGGING_LEVEL, which it reads when
it is imported, so it is set in the actor's environment rather than here.

The run's own warnings and errors (loggers under `resetrl`) are also appended, one record per write, to
RUN_DIR/logs/warnings.log, which the driver's console follows (`WarningFollower`): they still reach the person
watching. On a cluster whose nodes do not share RUN_DIR, a remote actor's warnings stay in its node's files and in
the dashboard.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

LOG_FILE_ENV = "RESETRL_LOG_FILE"
LOG_LEVEL_ENV = "RESETRL_LOG_LEVEL"
# Given to ray.init as runtime_env["worker_process_setup_hook"]; a module path, so it also works on a cluster.
SETUP_HOOK = "resetrl.worker_logs.route_worker_output"
WARNINGS_FILE = "warnings.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_tee: subprocess.Popen | None = None  # kept referenced for the life of the worker process


def logs_dir(run_path: Path) -> Path:
    return run_path / "logs"


def actor_name(run_name: str, role: str) -> str:
    """The name the Ray dashboard and state API show: the run first (two runs may share a cluster), then the role."""
    return f"{run_name}/{role}"


def actor_options(cfg, role: str) -> dict:
    """Options for `.options(**...)` of the actor playing `role` (e.g. rollout-0, learner-rank0, evaluator)."""
    env = {
        LOG_FILE_ENV: str(logs_dir(cfg.run_path) / f"{role}.log"),
        LOG_LEVEL_ENV: cfg.monitor.log_level,
        "VLLM_LOGGING_LEVEL": cfg.monitor.log_level,
    }
    # Ray merges these env_vars into the job's (the setup hook among them) for this actor's worker process.
    return {"name": actor_name(cfg.run_name, role), "runtime_env": {"env_vars": env}}


def route_worker_output() -> None:
    """Ray's worker_process_setup_hook: send this worker's output to its role's log file (a no-op for workers that
    play no role, such as the learner group's rendezvous task)."""
    path = os.environ.get(LOG_FILE_ENV)
    if not path:
        return
    log_file = Path(path)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _tee_output(log_file)
    level = os.environ.get(LOG_LEVEL_ENV, "INFO")
    root = logging.getLogger()
    root.setLevel(level)
    if not any(isinstance(handler, logging.StreamHandler) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
    ours = logging.FileHandler(log_file.parent / WARNINGS_FILE, encoding="utf-8")  # append mode: atomic lines
    ours.setLevel(logging.WARNING)
    ours.setFormatter(logging.Formatter(f"{log_file.stem} %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("resetrl").addHandler(ours)


def _tee_output(log_file: Path) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so C++ and child output too) at `tee`,
    which appends to `log_file` and passes everything on to where it went before (Ray's worker log)."""
    global _tee
    sys.stdout.flush()
    sys.stderr.flush()
    if shutil.which("tee") is None:  # no coreutils: the file only
        with open(log_file, "ab") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
        return
    # Its own session and -i: Ctrl-C in the driver's terminal must not end it before the actor is killed.
    before = os.dup(1)
    _tee = subprocess.Popen(["tee", "-a", "-i", str(log_file)], stdin=subprocess.PIPE, stdout=before,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(before)
    os.dup2(_tee.stdin.fileno(), 1)
    os.dup2(_tee.stdin.fileno(), 2)
    _tee.stdin.close()  # fds 1 and 2 keep the pipe open; tee ends when this process (and its children) do


class WarningFollower:
    """The driver's side: new lines of RUN_DIR/logs/warnings.log since it was created (or last read)."""

    def __init__(self, run_path: Path):
        self.path = logs_dir(run_path) / WARNINGS_FILE
        self.offset = self.path.stat().st_size if self.path.is_file() else 0  # an earlier run's lines are old news

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        return data[:end].decode("utf-8", errors="replace").splitlines()
