"""`resetrl plot RUN_DIR`: PNGs from a run's TensorBoard event files and summary (resetrl/plots.py).

The event files are written by the same SummaryWriter the driver's MetricsSink uses, with namespaced tags; each PNG
must be a real image that draws the expected series (read back from its text chunk, and its line seen in the pixels).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from typer.testing import CliRunner

from resetrl.cli import app
from resetrl.plots import read_plotted_series, write_plots

REWARD = [0.25, 0.375, 0.5, 0.5]
TOKENS_PER_S = [10.0, 12.5, 15.0, 20.0]
EVAL = [{"policy_version": 0, "accuracy": 0.125, "problems": 8}, {"policy_version": 2, "accuracy": 0.25, "problems": 8},
        {"policy_version": 4, "accuracy": 0.5, "problems": 8}]
LINE_RGB = (31, 119, 180)  # matplotlib's C0, the colour every curve is drawn in


def _run_dir(tmp_path, reset_method: bool):
    run = tmp_path / "run"
    writer = SummaryWriter(log_dir=str(run / "tensorboard"))
    for step, (reward, tokens) in enumerate(zip(REWARD, TOKENS_PER_S), start=1):
        writer.add_scalar("learner/reward_mean", reward, step)
        writer.add_scalar("system/rollout_tokens_per_s", tokens, step)
        writer.add_scalar("system/queue_depth_prompts", 4 - step, step)
        writer.add_scalar("learner/version_lag", 0.5, step)
        if reset_method:
            writer.add_scalar("rollout/reset_rate", 0.25 * step, step)
    writer.close()
    (run / "summary.json").write_text(json.dumps({"run_dir": str(run), "eval_curve": EVAL}))
    return run


def _has_line_pixels(png) -> bool:
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    return bool((np.abs(pixels - LINE_RGB).sum(axis=1) < 30).sum() > 50)


def test_plot_command_writes_pngs_with_the_runs_series(tmp_path):
    run = _run_dir(tmp_path, reset_method=True)
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    plots = run / "plots"
    assert sorted(p.name for p in plots.glob("*.png")) == [
        "heldout_accuracy.png", "queues.png", "resets.png", "reward.png", "throughput.png"]
    for png in plots.glob("*.png"):
        assert png.stat().st_size > 5000 and _has_line_pixels(png), png
    assert read_plotted_series(plots / "reward.png") == {
        "learner/reward_mean": [(1.0, 0.25), (2.0, 0.375), (3.0, 0.5), (4.0, 0.5)]}
    assert read_plotted_series(plots / "throughput.png") == {
        "system/rollout_tokens_per_s": [(float(s), v) for s, v in enumerate(TOKENS_PER_S, start=1)]}
    assert list(read_plotted_series(plots / "queues.png")) == ["system/queue_depth_prompts", "learner/version_lag"]
    assert read_plotted_series(plots / "resets.png")["rollout/reset_rate"][-1] == (4.0, 1.0)
    # Held-out accuracy from the summary, by policy version.
    assert read_plotted_series(plots / "heldout_accuracy.png") == {
        "held-out accuracy": [(0.0, 0.125), (2.0, 0.25), (4.0, 0.5)]}
    assert "reward.png: learner/reward_mean" in result.output


def test_a_run_without_resets_gets_no_reset_plot(tmp_path):
    run = _run_dir(tmp_path, reset_method=False)
    written = write_plots(run, out_dir=tmp_path / "pictures")
    assert not (tmp_path / "pictures" / "resets.png").exists()
    assert str(tmp_path / "pictures" / "reward.png") in written


def test_a_summary_alone_is_enough(tmp_path):
    """No TensorBoard (tensorboard: false): the reward curve and the eval curve come from the summary."""
    run = tmp_path / "run"
    run.mkdir()
    summary = {"run_dir": str(run), "reward_curve": REWARD, "eval_curve": EVAL}
    (tmp_path / "summary.json").write_text(json.dumps(summary))  # beside RUN_DIR, as `make run` writes it
    written = write_plots(run)
    assert sorted(map(str, written)) == [str(run / "plots" / "heldout_accuracy.png"), str(run / "plots" / "reward.png")]
    assert read_plotted_series(run / "plots" / "reward.png")["reward_mean"][0] == (1.0, 0.25)


def test_a_summary_of_another_run_is_not_used(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"run_dir": str(tmp_path / "other"), "reward_curve": REWARD}))
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 1
    assert "no TensorBoard event files" in result.output and "is this a run directory?" in result.output


@pytest.mark.parametrize("args", [["plot", "/nonexistent/run"], ["plot", ".", "--summary", "/nonexistent.json"]])
def test_bad_arguments_are_explained(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "error:" in result.output
