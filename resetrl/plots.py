"""Pictures of a run: `resetrl plot RUN_DIR` (and every run, when it ends) writes PNGs to RUN_DIR/plots/.

The curves come from the run's TensorBoard event files (RUN_DIR/tensorboard, every scalar the driver logged per
step) and, for the held-out accuracy and when there are no event files, from the run's summary JSON. A scalar is
found by its name with or without a namespace (`reward_mean`, `train/reward_mean`, `rollout/reward_mean`). Each PNG
carries the series it draws as JSON in its `resetrl:series` text chunk, so a test (or a script) can read back
exactly what was plotted.
"""

from __future__ import annotations

import json
from pathlib import Path

# PNG name -> (title, the scalars drawn, one panel each, in this order; those the run lacks are skipped).
PLOTS: dict[str, tuple[str, list[str]]] = {
    "reward": ("Reward of the trained batch", ["reward_mean", "reward_mean_rollout"]),
    "throughput": ("Throughput", ["samples_per_s", "rollout_tokens_per_s", "tokens_per_s"]),
    "queues": ("Queue depths and policy lag", ["queue_depth_prompts", "queue_depth_experience", "version_lag",
                                               "samples_dropped_stale"]),
    "resets": ("Resets", ["reset_rate", "fallback_rate", "g2_success_rate", "reset_step_fraction",
                          "localisation_parse_rate", "localisation_accuracy"]),
    "learner": ("Learner", ["loss", "grad_norm", "clip_fraction", "kl", "train_seconds", "publish_seconds"]),
}
HELD_OUT = "heldout_accuracy"
_HELD_OUT_SCALARS = ("eval_accuracy", "eval/accuracy")
SERIES_KEY = "resetrl:series"

Series = list[tuple[float, float]]


class NoRunData(ValueError):
    """The directory has neither TensorBoard event files nor a summary to draw from."""


def _matches(tag: str, name: str) -> bool:
    return tag == name or tag.endswith("/" + name)


def read_event_scalars(tensorboard_dir: Path) -> dict[str, Series]:
    """tag -> [(step, value)] from every event file in the folder (a resumed run appends a second file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir() or not list(tensorboard_dir.glob("events.out.tfevents.*")):
        return {}
    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}  # a resumed step: the last one
        scalars[tag] = sorted(by_step.items())
    return scalars


def find_summary(run_dir: Path) -> dict | None:
    """RUN_DIR/summary.json, or the `--summary` file beside RUN_DIR that `make run` writes, if it is this run's."""
    for candidate in (run_dir / "summary.json", run_dir.parent / "summary.json"):
        if candidate.is_file():
            try:
                summary = json.loads(candidate.read_text())
            except json.JSONDecodeError:
                continue
            if Path(summary.get("run_dir", run_dir)).resolve() == run_dir.resolve():
                return summary
    return None


def _series_from_summary(summary: dict) -> dict[str, Series]:
    series = {}
    if summary.get("reward_curve"):
        series["reward_mean"] = [(step, value) for step, value in enumerate(summary["reward_curve"], start=1)]
    if summary.get("step_end_seconds") and summary.get("tokens_generated_curve"):
        series["rollout_tokens_per_s"] = [
            (step, tokens / seconds) for step, (tokens, seconds)
            in enumerate(zip(summary["tokens_generated_curve"], summary["step_end_seconds"]), start=1) if seconds > 0
        ]
    return series


def write_plots(run_dir: str | Path, summary: dict | None = None,
                out_dir: str | Path | None = None) -> dict[str, list[str]]:
    """Write the run's PNGs; returns {png path: names of the series drawn}. Raises NoRunData if there is nothing."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    summary = summary if summary is not None else find_summary(run_dir)
    scalars = read_event_scalars(run_dir / "tensorboard")
    if not scalars and summary:
        scalars = _series_from_summary(summary)
    eval_curve = (summary or {}).get("eval_curve") or []
    if not scalars and not eval_curve:
        raise NoRunData(f"{run_dir}: no TensorBoard event files in {run_dir / 'tensorboard'} and no summary JSON "
                        "(RUN_DIR/summary.json, or the --summary file beside RUN_DIR); is this a run directory?")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (title, wanted) in PLOTS.items():
        panels = {}
        for scalar in wanted:
            tag = next((tag for tag in sorted(scalars) if _matches(tag, scalar) and scalars[tag]), None)
            if tag is not None:
                panels[tag] = scalars[tag]
        if panels:
            written[str(out / f"{name}.png")] = _draw(out / f"{name}.png", title, panels, "learner step")
    held_out = {}
    if eval_curve:
        held_out["held-out accuracy"] = [(p["policy_version"], p["accuracy"]) for p in eval_curve]
    else:
        tag = next((tag for tag in sorted(scalars) if any(_matches(tag, n) for n in _HELD_OUT_SCALARS)), None)
        if tag is not None:
            held_out[tag] = scalars[tag]
    if held_out:
        written[str(out / f"{HELD_OUT}.png")] = _draw(out / f"{HELD_OUT}.png", "Held-out accuracy", held_out,
                                                      "policy version", percent=True)
    return written


def _draw(path: Path, title: str, panels: dict[str, Series], xlabel: str, percent: bool = False) -> list[str]:
    # Figure + Agg canvas, not pyplot: no global state, no display needed, safe beside a running driver.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    figure = Figure(figsize=(7, 2.2 * len(panels) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, points) in zip(axes, panels.items()):
        xs, ys = [x for x, _ in points], [y for _, y in points]
        ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, color="C0")
        ax.set_ylabel(label.rsplit("/", 1)[-1], fontsize=8)
        ax.grid(alpha=0.3)
        if percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[-1].set_xlabel(xlabel)
    figure.suptitle(title)
    series = {label: [[float(x), float(y)] for x, y in points] for label, points in panels.items()}
    figure.savefig(path, dpi=100, metadata={SERIES_KEY: json.dumps(series)})
    return list(panels)


def read_plotted_series(png: str | Path) -> dict[str, Series]:
    """The series a PNG written here draws (from its text chunk)."""
    from PIL import Image

    with Image.open(png) as image:
        return {label: [tuple(point) for point in points]
                for label, points in json.loads(image.info[SERIES_KEY]).items()}
