"""The learner's torch.distributed group: joining it (deepspeed.initialize needs one even for a single rank),
cleaning up what DeepSpeed caches when a group was destroyed in the same process, and handing rank 0's step
payloads to the other ranks."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from resetrl.net import free_port

DEFAULT_TORCH_EXTENSIONS_DIR = "~/.cache/resetrl/torch_extensions"
# How long a rank waits in a collective (ranks > 0 wait in every step's broadcast while rank 0 reads the stream):
# a train_step timeout, a checkpoint and a weight publication must each stay well below it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def init_distributed(rank: int = 0, world_size: int = 1, master_addr: str | None = None,
                      master_port: int | None = None) -> None:
    """Join the learner's torch.distributed group (deepspeed.initialize needs one even for a single rank).

    One rank makes its own group on loopback; several need rank 0's address and a port (resetrl/launch/learner_group.py)."""
    # The first init builds DeepSpeed's shm comm op (~70-90 s on 2 cores); a cache directory that survives makes
    # every later start take well under a second.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(DEFAULT_TORCH_EXTENSIONS_DIR).expanduser()))
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == world_size and dist.get_rank() == rank:
            return  # a second Learner in the same process (tests) shares the group
        raise RuntimeError(f"this process is already rank {dist.get_rank()} of {dist.get_world_size()}; a learner "
                           f"rank {rank} of {world_size} needs a process of its own")
    _forget_destroyed_deepspeed_groups()
    if world_size == 1:
        master_addr, master_port = "127.0.0.1", free_port()
    elif master_addr is None or master_port is None:
        raise ValueError(f"learner rank {rank} of {world_size} needs master_addr and master_port (rank 0's)")
    # LOCAL_RANK 0: Ray gives each rank's actor its own GPUs (CUDA_VISIBLE_DEVICES), so its device is always cuda:0.
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    if world_size == 1:
        # One rank needs no rendezvous: an in-process store instead of a TCPStore, which would listen on every
        # interface (README, "Security"); DeepSpeed adopts the group.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, timeout=COLLECTIVE_TIMEOUT)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, timeout=COLLECTIVE_TIMEOUT)


def _forget_destroyed_deepspeed_groups() -> None:
    """DeepSpeed caches its process groups in module globals. If the default group was destroyed after an earlier
    init in this process (vLLM's engine cleanup does that when both share a process, as in the test suite), those
    caches point at dead groups and deepspeed.initialize fails with 'Group ... is not registered': drop them."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups as ds_groups

    if ds_comm.cdb is None:
        return  # never initialised in this process: nothing cached
    ds_comm.cdb = None
    ds_groups.mpu = None
    for name, value in list(vars(ds_groups).items()):
        if not (name.startswith("_") and name.isupper()):
            continue
        if isinstance(value, dict):
            value.clear()
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            setattr(ds_groups, name, None)


def broadcast_payloads(payloads: list[bytes] | None, rank: int, device: torch.device) -> list[bytes] | None:
        """Rank 0's step payloads to every rank (None: no step this call). Raw wire-format bytes in uint8 tensors,
        never a pickled object: nothing that came from Redis is unpickled (docs/design.md)."""
        header = torch.zeros(2, dtype=torch.int64, device=device)  # [records, bytes]; 0 records = no step
        if rank == 0 and payloads is not None:
            header[0], header[1] = len(payloads), sum(len(p) for p in payloads)
        dist.broadcast(header, src=0)
        count, total = header.tolist()
        if count == 0:
            return None
        if rank == 0:
            lengths = torch.tensor([len(p) for p in payloads], dtype=torch.int64, device=device)
            data = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8).to(device)
        else:
            lengths = torch.empty(count, dtype=torch.int64, device=device)
            data = torch.empty(total, dtype=torch.uint8, device=device)
        dist.broadcast(lengths, src=0)
        dist.broadcast(data, src=0)
        if rank == 0:
            return payloads
        blob = data.cpu().numpy().tobytes()
        ends = np.cumsum(lengths.cpu().numpy())
        return [blob[end - length : end] for end, length in zip(ends.tolist(), lengths.tolist())]
