"""Bucketed weight transport: named tensors packed into one contiguous byte buffer and back, and the process group
that broadcasts those buffers from learner rank 0 to the engine ranks (NCCL on GPUs, gloo on CPU hosts).

Why buckets: a collective per tensor pays a launch and a synchronisation for each of a model's hundreds of tensors;
one collective for the whole model needs a second full copy of it (and, under ZeRO-3, every parameter gathered at
once). A bucket of `bucket_bytes` bounds the extra memory and keeps the number of collectives small.

The layout of a bucket is plain metadata (`TensorSpec`: name, shape, dtype, byte offset), agreed before any byte
moves: the learner plans the buckets from shapes alone (ZeRO-3 partitions need no gathering for that), sends the
plan through Redis as JSON, and every engine allocates its receive buffer from it. Pure functions here; the
nccl channel (nccl.py beside this) decides when to send and the engines (actors/engines) where to apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Every tensor starts at a multiple of this many bytes: a view of any dtype over the byte buffer is then aligned
# (torch refuses misaligned dtype views) and CUDA copies stay on their fast path.
ALIGN_BYTES = 256
SOURCE_RANK = 0  # the learner


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    offset: int  # bytes from the start of the bucket

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=dtype_from_name(self.dtype)).element_size()

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "offset": self.offset}

    @classmethod
    def from_json(cls, raw: dict) -> "TensorSpec":
        dtype_from_name(raw["dtype"])  # refuse an unknown dtype here, before any buffer is sized from it
        return cls(str(raw["name"]), tuple(int(d) for d in raw["shape"]), str(raw["dtype"]), int(raw["offset"]))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype (expected e.g. 'float32', 'bfloat16')")
    return dtype


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def plan_buckets(
    entries: Sequence[tuple[str, Sequence[int], torch.dtype]], bucket_bytes: int
) -> list[list[TensorSpec]]:
    """Group (name, shape, dtype) in order into buckets of at most `bucket_bytes`; a bigger tensor gets its own."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive (got {bucket_bytes})")
    buckets: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    used = 0
    for name, shape, dtype in entries:
        spec = TensorSpec(name, tuple(int(d) for d in shape), dtype_name(dtype), 0)
        if current and used + spec.nbytes > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(TensorSpec(spec.name, spec.shape, spec.dtype, used))
        used = _aligned(used + spec.nbytes)
    if current:
        buckets.append(current)
    return buckets


def bucket_nbytes(bucket: Sequence[TensorSpec]) -> int:
    last = bucket[-1]
    return _aligned(last.offset + last.nbytes)


def pack_bucket(bucket: Sequence[TensorSpec], tensors: Sequence[torch.Tensor], device=None) -> torch.Tensor:
    """One uint8 buffer holding `tensors` (in `bucket` order) at their specs' offsets, on `device`."""
    if len(bucket) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors for a bucket of {len(bucket)} specs")
    device = torch.device(device) if device is not None else tensors[0].device
    buffer = torch.empty(bucket_nbytes(bucket), dtype=torch.uint8, device=device)
    for spec, tensor in zip(bucket, tensors):
        if tuple(tensor.shape) != spec.shape or dtype_name(tensor.dtype) != spec.dtype:
            raise ValueError(
                f"{spec.name}: got {tuple(tensor.shape)} {dtype_name(tensor.dtype)}, the plan says {spec.shape} "
                f"{spec.dtype} (the model changed shape or dtype after the buckets were planned)"
            )
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[spec.offset : spec.offset + spec.nbytes].copy_(raw, non_blocking=True)
    return buffer


def unpack_bucket(buffer: torch.Tensor, bucket: Sequence[TensorSpec]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into `buffer`: no copy, so apply them before the buffer is reused."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < bucket_nbytes(bucket):
        raise ValueError(f"expected a 1-d uint8 buffer of at least {bucket_nbytes(bucket)} bytes, got "
                         f"{buffer.dtype} {tuple(buffer.shape)}")
    return [
        (spec.name, buffer[spec.offset : spec.offset + spec.nbytes].view(dtype_from_name(spec.dtype)).view(spec.shape))
        for spec in bucket
    ]


# ---------------------------------------------------------------------------------------------------- the group


def open_store(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The group's rendezvous: rank 0 (the learner) listens on `port`, the others connect to host:port."""
    return dist.TCPStore(host, port, world_size, is_master=rank == SOURCE_RANK, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def open_group(store: dist.Store, rank: int, world_size: int, backend: str, timeout_s: float) -> dist.ProcessGroup:
    """A process group of its own (learner = rank 0, engines = 1..world_size-1) on `store`.

    Built from the store directly, not with init_process_group: the learner already has DeepSpeed's default group
    and a vLLM worker has vLLM's, and torch allows one default group per process (vLLM's StatelessProcessGroup
    exists for the same reason). Every rank must call this together: gloo connects here, NCCL at the first
    broadcast.
    """
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r}: use 'nccl' (GPUs) or 'gloo' (CPU)")
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def broadcast_bucket(group: dist.ProcessGroup, buffer: torch.Tensor) -> None:
    """From SOURCE_RANK into every rank's `buffer`; returns when this rank's copy is complete (NCCL: enqueued on the
    current stream, so later work on it sees the bytes)."""
    group.broadcast(buffer, SOURCE_RANK).wait()


def receive_buckets(
    group: dist.ProcessGroup, buckets: Sequence[Sequence[TensorSpec]], device
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receive the broadcast of each planned bucket in turn; yields its (name, tensor) views to apply."""
    for bucket in buckets:
        buffer = torch.empty(bucket_nbytes(bucket), dtype=torch.uint8, device=device)
        broadcast_bucket(group, buffer)
        yield unpack_bucket(buffer, bucket)
