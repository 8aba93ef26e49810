"""The driver's scalars: TensorBoard event files and Ray dashboard metrics (ray.util.metrics), same names."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Scalar name -> help text. Every one goes to TensorBoard as train/<name> and to Ray as resetrl_<name>.
DRIVER_SCALARS = {
    "reward_mean": "mean outcome reward of the trained batch",
    "loss": "learner policy loss",
    "clip_fraction": "fraction of tokens whose ratio was clipped",
    "kl": "k3 KL to the reference model",
    "response_len_mean": "mean response length of the trained batch (tokens)",
    "policy_version": "policy version after the step",
    "queue_depth_experience": "experience records waiting or in use",
    "queue_depth_prompts": "prompts waiting or in use",
    "samples_per_s": "generated samples per second since the start",
    "rollout_tokens_per_s": "generated tokens per second since the start",
    "samples_dropped_stale": "records dropped for staleness (total)",
    "version_lag": "learner version minus the version the trained batch was generated with",
    "train_seconds": "seconds of the learner's forward/backward/step",
    "publish_seconds": "seconds to publish the new weights",
}


class MetricsSink:
    def __init__(self, log_dir: Path | None, use_ray: bool = True):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        self.gauges = {}
        if use_ray:
            try:
                from ray.util import metrics

                self.gauges = {name: metrics.Gauge(f"resetrl_{name}", help_text) for name, help_text in DRIVER_SCALARS.items()}
            except Exception as exc:  # the dashboard is a convenience: never fail a run over it
                log.warning("ray metrics disabled: %s", exc)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            if value is None or name not in DRIVER_SCALARS:
                continue
            if self.writer is not None:
                self.writer.add_scalar(f"train/{name}", float(value), step)
            if name in self.gauges:
                self.gauges[name].set(float(value))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
