"""learner.weight_channel = ray_object_store (CPU nodes without NCCL): the safetensors bytes `ray.put` once per
version; a small named detached actor keeps the newest refs (an ObjectRef cannot travel through Redis); each engine
fetches the bytes into its own host's tmpfs folder and `load_weights(folder)` (its receiver:
resetrl/actors/engines/weight_receivers.py)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from resetrl.run_state import RunKeys, announce_weights, incr_stats
from resetrl.weights.base import WEIGHT_CHANNELS, WeightChannel, cpu_tensors, default_weights_root

NAMESPACE = "resetrl"


class _VersionRefs:
    """The newest `keep` (version -> ObjectRef) pairs, in a named detached actor: refs cannot travel through Redis.

    Holding a ref keeps its object alive after the learner drops its own. The learner that ray.put the bytes owns
    them (Ray 2.56 removed ray.put's _owner): if it dies they are gone, and the restarted learner publishes anew.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self.refs: dict = {}

    def put(self, version: int, wrapped_ref: list) -> None:  # wrapped in a list so Ray passes the ref, not the bytes
        self.refs[version] = wrapped_ref[0]
        for old in sorted(self.refs)[: -self.keep]:
            del self.refs[old]

    def get(self, version: int) -> list | None:
        ref = self.refs.get(version)
        return None if ref is None else [ref]


def store_name_for(run_name: str) -> str:
    """The detached actor's name (the driver kills it at the end of the run)."""
    return f"resetrl-weights-{run_name}"


def version_store(run_name: str, keep: int):
    """The run's store actor, created by whichever side asks first (learner or engine) and shared after that."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("learner.weight_channel = ray_object_store needs Ray: call ray.init() first "
                           "(the driver does) or use weight_channel=shared_folder")
    return (
        ray.remote(_VersionRefs)
        .options(name=store_name_for(run_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                 num_cpus=0)
        .remote(keep)
    )


@WEIGHT_CHANNELS.register("ray_object_store")
class RayObjectStoreWeightChannel(WeightChannel):
    """Versions as safetensors bytes in Ray's object store, one `ray.put` per version; Redis announces the version.

    Across nodes without NCCL: Ray moves the bytes to each engine's node once (its object store caches them for the
    other engines there). safetensors bytes, not pickled tensors: nothing is unpickled on the way.
    """

    NAMESPACE = NAMESPACE
    store_name_for = staticmethod(store_name_for)

    def __init__(self, root_dir: str | Path | None, redis_client, keys: RunKeys, keep: int = 2):
        super().__init__(redis_client, keys)
        self.root_dir = Path(root_dir) if root_dir is not None else default_weights_root(keys.run_name)
        self.store_name = store_name_for(keys.run_name)
        self.store = version_store(keys.run_name, keep)

    @classmethod
    def for_learner(cls, cfg, client, keys: RunKeys, weights_root) -> "RayObjectStoreWeightChannel":
        return cls(weights_root, client, keys)

    @classmethod
    def for_engine(cls, cfg, client, keys: RunKeys, weights_root, worker_index: int):
        from resetrl.actors.engines.weight_receivers import RayObjectStoreWeightReceiver

        return RayObjectStoreWeightReceiver(weights_root, client, keys)

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> str:
        import ray
        from safetensors.torch import save

        started = time.perf_counter()
        blob = save(cpu_tensors(state_dict), metadata={"format": "pt", "version": str(version)})
        ray.get(self.store.put.remote(version, [ray.put(blob)]))
        location = f"ray://{NAMESPACE}/{self.store_name}/v{version:06d}"
        announce_weights(self.client, self.keys, version, location)
        incr_stats(self.client, self.keys, weight_syncs=1, weight_sync_seconds=time.perf_counter() - started,
                   weight_sync_bytes=len(blob))
        return location

    def close(self) -> None:
        """End the detached store actor (the driver's cleanup; it outlives the learner on purpose)."""
        import ray

        ray.kill(self.store, no_restart=True)
