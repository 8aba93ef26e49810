"""Learner checkpoints: everything a resumed learner needs to continue exactly, written atomically.

A checkpoint is the folder `RUN_DIR/checkpoints/step-{step:08d}/`:
    state/                DeepSpeed's own files: model, optimizer (ZeRO partitions), its step counters
    learner_state.json    policy version, the ids of every record trained (dedupe on replay), the learner's
                          counters at that step, trained prompt ids
    rng.safetensors       torch (and CUDA) RNG states, NumPy's and Python's state vectors
    rng.json              the scalar parts of the NumPy and Python RNG states
    rng-rank{r}.*         the same for rank r > 0 of a multi-rank learner
It is written under a temporary name in the same folder and renamed when complete (a rename is atomic on one
file system), so a learner killed mid-write leaves a `.tmp-*` folder that is ignored and removed later, never a
half checkpoint that `latest_checkpoint` would pick. Only the newest `keep` checkpoints are kept.

A multi-rank learner (learner.world_size > 1) calls save_checkpoint / load_checkpoint on every rank: DeepSpeed
writes each rank's ZeRO partition into the one staging folder, which therefore has a name every rank knows
(`.tmp-step-N`, not a random one) and must be on a file system every rank sees (one node: any local path). Rank 0
alone writes learner_state.json, renames and prunes; barriers keep the ranks in step around it.

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
import torch.distributed as dist
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d{8})$")
ENGINE_TAG = "state"
RNG_TENSORS, RNG_SCALARS = "rng.safetensors", "rng.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [int(m.group(1)) for child in root.iterdir() if (m := _STEP_DIR.match(child.name)) and child.is_dir()]
    return checkpoint_dir(root, max(steps)) if steps else None


def _rng_names(rank: int) -> tuple[str, str]:
    if rank == 0:
        return RNG_TENSORS, RNG_SCALARS  # the single-rank names, so older checkpoints stay readable
    return f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def save_rng_state(folder: Path, rank: int = 0) -> None:
    """RNG states as safetensors (the state tensors) + JSON (the scalars): no pickle, even for our own files."""
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(numpy_keys, dtype=np.uint32).astype(np.int64)),
        "python_internal": torch.tensor(python_internal, dtype=torch.int64),
    }
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    tensors_name, scalars_name = _rng_names(rank)
    save_file(tensors, str(folder / tensors_name))
    scalars = {"numpy": [numpy_kind, int(numpy_pos), int(numpy_has_gauss), float(numpy_gauss)],
               "python": [python_version, python_gauss]}
    (folder / scalars_name).write_text(json.dumps(scalars))


def load_rng_state(folder: Path, rank: int = 0) -> None:
    tensors_name, scalars_name = _rng_names(rank)
    tensors = load_file(str(folder / tensors_name))
    scalars = json.loads((folder / scalars_name).read_text())
    python_version, python_gauss = scalars["python"]
    random.setstate((python_version, tuple(tensors["python_internal"].tolist()), python_gauss))
    numpy_kind, numpy_pos, numpy_has_gauss, numpy_gauss = scalars["numpy"]
    np.random.set_state((numpy_kind, tensors["numpy_keys"].numpy().astype(np.uint32), numpy_pos, numpy_has_gauss,
                         numpy_gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(sum(name.startswith("cuda_") for name in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(engine, root: str | Path, step: int, learner_state: dict | None, keep: int = 2) -> Path:
    """Write model + optimizer (DeepSpeed), learner_state and RNG states as checkpoint `step`; return its folder.

    With several ranks every rank calls it; learner_state is rank 0's (the others pass None)."""
    root = Path(root)
    final = checkpoint_dir(root, step)
    rank, world_size = _rank(), _world_size()
    if world_size > 1:
        return _save_checkpoint_ranks(engine, root, final, learner_state, keep, rank)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        engine.save_checkpoint(str(staging), tag=ENGINE_TAG, save_latest=False)
        save_rng_state(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _promote(staging, final, learner_state)
    _prune(root, keep)
    return final


def _promote(staging: Path, final: Path, learner_state: dict | None) -> None:
    """Add learner_state and make the staged folder checkpoint `final`, atomically (fsynced, then renamed)."""
    try:
        (staging / "learner_state.json").write_text(json.dumps(learner_state))
        _fsync_tree(staging)
        if final.exists():  # the same step written again (a resumed learner re-reaching it)
            shutil.rmtree(final)
        staging.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_checkpoint_ranks(engine, root: Path, final: Path, learner_state: dict | None, keep: int, rank: int) -> Path:
    staging = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a learner that died writing this step
        staging.mkdir()
    dist.barrier()
    engine.save_checkpoint(str(staging), tag=ENGINE_TAG, save_latest=False)
    save_rng_state(staging, rank)
    dist.barrier()  # every rank's partition is on disk before rank 0 makes the folder a checkpoint
    if rank == 0:
        _promote(staging, final, learner_state)
        _prune(root, keep)
    dist.barrier()  # no rank goes on (to a load, to the next save) before the rename
    return final


def load_checkpoint(engine, path: str | Path) -> dict:
    """Restore model, optimizer and RNG states from checkpoint folder `path`; return its learner_state.

    With several ranks every rank calls it and restores its own ZeRO partition and RNG states."""
    path = Path(path)
    state = json.loads((path / "learner_state.json").read_text())
    saved_ranks, ranks = int(state.get("world_size", 1)), _world_size()
    if saved_ranks != ranks:
        # ZeRO partitions the optimizer state by rank: a different rank count cannot load it as written.
        raise RuntimeError(
            f"the checkpoint in {path} was written by a learner with world_size {saved_ranks}; this one has "
            f"{ranks}: resume with learner.world_size={saved_ranks}"
        )
    loaded, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    load_rng_state(path, _rank())
    return state


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
