"""Learner checkpoints: everything a resumed learner needs to continue exactly, written atomically.

A checkpoint is the folder `RUN_DIR/checkpoints/step-{step:08d}/`:
    state/                DeepSpeed's own files: model, optimizer (ZeRO partitions), its step counters
    learner_state.json    policy version, the ids of every record trained (dedupe on replay), the learner's
                          counters at that step, trained prompt ids
    rng.pt                Python, NumPy, torch (and CUDA) RNG states
It is written under a temporary name in the same folder and renamed when complete (a rename is atomic on one
file system), so a learner killed mid-write leaves a `.tmp-*` folder that is ignored and removed later, never a
half checkpoint that `latest_checkpoint` would pick. Only the newest `keep` checkpoints are kept.

The checkpoint files are this run's own files, read back by the same run; nothing here comes from Redis or Ray.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d{8})$")
ENGINE_TAG = "state"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [int(m.group(1)) for child in root.iterdir() if (m := _STEP_DIR.match(child.name)) and child.is_dir()]
    return checkpoint_dir(root, max(steps)) if steps else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, root: str | Path, step: int, learner_state: dict, keep: int = 2) -> Path:
    """Write model + optimizer (DeepSpeed), learner_state and RNG states as checkpoint `step`; return its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        engine.save_checkpoint(str(staging), tag=ENGINE_TAG, save_latest=False)
        (staging / "learner_state.json").write_text(json.dumps(learner_state))
        torch.save(rng_state(), staging / "rng.pt")
        _fsync_tree(staging)
        if final.exists():  # the same step written again (a resumed learner re-reaching it)
            shutil.rmtree(final)
        staging.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def load_checkpoint(engine, path: str | Path) -> dict:
    """Restore model, optimizer and RNG states from checkpoint folder `path`; return its learner_state."""
    path = Path(path)
    loaded, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    # Our own file, written by save_checkpoint above (RNG states hold NumPy arrays and tuples).
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "learner_state.json").read_text())


def _prune(root: Path, keep: int) -> None:
    steps = sorted(int(m.group(1)) for child in root.iterdir() if (m := _STEP_DIR.match(child.name)))
    for old in steps[: -max(keep, 1)]:
        shutil.rmtree(checkpoint_dir(root, old), ignore_errors=True)
    for child in root.iterdir():  # staging folders of a learner that died mid-write
        if child.name.startswith(".tmp-"):
            shutil.rmtree(child, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
