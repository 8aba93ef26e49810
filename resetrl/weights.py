"""The weight channel: how the learner hands policy version v to the rollout engines.

`WeightChannel` is the interface; the learner calls `publish(state_dict, version)` after each optimizer step and
engines poll `latest()` between generation batches and pass the location to their `load_weights(location)`.
`SharedFolderWeightChannel` is the CPU / single-host implementation: a safetensors file per version in a shared
folder (tmpfs at /dev/shm when it exists), announced through Redis. An NCCL broadcast from learner rank 0 to the
engine workers (DESIGN.md) implements the same two methods.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import redis
import torch
from safetensors.torch import save_file

from resetrl.run_state import RunKeys

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


class WeightChannel(ABC):
    @abstractmethod
    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> str:
        """Make `state_dict` (HF parameter names) available as policy `version`; return its location."""

    @abstractmethod
    def latest(self) -> tuple[int, str] | None:
        """(version, location) of the newest published weights, or None before the first publish."""


def default_weights_root(run_name: str) -> Path:
    """tmpfs when the host has one: a version is written and read once per step, never needed after a reboot."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"resetrl-{run_name}"


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names that alias a tensor already kept (tied weights): safetensors refuses shared storage.

    For a tied `lm_head.weight` the embedding is kept and the head dropped, as HF's save_pretrained does; HF
    re-ties it on load and vLLM's loaders skip `lm_head.weight` when `tie_word_embeddings` is set.
    """
    seen: dict[tuple, str] = {}
    kept: set[str] = set()
    # Names of the head come last, so a tie between head and embedding always keeps the embedding.
    for name in sorted(state_dict, key=lambda n: n.startswith("lm_head.")):
        tensor = state_dict[name]
        alias = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tensor.dtype)
        if tensor.numel() and alias in seen:
            log.debug("not writing %s: it is tied to %s", name, seen[alias])
            continue
        seen[alias] = name
        kept.add(name)
    return {name: tensor for name, tensor in state_dict.items() if name in kept}


class SharedFolderWeightChannel(WeightChannel):
    """Versions as `root_dir/v{version:06d}/model.safetensors`; Redis hash keys.weights = {version, path}.

    A version folder appears complete or not at all (written under a temporary name in root_dir, then renamed),
    and only the newest `keep` versions are kept on disk. `keep` must outlast the slowest engine's load: an engine
    that lags more versions than that behind would find its folder gone (it then simply asks latest() again).
    """

    def __init__(self, root_dir: str | Path | None, redis_client: redis.Redis, keys: RunKeys, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (got {keep})")
        self.root_dir = Path(root_dir) if root_dir is not None else default_weights_root(keys.run_name)
        self.client = redis_client
        self.keys = keys
        self.keep = keep

    def version_dir(self, version: int) -> Path:
        return self.root_dir / f"v{version:06d}"

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> str:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        final = self.version_dir(version)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in unique_tensors(state_dict).items()}
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root_dir))
        try:
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "version": str(version)})
            if final.exists():  # re-publishing a version (a learner restarted from a checkpoint)
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.weights, mapping={"version": version, "path": str(final)})
        pipe.set(self.keys.learner_version, version)
        pipe.execute()
        self._prune(newest=version)
        return str(final)

    def latest(self) -> tuple[int, str] | None:
        raw = self.client.hgetall(self.keys.weights)
        if not raw:
            return None
        return int(raw[b"version"]), raw[b"path"].decode()

    def _prune(self, newest: int) -> None:
        versions = []
        for child in self.root_dir.iterdir():
            match = _VERSION_DIR.match(child.name)
            if match and int(match.group(1)) <= newest:
                versions.append(int(match.group(1)))
        for old in sorted(versions)[: -self.keep]:
            shutil.rmtree(self.version_dir(old), ignore_errors=True)
