"""learner.weight_channel = nccl (GPUs): learner rank 0 broadcasts bucketed parameters to every engine over a
process group of their own (buckets.py beside this). A broadcast is a collective, so the protocol is:
  1. the learner plans the buckets (names, shapes, dtypes, offsets), stores that plan for version v in Redis and
     announces v (the `weights` hash, as the other channels do);
  2. each engine, between two generation batches, sees v, joins: adds its rank to the version's ready set, and
     waits for the learner's go (its receiver: resetrl/actors/engines/weight_receivers.py);
  3. once every engine rank is ready the learner says go and broadcasts bucket by bucket (ZeRO-3: gathering
     only that bucket's parameters); the engines receive into their model; each records the version it holds.
So the learner's publish blocks until every engine has finished its current batch; the engines are never more
than one version behind the learner. If some engine does not join within `learner.weight_join_timeout_s` or
the run is stopping, the learner calls the update off ("abandon": nobody broadcasts, engines keep their
weights, counted as weight_updates_abandoned) and the next version goes out as usual. The group is fixed-size
(1 + rollout.num_workers ranks, one per engine, vLLM tensor parallel size 1): an engine that Ray restarts cannot
rejoin it; use ray_object_store for elastic workers. On CPU hosts the same protocol runs over gloo (tests).
The Redis side of the handshake (keys, TTLs) is in resetrl/run_state.py. Nothing is pickled: Redis carries JSON
and integers, tensors travel as raw buffers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid

import torch

from resetrl.net import free_port, routable_ip
from resetrl.run_state import (
    ABANDON, RunKeys, announce_weights, call_off_weight_update, incr_stats, next_ready_engine, post_weight_plan,
    send_weight_go, stop_requested,
)
from resetrl.weights.base import WEIGHT_CHANNELS, WeightChannel, unique_tensors
from resetrl.weights.buckets import broadcast_bucket, open_group, open_store, pack_bucket, plan_buckets

log = logging.getLogger(__name__)


def check_group_rank(rank: int, world_size: int) -> None:
    if world_size < 2:
        raise ValueError(f"world_size {world_size}: the group needs the learner and at least one engine")
    if not 0 <= rank < world_size:
        raise ValueError(
            f"engine rank {rank} is outside the weight group of {world_size} ranks (1 + rollout.num_workers): "
            "the nccl channel has a fixed rank per rollout worker; elastic workers beyond rollout.num_workers "
            "need learner.weight_channel=ray_object_store"
        )


def _module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What state_dict() would hold, without gathering: parameters once each (a tied head is left out, as in
    unique_tensors) and persistent buffers. Under ZeRO-3 the parameters are still partitioned here."""
    persistent = set(module.state_dict().keys())
    tensors = dict(module.named_parameters())
    tensors.update((name, b) for name, b in module.named_buffers() if name in persistent)
    return tensors


@WEIGHT_CHANNELS.register("nccl")
class NcclWeightChannel(WeightChannel):
    """The learner's side (rank 0) of the bucketed broadcast; the protocol is in this module's docstring."""

    def __init__(self, redis_client, keys: RunKeys, *, rank: int, world_size: int,
                 bucket_bytes: int = 256 * 2**20, join_timeout_s: float = 300.0, backend: str | None = None,
                 host: str | None = None):
        check_group_rank(rank, world_size)
        super().__init__(redis_client, keys)
        self.rank = rank
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.join_timeout_s = join_timeout_s
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.host = host
        self._group = None  # the process group, built at the first go
        self._store = None  # the group's rendezvous, hosted here
        self._address: dict = {}
        self._epoch: str | None = None  # the group the engines must hold; a new one when any does not

    @classmethod
    def for_learner(cls, cfg, client, keys: RunKeys, weights_root) -> "NcclWeightChannel":
        return cls(client, keys, rank=0, world_size=1 + cfg.rollout.num_workers,
                   bucket_bytes=int(cfg.learner.weight_bucket_mb * 2**20),
                   join_timeout_s=cfg.learner.weight_join_timeout_s)

    @classmethod
    def for_engine(cls, cfg, client, keys: RunKeys, weights_root, worker_index: int):
        from resetrl.actors.engines.weight_receivers import NcclWeightReceiver

        return NcclWeightReceiver(client, keys, rank=1 + worker_index, world_size=1 + cfg.rollout.num_workers,
                                  join_timeout_s=cfg.learner.weight_join_timeout_s)

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> str:
        return self._send(unique_tensors(state_dict), version, zero3=False, send=True)

    def publish_module(self, module: torch.nn.Module, version: int, zero_stage: int = 0, send: bool = True) -> None:
        self._send(_module_tensors(module), version, zero3=zero_stage == 3, send=send)

    def _send(self, tensors: dict[str, torch.Tensor], version: int, zero3: bool, send: bool) -> str:
        """Plan, announce, wait for the engines, then gather and broadcast bucket by bucket. Every data-parallel
        learner rank runs the bucket loop (ZeRO-3 gathers are collectives of theirs); only `send` talks to Redis
        and broadcasts, and only when the engines joined."""
        if send and self.rank != 0:
            raise RuntimeError("only the learner (rank 0 of the weight group) publishes weights")
        entries = [(name, tuple(getattr(t, "ds_shape", t.shape)), t.dtype) for name, t in tensors.items()]
        buckets = plan_buckets(entries, self.bucket_bytes)
        total = sum(spec.nbytes for bucket in buckets for spec in bucket)
        location = f"{self.backend}://rank0/v{version:06d}"
        broadcasting = False
        if send:
            plan = {"version": version, "bytes": total, "buckets": [[s.to_json() for s in b] for b in buckets]}
            post_weight_plan(self.client, self.keys, version, json.dumps(plan))
            announce_weights(self.client, self.keys, version, location)
            joined = self._wait_for_engines(version)
            broadcasting = joined is not None
        started = time.perf_counter()
        if broadcasting:
            go = self._go_message(joined)
            for rank in range(1, self.world_size):
                send_weight_go(self.client, self.keys, version, rank, go)
            if self._group is None:
                self._group = open_group(self._store, 0, self.world_size, self.backend, self.join_timeout_s)
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        for bucket in buckets:
            params = [tensors[spec.name] for spec in bucket]
            gather = contextlib.nullcontext()
            if zero3:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")],
                                                           modifier_rank=None)
            with gather:
                if broadcasting:
                    broadcast_bucket(self._group, pack_bucket(bucket, params, device))
        if broadcasting:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the broadcast is only enqueued; the seconds count its transfer
            incr_stats(self.client, self.keys, weight_syncs=1, weight_sync_seconds=time.perf_counter() - started,
                       weight_sync_bytes=total)
        return location

    def _wait_for_engines(self, version: int) -> dict[int, str] | None:
        """{rank: epoch it holds} once every engine is ready for `version`; None (after calling it off) when some
        engine is not ready within join_timeout_s or the run is stopping."""
        ready: dict[int, str] = {}
        deadline = time.monotonic() + self.join_timeout_s
        while len(ready) < self.world_size - 1:
            if stop_requested(self.client, self.keys) or time.monotonic() >= deadline:
                missing = sorted(set(range(1, self.world_size)) - set(ready))
                reason = "the run is stopping" if stop_requested(self.client, self.keys) else \
                    f"engine ranks {missing} did not join within learner.weight_join_timeout_s={self.join_timeout_s}"
                log.warning("weights v%d not broadcast: %s; engines keep their weights", version, reason)
                call_off_weight_update(self.client, self.keys, version)
                for rank in range(1, self.world_size):
                    send_weight_go(self.client, self.keys, version, rank, ABANDON)
                incr_stats(self.client, self.keys, weight_updates_abandoned=1)
                return None
            joined = next_ready_engine(self.client, self.keys, version, timeout_s=1)
            if joined is not None:
                rank, epoch = joined
                ready[rank] = epoch
        return ready

    def _go_message(self, joined: dict[int, str]) -> str:
        """Go, with the group's address; a new group (new epoch) when any engine does not hold the current one
        (the first update, or a restarted engine): every rank then builds it afresh."""
        if self._group is None or any(epoch != self._epoch for epoch in joined.values()):
            host = self.host or routable_ip()
            port = free_port(host="")  # the engines connect from other hosts: listen on every interface
            self._group = None
            self._epoch = uuid.uuid4().hex[:12]
            self._store = open_store(host, port, 0, self.world_size, self.join_timeout_s)
            self._address = {"host": host, "port": port}
        return json.dumps({"epoch": self._epoch, "world_size": self.world_size, "backend": self.backend,
                           "timeout_s": self.join_timeout_s, **self._address})
