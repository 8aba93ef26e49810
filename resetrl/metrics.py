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
    "reset_rate": "prompts that got a reset (a failed parent) / prompts",
    "fallback_rate": "prompts without a failed parent (plain GRPO group) / prompts",
    "localisation_parse_rate": "SRPO localisations whose step number parsed / localisations",
    "localisation_accuracy": "chosen reset steps equal to the true first wrong step (reset.step_checker) / checked "
    "(srpo: self-localisation; rrpo: the random baseline; oracle: 1)",
    "reset_step_mean": "mean reset step k",
    "parent_steps_mean": "mean number of steps of the reset parents",
    "reset_step_fraction": "mean k / steps of the parent",
    "g2_success_rate": "continuations from a reset that succeeded / continuations",
    "tokens_per_trained_token": "generated tokens (parents, localisations, fresh, continuations) / trained tokens",
    "reward_mean_rollout": "mean reward of everything scored (all samples, since the start)",
    "srl_malformed_rate": "SRL answers without a step after </think> / SRL answers",
    "srl_similarity_mean": "SRL: mean similarity of well-formed steps to the expert step",
    "srl_instance_keep_rate": "SRL instances kept by dynamic sampling / instances",
    "superrl_sft_fraction": "SuperRL prompts trained on the expert solution (gate c = 0) / prompts",
    "repair_success_rate": "repairs the verifier accepted / repairs attempted",
    "repair_trained_token_fraction": "repair tokens inside the trained diff spans / tokens of accepted repairs",
    "sft_loss": "learner NLL of supervised targets (expert solutions, repairs)",
}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def derived_rates(stats: dict) -> dict[str, float | None]:
    """The rates the progress bar, TensorBoard, Ray and the summary report, from the run's counters."""
    get = lambda name: float(stats.get(name, 0))  # noqa: E731
    prompts_classified = get("reset_prompts") + get("fallback_prompts")
    return {
        "reset_rate": _ratio(get("reset_prompts"), prompts_classified),
        "fallback_rate": _ratio(get("fallback_prompts"), prompts_classified),
        "localisation_parse_rate": _ratio(get("localisation_parsed"), get("localisations")),
        "localisation_accuracy": _ratio(get("localisation_correct"), get("localisation_checked")),
        "reset_step_mean": _ratio(get("reset_step_sum"), get("resets")),
        "parent_steps_mean": _ratio(get("parent_steps_sum"), get("resets")),
        "reset_step_fraction": _ratio(get("reset_step_fraction_sum"), get("resets")),
        "g2_success_rate": _ratio(get("g2_successes"), get("g2_samples")),
        "tokens_per_trained_token": _ratio(get("tokens_generated"), get("tokens_trained")),
        "reward_mean_rollout": _ratio(get("reward_sum"), get("rewards_scored")),
        "srl_malformed_rate": _ratio(get("srl_malformed"), get("srl_samples")),
        "srl_similarity_mean": _ratio(get("srl_similarity_sum"), get("srl_samples") - get("srl_malformed")),
        "srl_instance_keep_rate": _ratio(get("srl_instances") - get("srl_instances_dropped"), get("srl_instances")),
        "superrl_sft_fraction": _ratio(get("superrl_sft_prompts"), get("superrl_prompts")),
        "repair_success_rate": _ratio(get("repairs_accepted"), get("repairs_attempted")),
        "repair_trained_token_fraction": _ratio(get("repair_tokens_trained"), get("repair_tokens")),
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
