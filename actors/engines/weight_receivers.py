"""The engine side of each weight channel (resetrl/weights/): how a rollout worker or the evaluator brings a newer
policy version into its engine, between two generation batches.

`make_weight_channel(cfg, "engine", ...)` builds the receiver of the configured channel; the worker polls
`latest()` and calls `load_into(engine, version, location)` when the version is newer than what it holds. A False
answer means that version is no longer to be had (pruned, or called off): the engine keeps its weights and asks
again later.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from resetrl.run_state import (
    ABANDON, RunKeys, called_off_weight_version, join_weight_update, record_engine_weights, wait_weight_go,
    weight_plan,
)
from resetrl.weights.base import WEIGHTS_FILE, WeightReceiver, default_weights_root
from resetrl.weights.nccl import check_group_rank
from resetrl.weights.ray_object_store import store_name_for, version_store

log = logging.getLogger(__name__)


class SharedFolderWeightReceiver(WeightReceiver):
    """The announced location is a folder on this host: the engine loads it directly."""

    def load_into(self, engine, version: int, location: str) -> bool:
        engine.load_weights(location)
        return True


class RayObjectStoreWeightReceiver(WeightReceiver):
    """Fetches a version's safetensors bytes from Ray's object store into a private folder under `root_dir` on this
    host (tmpfs), loads it and deletes it: engines load from a folder (vLLM's reload_weights)."""

    def __init__(self, root_dir: str | Path | None, redis_client, keys: RunKeys, keep: int = 2):
        super().__init__(redis_client, keys)
        self.root_dir = Path(root_dir) if root_dir is not None else default_weights_root(keys.run_name)
        self.store_name = store_name_for(keys.run_name)
        self.store = version_store(keys.run_name, keep)

    def load_into(self, engine, version: int, location: str) -> bool:
        import ray

        wrapped = ray.get(self.store.get.remote(version))
        if wrapped is None:
            log.warning("weights v%d already pruned from %s; waiting for a newer version", version, self.store_name)
            return False
        try:
            blob = ray.get(wrapped[0])
        except ray.exceptions.RayError as exc:  # its owner (a learner that died since) is gone
            log.warning("weights v%d cannot be fetched (%s); waiting for a newer version", version, exc)
            return False
        self.root_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"ray-v{version:06d}-", dir=self.root_dir))
        try:
            (folder / WEIGHTS_FILE).write_bytes(blob)
            del blob
            engine.load_weights(str(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return True


class NcclWeightReceiver(WeightReceiver):
    """Engine rank `rank` (1..world_size-1) of the nccl channel's broadcast group; the protocol is in
    resetrl/weights/nccl.py. The engine itself holds the process group (join_weight_group) and receives the
    buckets into its model (receive_weights: hf_engine.py, or vllm_weight_sync.py inside vLLM's workers)."""

    def __init__(self, redis_client, keys: RunKeys, *, rank: int, world_size: int, join_timeout_s: float = 300.0):
        check_group_rank(rank, world_size)
        super().__init__(redis_client, keys)
        self.rank = rank
        self.world_size = world_size
        self.join_timeout_s = join_timeout_s
        self._epoch: str | None = None  # the group the engine holds
        self._called_off = -1

    def load_into(self, engine, version: int, location: str) -> bool:
        if version <= self._called_off or called_off_weight_version(self.client, self.keys) == version:
            return False
        raw_plan = weight_plan(self.client, self.keys, version)
        if raw_plan is None:
            log.warning("weights v%d: no bucket plan in Redis (expired?); waiting for a newer version", version)
            return False
        plan = json.loads(raw_plan)
        join_weight_update(self.client, self.keys, version, self.rank, self._epoch or "-")
        # The learner waits join_timeout_s for the slowest engine, then answers every rank: go or abandon.
        deadline = time.monotonic() + 2 * self.join_timeout_s + 5
        answer = None
        while answer is None and time.monotonic() < deadline:
            answer = wait_weight_go(self.client, self.keys, version, self.rank, timeout_s=1)
        if answer is None:
            raise RuntimeError(f"weights v{version}: the learner neither started nor called off the broadcast within "
                               f"{2 * self.join_timeout_s:.0f} s: is the learner alive?")
        if answer == ABANDON:
            self._called_off = version
            return False
        go = json.loads(answer)
        if go["epoch"] != self._epoch:
            engine.join_weight_group(go["host"], go["port"], self.rank, go["world_size"], go["backend"],
                                     go["timeout_s"])
            self._epoch = go["epoch"]
        engine.receive_weights(plan["buckets"])
        record_engine_weights(self.client, self.keys, self.rank, version)
        return True
