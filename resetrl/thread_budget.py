"""Cores that follow the work (docs/design.md, "CPU threads"): on a CPU-only host the learner's and the rollout
workers' torch threads share the host's cores according to who is busy.

Each role holds a lease in the run's Redis hash `<prefix>:cpu:<host>` while it works (field: the role, value:
"<threads> <expiry unix time>") and sizes its own torch thread pool from the others' live leases:
- a rollout worker runs its fixed share (rollout.torch_threads, else what its engine uses: vLLM fixes its threads
  when it starts, the HF engine gets max(1, ceil(rollout.cpus_per_worker))). Generation is the short part of a step
  that the next step waits for: it never waits for cores;
- the learner takes the cores that busy rollout workers do not claim (at least one), re-read every REFRESH_S while
  it trains, at micro-batch and decoder-layer boundaries, so a generation batch that starts mid-step has its cores
  within about REFRESH_S. With the rollout idle (most of a step on the default job) the learner runs on every core.
- nor does it take cores that processes outside the run keep busy (a shared machine): their CPU time, the host's
  busy time (/proc/stat) less this process's own and less what the busy workers claim, over at least LOAD_WINDOW_S,
  rounded to whole cores.
Oversubscribing cores is what must not happen: OpenMP threads spin at their barriers, and two pools sharing cores
made training and generation 5-20x slower (measured, tests/conftest.py); on a 2-core machine with one core taken by
another process, a SmolLM2 forward took 43 s with 2 learner threads against 11 s with 1 (measured).

An explicit learner.torch_threads / rollout.torch_threads fixes a role's threads; so do several learner ranks (each
gets int(learner.cpus)). GPU hosts are left alone (Ray's OMP_NUM_THREADS from the actor's CPU share stays).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from resetrl.run_state import RunKeys, drop_cpu_lease, hold_cpu_lease, live_cpu_leases

log = logging.getLogger(__name__)

REFRESH_S = 0.25  # how often a busy learner re-reads the leases
LEASE_S = 600.0  # a lease left by a killed role stops counting after this long
LOAD_WINDOW_S = 1.0  # other processes' busy cores are measured over at least this long


def host_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup v2 CPU quota when there is one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def rollout_threads(torch_threads: int | None, cpus_per_worker: float) -> int:
    """A rollout worker's HF-engine threads: rollout.torch_threads, else its Ray CPU share rounded up."""
    return torch_threads or max(1, math.ceil(cpus_per_worker))


def learner_threads(cores: int, rollout_claims: list[int], busy_elsewhere: float = 0.0) -> int:
    """The learner's share: the cores that busy rollout workers do not claim and that processes outside the run do
    not keep busy, at least one. `busy_elsewhere`: cores of CPU time the other processes used, rollout workers
    included (their claims are taken out of it), rounded half up."""
    claimed = sum(rollout_claims)
    outside = math.floor(max(0.0, busy_elsewhere - claimed) + 0.5)
    return max(1, cores - claimed - outside)


@dataclass(frozen=True)
class CpuSample:
    wall: float  # time.monotonic()
    host_busy: float  # CPU seconds the host's cores spent busy (user, nice, system, irq, softirq, steal)
    own: float  # CPU seconds of this process, all its threads


def cpu_sample(cores: int) -> CpuSample | None:
    """The host's busy time and this process's; None where /proc/stat does not describe exactly `cores` cores (a
    container on a larger host, not Linux): then no outside load is assumed."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    if sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit()) != cores:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in lines[0].split()[1:9])
    ticks = os.sysconf("SC_CLK_TCK")
    return CpuSample(time.monotonic(), (user + nice + system + irq + softirq + steal) / ticks, time.process_time())


def busy_elsewhere(before: CpuSample, after: CpuSample) -> float:
    """Cores that processes other than this one kept busy between two samples."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, (after.host_busy - before.host_busy) - (after.own - before.own)) / wall


class ThreadBudget:
    """One role's torch threads on this host. A rollout worker holds a lease of its `fixed` threads while it
    generates (`busy`); the learner, without `fixed`, re-sizes to the cores those leases leave (`refresh`)."""

    def __init__(self, client, keys: RunKeys, role: str, *, cores: int, fixed: int | None = None,
                 host: str | None = None, load: Callable[[int], CpuSample | None] | None = cpu_sample):
        self.client, self.keys, self.role, self.cores, self.fixed = client, keys, role, cores, fixed
        self.load = load  # how the outside load is sampled; None: leases only
        self.host = host or socket.gethostname()
        self.threads = self.initial = torch.get_num_threads()
        self.used: set[int] = set()  # thread counts run with since take_used()
        self._next_refresh = 0.0
        self._sample: CpuSample | None = None
        self.elsewhere = 0.0  # the latest measure of busy_elsewhere
        if fixed is not None:
            self._set(fixed)

    # ---- leases ---------------------------------------------------------------------------------------------------
    def _leases(self) -> dict[str, int]:
        """Live leases of the other roles: role -> threads."""
        live = live_cpu_leases(self.client, self.keys, self.host, now=time.time())
        live.pop(self.role, None)
        return live

    @contextmanager
    def busy(self):
        """Hold this role's lease (its current threads) while the block runs."""
        self.refresh(force=True)
        hold_cpu_lease(self.client, self.keys, self.host, self.role, self.threads, expiry=time.time() + LEASE_S)
        try:
            yield self
        finally:
            drop_cpu_lease(self.client, self.keys, self.host, self.role)

    # ---- threads --------------------------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> int:
        """Re-size this role's thread pool from the others' leases (at most every REFRESH_S unless forced)."""
        if self.fixed is not None:
            self.used.add(torch.get_num_threads())
            return torch.get_num_threads()
        now = time.monotonic()
        if force or now >= self._next_refresh:
            self._next_refresh = now + REFRESH_S
            try:
                leases = self._leases()
            except Exception as exc:  # Redis away for a moment: keep the threads as they are, never stop training
                log.warning("thread budget: leases unreadable (%s); keeping %d threads", exc, self.threads)
                return self.threads
            claims = [threads for role, threads in leases.items() if role.startswith("rollout")]
            # Against torch's own count, not a cached one: whoever else set it (a bench's baseline) is corrected.
            self._set(learner_threads(self.cores, claims, self._measure_elsewhere()))
        self.used.add(torch.get_num_threads())
        return self.threads

    def _measure_elsewhere(self) -> float:
        """Cores other processes kept busy, re-measured once LOAD_WINDOW_S has passed since the last sample."""
        if self._sample is not None and time.monotonic() - self._sample.wall < LOAD_WINDOW_S:
            return self.elsewhere
        sample = self.load(self.cores) if self.load is not None else None
        if sample is not None and self._sample is not None:
            self.elsewhere = busy_elsewhere(self._sample, sample)
        self._sample = sample
        return self.elsewhere

    def _set(self, threads: int) -> None:
        # Only on a change: vLLM's CPU worker replaces torch.set_num_threads with a warning in its process.
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.threads = threads

    def restore(self) -> None:
        """Back to the threads the process had before this budget."""
        self._set(self.initial)

    def take_used(self) -> list[int]:
        """The thread counts measured (torch.get_num_threads) since the last call, ascending."""
        used, self.used = sorted(self.used), set()
        return used

    def refresh_in_layers(self, model: torch.nn.Module) -> None:
        """Also re-size as each decoder layer's forward starts and as its backward starts (a hook on its output's
        gradient: safe under ZeRO-3 and gradient checkpointing), so a long micro-batch reacts within about
        REFRESH_S to a rollout batch that starts."""
        if self.fixed is not None:
            return

        def on_start(*_):
            self.refresh()

        def on_gradient(_grad):
            self.refresh()

        def on_output(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(on_gradient)

        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                module.register_forward_pre_hook(on_start)
                module.register_forward_hook(on_output)
