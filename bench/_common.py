"""What every bench/ script shares: one-thread torch, config loading, repeat statistics, and the results folder.

Rules (docs/benchmarks.md): a figure is a ratio against a baseline measured in the same run (baseline and
system interleaved, alternating which goes first), reported as median and min/max over >= 3 repeats, with the
absolute numbers and the machine. Each script prints one JSON object and writes it, plus a PNG, to
bench/results/<name>/.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# One torch thread: on 2 shared cores two threads make generation and training 5-20x slower (tests/conftest.py).
# Set before torch is imported; an explicit OMP_NUM_THREADS in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TINY = REPO / "configs" / "tiny.yaml"


def load_cfg(preset: str | Path = TINY, overrides: list[str] | tuple[str, ...] = ()):
    from resetrl.config import load_config

    return load_config(preset, list(overrides))


def stats(values: list[float]) -> dict:
    """median, min, max and the values themselves (rounded for reading)."""
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "values": [round(v, 4) for v in values],
    }


def interleaved(repeats: int, baseline, system) -> list[tuple[dict, dict]]:
    """Run baseline() and system() `repeats` times each, alternating which goes first, so drift in the machine's
    load hits both alike. Each callable returns a dict of measurements; returns [(baseline, system), ...]."""
    pairs = []
    for rep in range(repeats):
        if rep % 2 == 0:
            b = baseline()
            s = system()
        else:
            s = system()
            b = baseline()
        pairs.append((b, s))
        print(f"  repeat {rep + 1}/{repeats}: baseline {_short(b)} | system {_short(s)}", file=sys.stderr, flush=True)
    return pairs


def _short(measure: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in measure.items())


def machine() -> dict:
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx2": " avx2" in flags,
        "avx512f": " avx512f" in flags,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_results(name: str, result: dict, figure=None) -> Path:
    """bench/results/<name>/<name>.json (+ .png), and the JSON on stdout."""
    out = RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "command": "python " + " ".join(sys.argv), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    if figure is not None:
        png = out / f"{name}.png"
        figure.savefig(png, dpi=110, bbox_inches="tight")
        result["plot"] = str(png.relative_to(REPO))
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return out


def ratio_bars(ax, labels: list[str], ratio_stats: list[dict], goal: float | None, title: str) -> None:
    """Median ratio bars with min/max whiskers and the goal line."""
    medians = [s["median"] for s in ratio_stats]
    low = [s["median"] - s["min"] for s in ratio_stats]
    high = [s["max"] - s["median"] for s in ratio_stats]
    ax.bar(labels, medians, yerr=[low, high], capsize=6, color="#4C72B0")
    if goal is not None:
        ax.axhline(goal, color="#C44E52", linestyle="--", label=f"goal {goal}")
        ax.legend()
    for i, m in enumerate(medians):
        ax.text(i, m, f"{m:.3f}", ha="center", va="bottom")
    ax.set_title(title)
