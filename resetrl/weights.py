"""The weight channel: how the learner hands policy version v to the rollout engines.

`WeightChannel` is the interface. The learner calls `publish(state_dict, version)` (or `publish_module`, which
gathers ZeRO-3 partitions the way the channel needs them) after each optimizer step; engines poll `latest()`
between generation batches and, when it is newer than what they hold, call `load_into(engine, version, location)`.
`make_weight_channel` builds the one `learner.weight_channel` names:

- `SharedFolderWeightChannel` ("shared_folder", single host): a safetensors file per version in a shared folder
  (tmpfs at /dev/shm when it exists), announced through Redis; engines `load_weights(folder)`.
- `RayObjectStoreWeightChannel` ("ray_object_store", CPU nodes without NCCL): the safetensors bytes `ray.put` once
  per version; a small named detached actor keeps the newest refs (an ObjectRef cannot travel through Redis);
  each engine fetches the bytes into its own host's tmpfs folder and `load_weights(folder)`.
- `NcclWeightChannel` ("nccl", GPUs): learner rank 0 broadcasts bucketed parameters to every engine worker over a
  process group of their own (resetrl/weight_buckets.py). A broadcast is a collective, so the protocol is:
    1. the learner plans the buckets (names, shapes, dtypes, offsets), stores that plan for version v in Redis and
       announces v (the `weights` hash, as the other channels do);
    2. each engine, between two generation batches, sees v, joins: adds its rank to the version's ready set, and
       waits for the learner's go;
    3. once every engine rank is ready the learner says go and broadcasts bucket by bucket (ZeRO-3: gathering
       only that bucket's parameters); the engines receive into their model; each records the version it holds.
  So the learner's publish blocks until every engine has finished its current batch; the engines are never more
  than one version behind the learner. If some engine does not join within `learner.weight_join_timeout_s` or
  the run is stopping, the learner calls the update off ("abandon": nobody broadcasts, engines keep their
  weights, counted as weight_updates_abandoned) and the next version goes out as usual. The group is fixed-size
  (1 + rollout.num_workers ranks, one per engine, vLLM tensor parallel size 1): an engine that Ray restarts cannot
  rejoin it; use ray_object_store for elastic workers. On CPU hosts the same protocol runs over gloo (tests).
No channel unpickles anything: Redis carries JSON and integers, tensors travel as safetensors bytes or raw buffers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

import redis
import torch
from safetensors.torch import save_file

from resetrl.run_state import RunKeys, incr_stats, stop_requested
from resetrl.weight_buckets import broadcast_bucket, open_group, open_store, pack_bucket, plan_buckets

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

    def load_into(self, engine, version: int, location: str) -> bool:
        """Bring version `version` (found at `location` by latest()) into `engine`; False if it is no longer to be
        had (pruned, or called off), in which case the engine keeps its weights and asks latest() again later."""
        engine.load_weights(location)
        return True


def _announce(client: redis.Redis, keys: RunKeys, version: int, location: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.weights, mapping={"version": version, "path": location})
    pipe.set(keys.learner_version, version)
    pipe.execute()


def _announced(client: redis.Redis, keys: RunKeys) -> tuple[int, str] | None:
    raw = client.hgetall(keys.weights)
    if not raw:
        return None
    return int(raw[b"version"]), raw[b"path"].decode()


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
        _announce(self.client, self.keys, version, str(final))
        self._prune(newest=version)
        return str(final)

    def latest(self) -> tuple[int, str] | None:
        return _announced(self.client, self.keys)

    def _prune(self, newest: int) -> None:
        versions = []
        for child in self.root_dir.iterdir():
            match = _VERSION_DIR.match(child.name)
            if match and int(match.group(1)) <= newest:
                versions.append(int(match.group(1)))
        for old in sorted(versions)[: -self.keep]:
            shutil.rmtree(self.version_dir(old), ignore_errors=True)


# ------------------------------------------------------------------------------------------- Ray object store


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


class RayObjectStoreWeightChannel(WeightChannel):
    """Versions as safetensors bytes in Ray's object store, one `ray.put` per version; Redis announces the version.

    Across nodes without NCCL: Ray moves the bytes to each engine's node once (its object store caches them for the
    other engines there). Engines write the bytes to a private folder under `root_dir` on their own host (tmpfs),
    load it and delete it: engines load from a folder (vLLM's reload_weights). safetensors bytes, not pickled
    tensors: nothing is unpickled on the way (DESIGN.md).
    """

    NAMESPACE = "resetrl"

    @staticmethod
    def store_name_for(run_name: str) -> str:
        """The detached actor's name (the driver kills it at the end of the run)."""
        return f"resetrl-weights-{run_name}"

    def __init__(self, root_dir: str | Path | None, redis_client: redis.Redis, keys: RunKeys, keep: int = 2):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("learner.weight_channel = ray_object_store needs Ray: call ray.init() first "
                               "(the driver does) or use weight_channel=shared_folder")
        self.root_dir = Path(root_dir) if root_dir is not None else default_weights_root(keys.run_name)
        self.client = redis_client
        self.keys = keys
        self.store_name = self.store_name_for(keys.run_name)
        self.store = (
            ray.remote(_VersionRefs)
            .options(name=self.store_name, namespace=self.NAMESPACE, lifetime="detached", get_if_exists=True,
                     num_cpus=0)
            .remote(keep)
        )

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> str:
        import ray
        from safetensors.torch import save

        started = time.perf_counter()
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in unique_tensors(state_dict).items()}
        blob = save(tensors, metadata={"format": "pt", "version": str(version)})
        ray.get(self.store.put.remote(version, [ray.put(blob)]))
        location = f"ray://{self.NAMESPACE}/{self.store_name}/v{version:06d}"
        _announce(self.client, self.keys, version, location)
        incr_stats(self.client, self.keys, weight_syncs=1, weight_sync_seconds=time.perf_counter() - started,
                   weight_sync_bytes=len(blob))
        return location

    def latest(self) -> tuple[int, str] | None:
        return _announced(self.client, self.keys)

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

    def close(self) -> None:
        """End the detached store actor (the driver's cleanup; it outlives the learner on purpose)."""
        import ray

        ray.kill(self.store, no_restart=True)


# ------------------------------------------------------------------------------------------------------ NCCL


def _routable_ip() -> str:
    """This host's address as the other nodes see it: Ray's node address when Ray runs, else the source address
    of the default route (nothing is sent), else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("10.255.255.255", 1))
        return sock.getsockname()[0]
    return "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What state_dict() would hold, without gathering: parameters once each (a tied head is left out, as in
    unique_tensors) and persistent buffers. Under ZeRO-3 the parameters are still partitioned here."""
    persistent = set(module.state_dict().keys())
    tensors = dict(module.named_parameters())
    tensors.update((name, b) for name, b in module.named_buffers() if name in persistent)
    return tensors


class NcclWeightChannel(WeightChannel):
    """Bucketed broadcast from learner rank 0 to the engine ranks; the protocol is in this module's docstring.

    Redis keys, under keys.weights: `:update:{v}` the bucket plan (JSON), `:ready:{v}` a list the engines push
    "rank epoch" to, `:go:{v}:{rank}` a list the learner pushes each engine's go (JSON: the group's address and
    epoch) or "abandon" to, `:called_off` the newest abandoned version, `:engines` a hash rank -> version held.
    """

    _KEY_TTL_S = 3600  # per-version keys outlive any join; then Redis drops them

    def __init__(self, redis_client: redis.Redis, keys: RunKeys, *, rank: int, world_size: int,
                 bucket_bytes: int = 256 * 2**20, join_timeout_s: float = 300.0, backend: str | None = None,
                 host: str | None = None):
        if world_size < 2:
            raise ValueError(f"world_size {world_size}: the group needs the learner and at least one engine")
        if not 0 <= rank < world_size:
            raise ValueError(
                f"engine rank {rank} is outside the weight group of {world_size} ranks (1 + rollout.num_workers): "
                "the nccl channel has a fixed rank per rollout worker; elastic workers beyond rollout.num_workers "
                "need learner.weight_channel=ray_object_store"
            )
        self.client = redis_client
        self.keys = keys
        self.rank = rank
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.join_timeout_s = join_timeout_s
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.host = host
        self._group = None  # learner side: the process group, built at the first go
        self._store = None  # learner side: the group's rendezvous, hosted here
        self._address: dict = {}
        self._epoch: str | None = None  # the group this side belongs to (engine side: the engine holds the group)
        self._called_off = -1

    def _key(self, *parts) -> str:
        return ":".join([self.keys.weights, *map(str, parts)])

    # ---- learner side (rank 0)

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
            self.client.set(self._key("update", version), json.dumps(plan), ex=self._KEY_TTL_S)
            _announce(self.client, self.keys, version, location)
            joined = self._wait_for_engines(version)
            broadcasting = joined is not None
        started = time.perf_counter()
        if broadcasting:
            go = self._go_message(joined)
            for rank in range(1, self.world_size):
                self.client.rpush(self._key("go", version, rank), go)
                self.client.expire(self._key("go", version, rank), self._KEY_TTL_S)
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
                self.client.set(self._key("called_off"), version)
                for rank in range(1, self.world_size):
                    self.client.rpush(self._key("go", version, rank), "abandon")
                    self.client.expire(self._key("go", version, rank), self._KEY_TTL_S)
                incr_stats(self.client, self.keys, weight_updates_abandoned=1)
                return None
            popped = self.client.blpop([self._key("ready", version)], timeout=1)
            if popped:
                rank, epoch = popped[1].decode().split(" ")
                ready[int(rank)] = epoch
        return ready

    def _go_message(self, joined: dict[int, str]) -> str:
        """Go, with the group's address; a new group (new epoch) when any engine does not hold the current one
        (the first update, or a restarted engine): every rank then builds it afresh."""
        if self._group is None or any(epoch != self._epoch for epoch in joined.values()):
            host = self.host or _routable_ip()
            port = _free_port()
            self._group = None
            self._epoch = uuid.uuid4().hex[:12]
            self._store = open_store(host, port, 0, self.world_size, self.join_timeout_s)
            self._address = {"host": host, "port": port}
        return json.dumps({"epoch": self._epoch, "world_size": self.world_size, "backend": self.backend,
                           "timeout_s": self.join_timeout_s, **self._address})

    # ---- engine side (ranks 1..)

    def latest(self) -> tuple[int, str] | None:
        return _announced(self.client, self.keys)

    def load_into(self, engine, version: int, location: str) -> bool:
        called_off = self.client.get(self._key("called_off"))
        if version <= self._called_off or (called_off is not None and int(called_off) == version):
            return False
        raw_plan = self.client.get(self._key("update", version))
        if raw_plan is None:
            log.warning("weights v%d: no bucket plan in Redis (expired?); waiting for a newer version", version)
            return False
        plan = json.loads(raw_plan)
        self.client.rpush(self._key("ready", version), f"{self.rank} {self._epoch or '-'}")
        self.client.expire(self._key("ready", version), self._KEY_TTL_S)
        # The learner waits join_timeout_s for the slowest engine, then answers every rank: go or abandon. Short
        # blocking reads: a client's socket timeout (seconds) must not cut a long BLPOP.
        deadline = time.monotonic() + 2 * self.join_timeout_s + 5
        popped = None
        while popped is None and time.monotonic() < deadline:
            popped = self.client.blpop([self._key("go", version, self.rank)], timeout=1)
        if popped is None:
            raise RuntimeError(f"weights v{version}: the learner neither started nor called off the broadcast within "
                               f"{2 * self.join_timeout_s:.0f} s: is the learner alive?")
        if popped[1] == b"abandon":
            self._called_off = version
            return False
        go = json.loads(popped[1])
        if go["epoch"] != self._epoch:
            engine.join_weight_group(go["host"], go["port"], self.rank, go["world_size"], go["backend"],
                                     go["timeout_s"])
            self._epoch = go["epoch"]
        engine.receive_weights(plan["buckets"])
        self.client.hset(self._key("engines"), str(self.rank), version)
        return True


# --------------------------------------------------------------------------------------------------- factory


def make_weight_channel(cfg, role: str, redis_client: redis.Redis, keys: RunKeys, weights_root: str | Path | None,
                        *, worker_index: int = 0) -> WeightChannel:
    """The channel `cfg.learner.weight_channel` names, for `role` "learner" or "engine" (rollout worker
    `worker_index`, which is rank 1 + worker_index of the nccl group)."""
    if role not in ("learner", "engine"):
        raise ValueError(f"role {role!r}: use 'learner' or 'engine'")
    kind = cfg.learner.weight_channel
    if kind == "shared_folder":
        return SharedFolderWeightChannel(weights_root, redis_client, keys)
    if kind == "ray_object_store":
        return RayObjectStoreWeightChannel(weights_root, redis_client, keys)
    if kind == "nccl":
        return NcclWeightChannel(
            redis_client, keys,
            rank=0 if role == "learner" else 1 + worker_index,
            world_size=1 + cfg.rollout.num_workers,
            bucket_bytes=int(cfg.learner.weight_bucket_mb * 2**20),
            join_timeout_s=cfg.learner.weight_join_timeout_s,
        )
    raise ValueError(f"learner.weight_channel = {kind!r}: use 'shared_folder', 'ray_object_store' or 'nccl'")
