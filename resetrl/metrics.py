"""The run's scalars: every finite number a role reports, under a namespace, to TensorBoard, the Ray metrics and
the summary (docs/design.md, "Metrics"). No allowlist: a new counter or learner statistic shows up everywhere
without being declared here.

Namespaces: `learner/` (what the learner's step returns: loss, pg_loss, grad_norm, approx_kl, clip fractions,
version_lag, seconds...), `rollout/` (rates derived from the run's counters: reward, resets, localisation, the
method's own rates), `eval/` (held-out accuracy), `system/` (queue depths, throughput, and every raw counter of the
run). TensorBoard tags are `<namespace>/<name>`; Ray gauges are `resetrl_<namespace>_<name>`; with
logging.wandb.project set, W&B gets the same tags (plotted against its `step` metric).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from resetrl.methods.base import ratio

log = logging.getLogger(__name__)

NAMESPACES = ("rollout", "learner", "eval", "system")


def derived_rates(stats: dict, method=None) -> dict[str, float | None]:
    """Rates every method reports, plus the method's own (Method.derived_metrics), from the run's counters."""
    get = lambda name: float(stats.get(name, 0))  # noqa: E731
    rates = {
        "reward_mean_rollout": ratio(get("reward_sum"), get("rewards_scored")),
        "tokens_per_trained_token": ratio(get("tokens_generated"), get("tokens_trained")),
        "discarded_token_fraction": ratio(get("tokens_discarded"), get("tokens_generated")),
    }
    if method is not None:
        for name, (_help, compute) in method.derived_metrics.items():
            rates[name] = compute(stats)
    return rates


def namespaced(*, learner: dict | None = None, rollout: dict | None = None, eval: dict | None = None,
               system: dict | None = None) -> dict[str, float]:
    """{"<namespace>/<name>": value} for every finite number given; everything else (None, text, lists) is left out."""
    out = {}
    for namespace, values in (("learner", learner), ("rollout", rollout), ("eval", eval), ("system", system)):
        for name, value in (values or {}).items():
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{namespace}/{name}"] = float(value)
    return out


def ray_metric_name(tag: str) -> str:
    """`learner/grad_norm` -> `resetrl_learner_grad_norm` (Prometheus names: letters, digits, underscores)."""
    return "resetrl_" + re.sub(r"[^a-zA-Z0-9_]", "_", tag)


# W&B plots every tag against this metric, not its own step counter: the driver logs the held-out evaluation
# points at the end of the run, at earlier steps, and W&B drops a log whose own step goes back.
WANDB_STEP_METRIC = "step"


def start_wandb(settings, run_dir: Path, run_name: str, config: dict | None = None, resume: bool = False):
    """A W&B run writing under run_dir/wandb (logging.wandb: project, mode); None when W&B is off. A resumed run
    continues the W&B run of the first one (its id is kept in run_dir/wandb-run-id)."""
    if settings is None or not settings.project or settings.mode == "disabled":
        return None
    import wandb  # the optional extra; config.py refuses a project without it

    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / "wandb-run-id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    run = wandb.init(project=settings.project, mode=settings.mode, dir=str(run_dir), name=run_name, config=config,
                     id=run_id, resume="allow" if run_id else None,
                     # the driver's progress bar redraws the terminal; its frames are no log worth uploading
                     settings=wandb.Settings(console="off"))
    id_file.write_text(run.id)
    run.define_metric(WANDB_STEP_METRIC)
    run.define_metric("*", step_metric=WANDB_STEP_METRIC)
    return run


class MetricsSink:
    def __init__(self, log_dir: Path | None, use_ray: bool = True, wandb_run=None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        self.wandb_run = wandb_run  # start_wandb(...), or None
        self.use_ray = use_ray
        self.gauges: dict = {}
        self.last: dict[str, float] = {}  # the newest value of every tag, for the summary

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """scalars: {"<namespace>/<name>": value}, as `namespaced` builds them."""
        finite = {tag: float(value) for tag, value in scalars.items() if value is not None and math.isfinite(value)}
        for tag, value in finite.items():
            self.last[tag] = value
            if self.writer is not None:
                self.writer.add_scalar(tag, value, step)
            gauge = self._gauge(tag)
            if gauge is not None:
                gauge.set(value)
        if self.wandb_run is not None and finite:
            self.wandb_run.log({**finite, WANDB_STEP_METRIC: step})

    def _gauge(self, tag: str):
        if not self.use_ray:
            return None
        if tag not in self.gauges:
            try:
                from ray.util import metrics

                self.gauges[tag] = metrics.Gauge(ray_metric_name(tag), f"resetrl {tag}")
            except Exception as exc:  # the dashboard is a convenience: never fail a run over it
                log.warning("ray metric %s disabled: %s", tag, exc)
                self.gauges[tag] = None
        return self.gauges[tag]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            # finish() can return before W&B's service process has written the run's file (seen with wandb 0.31
            # offline); teardown waits for it, so RUN_DIR/wandb is complete when the run returns.
            wandb.teardown()
            self.wandb_run = None
