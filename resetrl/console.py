"""The driver's console: one live display of a run, or one plain line per step when it is not a terminal.

On a terminal (stderr, so stdout stays free for the JSON result): a progress bar (step of total, elapsed, ETA) and,
under it, a compact panel of the key numbers, both redrawn in place. The run's own warnings and errors, the
driver's (Python logging) and the actors' (followed from RUN_DIR/logs/warnings.log, resetrl/worker_logs.py), print
above it; nothing else reaches the terminal, because every engine and Ray worker writes to RUN_DIR/logs/<role>.log.
Not a terminal (a pipe, a CI log, a Ray Job's log): the same numbers, one line per finished step.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from resetrl.worker_logs import WarningFollower, logs_dir

console = Console(stderr=True)


def _scalar(scalars: dict | None, name: str) -> float | None:
    """`name` in the driver's step scalars, flat (`loss`) or under a namespace (`learner/loss`)."""
    if not scalars:
        return None
    for key, value in scalars.items():
        if (key == name or key.endswith("/" + name)) and isinstance(value, (int, float)):
            return float(value)
    return None


def key_numbers(scalars: dict | None, stats: dict, queues: dict | None, eval_results: list[dict] | None,
                elapsed: float) -> dict[str, str]:
    """The panel's label -> text, from the last step's scalars, the run's counters (Redis), the queue depths and
    the held-out evaluations so far; a number the run does not have yet is left out."""
    numbers: dict[str, str] = {}
    if (reward := _scalar(scalars, "reward_mean")) is not None:
        numbers["reward"] = f"{reward:.3f}"
    if eval_results:
        first, last = eval_results[0], eval_results[-1]
        numbers["held-out acc"] = f"{last['accuracy']:.1%} at v{last['policy_version']}"
        if len(eval_results) > 1:
            numbers["held-out acc"] += f" (v{first['policy_version']}: {first['accuracy']:.1%})"
    if elapsed > 0:
        numbers["samples/s"] = f"{float(stats.get('samples_generated', 0)) / elapsed:.2f}"
        numbers["tokens/s"] = f"{float(stats.get('tokens_generated', 0)) / elapsed:.1f}"
    if queues:
        numbers["queues"] = " ".join(f"{name} {depth}" for name, depth in queues.items())
    if (version := _scalar(scalars, "policy_version")) is not None:
        lag = _scalar(scalars, "version_lag")
        numbers["policy"] = f"v{version:.0f}" + (f" lag {lag:.2f}" if lag is not None else "")
    if (loss := _scalar(scalars, "loss")) is not None:
        numbers["loss"] = f"{loss:.4f}"
    numbers["stale drops"] = str(int(float(stats.get("samples_dropped_stale", 0))))
    if (reset_rate := _scalar(scalars, "reset_rate")) is not None:
        numbers["resets"] = f"{reset_rate:.0%} of prompts"
        if (g2 := _scalar(scalars, "g2_success_rate")) is not None:
            numbers["resets"] += f", G2 success {g2:.0%}"
    for count, seconds, label in (("weight_loads", "weight_load_seconds", "weight load"),
                                  ("weight_syncs", "weight_sync_seconds", "weight sync")):
        if float(stats.get(count, 0)) > 0:
            numbers[label] = f"{float(stats.get(seconds, 0)) / float(stats[count]):.2f} s"
    return numbers


class RunDisplay:
    """Use as a context manager around the train loop; call update() at every poll and at every step's end."""

    def __init__(self, total_steps: int, run_path: Path, header: str = "", out: Console = console):
        self.total_steps = total_steps
        self.out = out
        self.header = header
        self.live_mode = out.is_terminal
        self.follower = WarningFollower(run_path)
        self.numbers: dict[str, str] = {}
        self.scalars: dict | None = None
        self.eval_results: list[dict] | None = None
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=out,
        )
        self.task = self.progress.add_task("train", total=total_steps)
        self.live: Live | None = None
        self._swapped: list[tuple[logging.StreamHandler, object]] = []

    def __enter__(self) -> "RunDisplay":
        if self.header:
            self.out.print(self.header, highlight=False)
        if self.live_mode:
            self.live = Live(self._render(), console=self.out, refresh_per_second=4, transient=False)
            self.live.start()
            self._route_logging_through_live()
        return self

    def __exit__(self, *exc) -> None:
        self._print_warnings()
        if self.live is not None:
            self.live.update(self._render(), refresh=True)
            self.live.stop()
            for handler, stream in self._swapped:
                handler.setStream(stream)
            self._swapped = []

    def update(self, step: int, *, stats: dict, elapsed: float, queues: dict | None = None,
               scalars: dict | None = None, eval_results: list[dict] | None = None, step_ended: bool = False) -> None:
        if scalars is not None:
            self.scalars = scalars
        if eval_results is not None:
            self.eval_results = eval_results
        self.numbers = key_numbers(self.scalars, stats, queues, self.eval_results, elapsed)
        self.progress.update(self.task, completed=step)
        self._print_warnings()
        if self.live is not None:
            self.live.update(self._render())
        elif step_ended:
            text = " | ".join(f"{label} {value}" for label, value in self.numbers.items())
            self.out.print(f"step {step}/{self.total_steps} | {text} | {_clock(elapsed)}", highlight=False,
                           soft_wrap=True)

    def say(self, message: str) -> None:
        """A line above the display (or in the plain log): scaling, evaluation, where to look."""
        self.out.log(message)

    def _render(self):
        grid = Table.grid(padding=(0, 2))
        columns = 3
        for _ in range(columns):
            grid.add_column(style="dim", justify="right")
            grid.add_column()
        items = list(self.numbers.items())
        for start in range(0, len(items), columns):
            row = []
            for label, value in items[start:start + columns]:
                row += [label, value]
            grid.add_row(*row)
        return Group(self.progress, Panel(grid, title="resetrl", title_align="left", expand=False))

    def _print_warnings(self) -> None:
        for line in self.follower.new_lines():
            style = "red" if " ERROR " in line or " CRITICAL " in line else "yellow"
            self.out.print(line, style=style, highlight=False, markup=False, soft_wrap=True)

    def _route_logging_through_live(self) -> None:
        """Logging handlers made before the display hold the real stderr, and would draw over it; while it is up,
        they write through rich's redirected stream, which prints above the display."""
        originals = (sys.__stderr__, sys.__stdout__)
        for logger in (logging.getLogger(), logging.getLogger("ray")):
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    if handler.stream in originals:
                        self._swapped.append((handler, handler.stream))
                        handler.setStream(sys.stderr)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _token_auth() -> bool:
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return bool(is_token_auth_enabled())
    except Exception:  # an older or newer Ray without it: say nothing about tokens
        return False


def run_header(cfg, dashboard_url: str | None) -> str:
    """What the run is and where to look, printed once above the display."""
    lines = [f"[bold]{cfg.run_name}[/bold]: {cfg.algorithm.name} on {cfg.model.name}, {cfg.total_steps} steps, "
             f"run dir {cfg.run_path}"]
    if dashboard_url:
        where = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        token = " (token auth: paste the token from ~/.ray/auth_token or $RAY_AUTH_TOKEN)" if _token_auth() else ""
        lines.append(f"Ray dashboard {where}{token}")
    lines.append(f"engine and worker logs: {logs_dir(cfg.run_path)}/<role>.log")
    return "\n".join(lines)


def run_end_lines(summary: dict) -> list[str]:
    """The result in a few lines: reward and held-out accuracy first -> last, and where the plots and logs are."""
    lines = []
    if summary.get("reward_mean_first") is not None:
        lines.append(f"reward (training batch) {summary['reward_mean_first']:.3f} -> {summary['reward_mean_last']:.3f}")
    if summary.get("eval_accuracy_first") is not None:
        curve = summary.get("eval_curve") or []
        problems = curve[-1].get("problems") if curve else None
        count = f" on {problems} held-out problems" if problems else ""
        lines.append(f"held-out accuracy {summary['eval_accuracy_first']:.1%} -> {summary['eval_accuracy_last']:.1%}"
                     f"{count}")
    if summary.get("plots_dir"):
        lines.append(f"plots: {summary['plots_dir']}")
    if summary.get("run_dir"):
        lines.append(f"logs: {Path(summary['run_dir']) / 'logs'}")
    return lines
