"""Weight channels: how the learner hands policy version v to the rollout engines (`learner.weight_channel`).

- shared_folder.py (one host): a safetensors file per version in /dev/shm, announced through Redis.
- ray_object_store.py (CPU nodes without NCCL): the safetensors bytes in Ray's object store, refs in a detached actor.
- nccl.py (GPUs): a bucketed broadcast (buckets.py) from learner rank 0 to every engine over a group of their own.

base.py holds the two halves' interfaces (WeightChannel for the learner, WeightReceiver for an engine) and
`make_weight_channel`; the receivers live beside the engines, in resetrl/actors/engines/weight_receivers.py.
No channel unpickles anything: Redis carries JSON and integers, tensors travel as safetensors bytes or raw buffers.
"""

from resetrl.weights.base import (
    WEIGHT_CHANNELS, WEIGHTS_FILE, WeightChannel, WeightReceiver, default_weights_root, make_weight_channel,
    unique_tensors,
)
from resetrl.weights.nccl import NcclWeightChannel
from resetrl.weights.ray_object_store import RayObjectStoreWeightChannel
from resetrl.weights.shared_folder import SharedFolderWeightChannel

__all__ = [
    "WEIGHT_CHANNELS", "WEIGHTS_FILE", "NcclWeightChannel", "RayObjectStoreWeightChannel", "SharedFolderWeightChannel",
    "WeightChannel", "WeightReceiver", "default_weights_root", "make_weight_channel", "unique_tensors",
]
