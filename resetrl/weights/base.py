"""The two halves of a weight channel, and `make_weight_channel`, which builds the half a role needs.

- `WeightChannel`, the learner's half: `publish(state_dict, version)` (or `publish_module`, which gathers ZeRO-3
  partitions the way the channel needs them) after each optimizer step, `latest()`, and `export_module`, the
  final weights as safetensors bytes for RUN_DIR/final (the same for every channel).
- `WeightReceiver`, an engine's half (resetrl/actors/engines/weight_receivers.py): rollout workers and the evaluator
  poll `latest()` between generation batches and, when it is newer than what they hold, call
  `load_into(engine, version, location)`.

A channel class is registered in `WEIGHT_CHANNELS` under its `learner.weight_channel` name and builds both halves
from the run config: `for_learner(...)` itself, `for_engine(...)` its receiver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from resetrl.registry import Registry
from resetrl.run_state import RunKeys, published_weights

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


class WeightChannel(ABC):
    """The learner's half. `client` is a Redis client (resetrl.queue.connect) the announcements go through."""

    def __init__(self, client, keys: RunKeys):
        self.client = client
        self.keys = keys

    @abstractmethod
    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> str:
        """Make `state_dict` (HF parameter names) available as policy `version`; return its location."""

    def latest(self) -> tuple[int, str] | None:
        """(version, location) of the newest published weights, or None before the first publish."""
        return published_weights(self.client, self.keys)

    def publish_module(self, module: torch.nn.Module, version: int, zero_stage: int = 0, send: bool = True) -> None:
        """Publish a (DeepSpeed) module's weights. Under ZeRO-3 its partitioned parameters are gathered first, a
        collective: every data-parallel learner rank calls this, and only the one with `send` publishes."""
        gather = contextlib.nullcontext()
        if zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gather:
            if send:
                self.publish(module.state_dict(), version)

    def export_module(self, module: torch.nn.Module, version: int, zero_stage: int = 0,
                      send: bool = True) -> bytes | None:
        """A module's weights as the bytes of one safetensors file (WEIGHTS_FILE), for RUN_DIR/final: every channel
        exports the same way, whether or not it keeps its versions anywhere the driver can read (nccl keeps none).
        Collective under ZeRO-3, like publish_module; only `send` serialises."""
        from safetensors.torch import save

        gather = contextlib.nullcontext()
        if zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gather:
            if not send:
                return None
            return save(cpu_tensors(module.state_dict()), metadata={"format": "pt", "version": str(version)})

    @classmethod
    @abstractmethod
    def for_learner(cls, cfg, client, keys: RunKeys, weights_root: str | Path | None) -> "WeightChannel":
        """This channel as the learner (rank 0 of the learner group publishes; every rank builds it)."""

    @classmethod
    @abstractmethod
    def for_engine(cls, cfg, client, keys: RunKeys, weights_root: str | Path | None,
                   worker_index: int) -> "WeightReceiver":
        """The receiving half for rollout worker `worker_index` (or the evaluator, worker 0)."""


class WeightReceiver(ABC):
    """An engine's half: finds the newest announced version and brings it into the engine."""

    def __init__(self, client, keys: RunKeys):
        self.client = client
        self.keys = keys

    def latest(self) -> tuple[int, str] | None:
        """(version, location) of the newest published weights, or None before the first publish."""
        return published_weights(self.client, self.keys)

    @abstractmethod
    def load_into(self, engine, version: int, location: str) -> bool:
        """Bring version `version` (found at `location` by latest()) into `engine`; False if it is no longer to be
        had (pruned, or called off), in which case the engine keeps its weights and asks latest() again later."""


WEIGHT_CHANNELS: Registry[type[WeightChannel]] = Registry("weight channel", "learner.weight_channel")


def make_weight_channel(cfg, role: str, redis_client, keys: RunKeys, weights_root: str | Path | None,
                        *, worker_index: int = 0) -> WeightChannel | WeightReceiver:
    """The half of the channel `cfg.learner.weight_channel` names that `role` uses: "learner" (a WeightChannel)
    or "engine" (rollout worker `worker_index`'s WeightReceiver; rank 1 + worker_index of the nccl group)."""
    if role not in ("learner", "engine"):
        raise ValueError(f"role {role!r}: use 'learner' or 'engine'")
    channel = WEIGHT_CHANNELS.get(cfg.learner.weight_channel)
    if role == "learner":
        return channel.for_learner(cfg, redis_client, keys, weights_root)
    return channel.for_engine(cfg, redis_client, keys, weights_root, worker_index)


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


def cpu_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a safetensors file of `state_dict` holds: each tensor once (unique_tensors), contiguous, on the CPU."""
    return {name: t.detach().to("cpu").contiguous() for name, t in unique_tensors(state_dict).items()}
