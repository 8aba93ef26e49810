"""RolloutPool: the driver's rollout actors, grown and shrunk while a job runs (`resetrl scale`).

The pool owns the actor handles, their run() refs and worker indices. Indices only grow: a new worker gets an
index (and so a consumer name `rollout-<index>`) that no earlier worker of the run had, so it never inherits
entries a removed worker left pending. Removing a worker is a hand-over, not a kill: the pool adds its index to
the run's `retiring` set, the worker finishes what it holds and returns from run(), and only then is it killed
and its consumer deleted from the prompt group, and only if it holds nothing (XGROUP DELCONSUMER would drop
pending entries). A prompt is therefore never lost to scaling down; at worst, a worker that died while retiring
leaves its entries for the live ones to reclaim, as after any crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from resetrl.queue import StreamQueue
from resetrl.launch.ray_actors import kill_actor
from resetrl.run_state import (
    RunKeys, forget_worker, incr_stats, read_heartbeats, request_retire, set_desired_workers, set_worker_count,
    start_worker_pool,
)

log = logging.getLogger(__name__)

# A worker whose actor has not started after this long is reported once: the cluster probably lacks the CPUs.
_SLOW_START_S = 60.0


@dataclass
class RolloutWorker:
    index: int
    handle: object
    pid_ref: object
    engine_ref: object
    run_ref: object
    added: bool = False  # by `resetrl scale`, not one of the run's initial workers
    created: float = field(default_factory=time.monotonic)
    pid: int | None = None
    slow_start_reported: bool = False

    @property
    def consumer(self) -> str:
        return f"rollout-{self.index}"  # RolloutActor's consumer name in the prompt group


class RolloutPool:
    def __init__(self, create_actor: Callable[[int], object], client, keys: RunKeys, prompt_queue: StreamQueue,
                 say: Callable[[str], None] = log.info):
        self.create_actor = create_actor
        self.client = client
        self.keys = keys
        self.prompt_queue = prompt_queue
        self.say = say  # the driver's console: scaling is something the person running the job wants to see
        self.workers: dict[int, RolloutWorker] = {}
        self.retiring: dict[int, RolloutWorker] = {}
        self.retired: list[dict] = []
        self.history: list[dict] = []
        self.next_index = 0
        self.started = time.monotonic()
        self.added = self.removed = self.failed = 0
        self.stopping = False  # set once the run's stop flag is: every run() returns then, none has died

    # ---- what the driver reads -------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return len(self.workers)

    @property
    def active_runs(self) -> list:
        return [worker.run_ref for worker in self.workers.values()]

    @property
    def all_runs(self) -> list:
        return [worker.run_ref for worker in (*self.workers.values(), *self.retiring.values())]

    @property
    def handles(self) -> list:
        return [worker.handle for worker in (*self.workers.values(), *self.retiring.values())]

    @property
    def engine_refs(self) -> list:
        return [worker.engine_ref for worker in self.workers.values()]

    def pids(self) -> dict[int, int]:
        return {index: worker.pid for index, worker in sorted(self.workers.items()) if worker.pid is not None}

    def summary(self) -> dict:
        return {
            "worker_count_history": self.history,
            "workers_added": self.added,
            "workers_removed": self.removed,
            "workers_failed": self.failed,
            "workers_retired": self.retired,
        }

    # ---- changing the pool -------------------------------------------------------------------------------------
    def start(self, count: int) -> None:
        """Create the initial workers and wait until each has loaded its engine and weights."""
        start_worker_pool(self.client, self.keys, count)  # a resumed run starts again at its configured size
        # Indices continue after every consumer the prompt group knows (a resumed run's scaled-up workers).
        known = [int(name.rsplit("-", 1)[1]) for name in self.prompt_queue.consumers()
                 if name.startswith("rollout-") and name.rsplit("-", 1)[1].isdigit()]
        # The initial workers are 0..count-1: a resumed worker takes back what its namesake left pending.
        self._create(count)
        self.next_index = max([count, *(index + 1 for index in known)])
        ray.get([worker.pid_ref for worker in self.workers.values()])
        self.poll()
        self._record_count()

    def reconcile(self, desired: int | None) -> bool:
        """Add or remove workers until `desired` run (at least 1); True if the pool changed."""
        if desired is None:
            return False
        desired = max(1, desired)
        if desired > self.count:
            self.add(desired - self.count)
        elif desired < self.count:
            self.remove(self.count - desired)
        else:
            return False
        return True

    def add(self, n: int) -> None:
        indices = self._create(n, added=True)
        self.added += n
        incr_stats(self.client, self.keys, workers_added=n)
        self._record_count()
        self.say(f"scale: added rollout worker(s) {indices}; {self.count} running")

    def remove(self, n: int) -> None:
        """Retire the n highest-index workers (never the last one): each finishes its pending prompts first."""
        n = min(n, self.count - 1)
        if n <= 0:
            return
        indices = sorted(self.workers)[-n:]
        for index in indices:
            worker = self.workers.pop(index)
            request_retire(self.client, self.keys, index)
            if not self._has_started(worker):
                # Still loading (or waiting for CPUs): its run() has not read a prompt yet, so nothing to finish.
                kill_actor(worker.handle)
            self.retiring[index] = worker
        self.removed += n
        incr_stats(self.client, self.keys, workers_removed=n)
        self._record_count()
        self.say(f"scale: retiring rollout worker(s) {indices} (finishing their pending prompts); {self.count} running")

    def poll(self) -> bool:
        """Note the pids of workers that have started, finish off retired ones and drop added ones that died;
        True if the pids changed."""
        changed = False
        added = [worker for worker in self.workers.values() if worker.added and not self.stopping]
        if added:
            # run() never returns by itself: an added worker's run finished means it died (Ray's restarts used up)
            died, _ = ray.wait([worker.run_ref for worker in added], num_returns=len(added), timeout=0)
            for worker in [w for w in added if w.run_ref in died]:
                self._drop_dead(worker)
                changed = True
        # A worker Ray restarted has a new process: its heartbeat says which (RolloutActor.heartbeat).
        beats = read_heartbeats(self.client, self.keys)
        for index, worker in self.workers.items():
            beat_pid = beats.get(index, {}).get("pid")
            if worker.pid is not None and isinstance(beat_pid, int) and beat_pid != worker.pid:
                worker.pid = beat_pid
                changed = True
        for worker in self.workers.values():
            if worker.pid is None and self._has_started(worker):
                try:
                    worker.pid = ray.get(worker.pid_ref)
                    changed = True
                except Exception:  # its creation failed: its run() fails too, and is dealt with there
                    pass
            elif (worker.pid is None and not worker.slow_start_reported
                  and time.monotonic() - worker.created > _SLOW_START_S):
                worker.slow_start_reported = True
                self.say(f"scale: rollout worker {worker.index} has not started after {_SLOW_START_S:.0f} s; the Ray "
                         "cluster may lack the CPUs/GPUs for it (rollout.cpus_per_worker, rollout.gpus_per_worker)")
        if self.retiring:
            finished, _ = ray.wait([worker.run_ref for worker in self.retiring.values()],
                                   num_returns=len(self.retiring), timeout=0)
            for worker in [w for w in self.retiring.values() if w.run_ref in finished]:
                self._finish_retired(worker)
        return changed

    def wait_stopped(self, timeout_s: float) -> int:
        """Once the run's stop flag is set: wait up to timeout_s for every worker's run() to return (a worker's
        error is the run's error) and finish off retiring ones. A worker still in the middle of a batch then (a long
        generation: SRPO's localisation budget on a CPU) is left to the shutdown, which kills it; the prompts it
        holds stay pending in Redis, where `--resume` takes them back. Returns how many were still running."""
        self.stopping = True
        runs = self.active_runs
        finished, running = ray.wait(runs, num_returns=len(runs), timeout=timeout_s) if runs else ([], [])
        ray.get(finished)
        if running:
            self.say(f"{len(running)} rollout worker(s) still mid-batch {timeout_s:g} s after the run ended: stopped "
                     "with the run; the prompts they hold stay queued for a resumed run")
        if self.retiring:  # their errors are not (see _finish_retired): wait without raising
            ray.wait([worker.run_ref for worker in self.retiring.values()], num_returns=len(self.retiring),
                     timeout=timeout_s)
        self.poll()
        return len(running)

    # ---- internals ---------------------------------------------------------------------------------------------
    def _create(self, n: int, added: bool = False) -> list[int]:
        indices = []
        for _ in range(n):
            index, self.next_index = self.next_index, self.next_index + 1
            handle = self.create_actor(index)
            # Asked before run(): an actor runs one task at a time, in order, and run() never returns by itself.
            pid_ref, engine_ref = handle.pid.remote(), handle.engine_name.remote()
            self.workers[index] = RolloutWorker(index, handle, pid_ref, engine_ref, handle.run.remote(), added=added)
            indices.append(index)
        return indices

    @staticmethod
    def _has_started(worker: RolloutWorker) -> bool:
        if worker.pid is not None:
            return True
        ready, _ = ray.wait([worker.pid_ref], timeout=0)
        return bool(ready)

    def _finish_retired(self, worker: RolloutWorker) -> None:
        del self.retiring[worker.index]
        try:
            totals = ray.get(worker.run_ref)
        except Exception as exc:  # died while retiring (or killed before it started): the others reclaim its prompts
            totals = None
            log.warning("rollout worker %d ended with an error while retiring: %s", worker.index, exc)
        kill_actor(worker.handle)
        still_held = self.prompt_queue.remove_consumer(worker.consumer)
        forget_worker(self.client, self.keys, worker.index)
        self.retired.append({"index": worker.index, "consumer": worker.consumer, "totals": totals,
                             "pending_prompts_left": still_held, "consumer_removed": still_held == 0})
        if still_held:
            self.say(f"scale: rollout worker {worker.index} left {still_held} prompt(s) pending; the other workers "
                     "reclaim them after queue.claim_idle_ms")
        else:
            done = f"{totals['prompts']} prompts in all" if totals else "no prompts"
            self.say(f"scale: rollout worker {worker.index} retired ({done}); consumer {worker.consumer} removed")

    def _drop_dead(self, worker: RolloutWorker) -> None:
        """A worker `resetrl scale` added that died (e.g. out of memory while loading) costs the job that worker,
        not the job: the pool goes back to its size before, and the wanted count with it, so it is not re-added
        in a loop. (The initial workers' deaths still stop the run: see train_loop._raise_if_rollout_died.)"""
        del self.workers[worker.index]
        try:
            ray.get(worker.run_ref)
            error = "its run() returned"
        except Exception as exc:
            error = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        kill_actor(worker.handle)
        still_held = self.prompt_queue.remove_consumer(worker.consumer)  # if any, the live workers reclaim them
        forget_worker(self.client, self.keys, worker.index)
        set_desired_workers(self.client, self.keys, self.count)
        self.failed += 1
        incr_stats(self.client, self.keys, workers_failed=1)
        self._record_count()
        self.say(f"scale: added rollout worker {worker.index} died ({error}); {still_held} prompt(s) it held go to "
                 f"the others; running with {self.count}, and the wanted count is set back to {self.count}")

    def _record_count(self) -> None:
        set_worker_count(self.client, self.keys, self.count)
        self.history.append({"seconds": round(time.monotonic() - self.started, 2), "workers": self.count})
