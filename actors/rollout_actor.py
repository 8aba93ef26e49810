"""RolloutActor: prompts in (Redis stream), scored and credited experience out (Redis stream).

One loop, read top to bottom: take prompts -> pick up newer weights -> sample a group per prompt -> verify ->
advantages -> push experience and acknowledge the prompts, in one step. Everything one processing of a batch makes
is tagged with it (record metadata `processing`, resetrl/run_state.py) and lands at once with the prompt acks
(StreamQueue.complete), and only for the prompts this worker still holds: a dead worker's prompts are replayed
(reclaimed by the others), never lost, and a prompt is never both completed and replayed. While it works, a lease
thread renews the worker's claim on every prompt it holds (StreamQueue.renew), so only a dead worker's prompts go
idle and are reclaimed after queue.claim_idle_ms, however long a batch takes.
A worker retired by `resetrl scale` stops taking new prompts and first finishes the ones it holds, so the
driver can remove its consumer from the group with nothing pending.
The class is plain Python; the driver wraps it with `ray.remote`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
import uuid

import torch

from resetrl.actors.engines import make_engine
from resetrl.actors.engines.base import SamplingSettings
from resetrl.actors.engines.lora import engine_lora
from resetrl.actors.trajectories import RolloutContext
from resetrl.config import RunConfig
from resetrl.data import render_prompt
from resetrl.hub import local_snapshot
from resetrl.queue import Mark, StreamEntry, StreamQueue, connect
from resetrl.record import WireFormatError, decode_prompt, encode_experience
from resetrl.run_state import (
    PROCESSING_RECORDS, PROCESSING_TAG, PROMPT_GROUP, RunKeys, incr_stats, retire_requested,
    stop_requested, write_heartbeat,
)
from resetrl.thread_budget import ThreadBudget, host_cores, rollout_threads
from resetrl.verifiers import get_verifier
from resetrl.weights import make_weight_channel

log = logging.getLogger(__name__)

# How often (in loop iterations) a worker looks for prompts that a dead worker left pending.
_RECLAIM_EVERY = 20
# An idle worker (empty prompt queue) still heartbeats this often, so `resetrl status` shows it alive.
_IDLE_HEARTBEAT_S = 2.0
# Leases are renewed this many times per queue.claim_idle_ms: a renewal may be late by a Redis outage (clients
# retry for about 20 s) or a stalled process, and the lease must still not run out.
_RENEWALS_PER_IDLE = 4


class _RolloutMetrics:
    """Ray dashboard metrics of one rollout worker (no-ops outside a Ray worker)."""

    def __init__(self, worker_index: int):
        self.enabled = False
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
            tags = {"worker": str(worker_index)}
            self.tokens = metrics.Counter("resetrl_rollout_tokens", "generated tokens", tag_keys=("worker",))
            self.samples = metrics.Counter("resetrl_rollout_samples", "generated samples", tag_keys=("worker",))
            self.tokens_per_s = metrics.Gauge("resetrl_rollout_tokens_per_s", "generation tokens/s", tag_keys=("worker",))
            self.version = metrics.Gauge("resetrl_rollout_policy_version", "policy version in use", tag_keys=("worker",))
            for metric in (self.tokens, self.samples, self.tokens_per_s, self.version):
                metric.set_default_tags(tags)
            self.enabled = True
        except Exception as exc:  # metrics must never stop a worker
            log.warning("ray metrics disabled: %s", exc)

    def record_batch(self, tokens: int, samples: int, seconds: float, version: int) -> None:
        if not self.enabled:
            return
        if tokens > 0:  # a Ray counter refuses 0
            self.tokens.inc(tokens)
        if samples > 0:  # 0 when another worker had taken the batch's prompts over
            self.samples.inc(samples)
        self.tokens_per_s.set(tokens / max(seconds, 1e-9))
        self.version.set(version)


class RolloutActor:
    def __init__(self, cfg: RunConfig, worker_index: int, model_path: str, redis_url: str, weights_root: str):
        # (vLLM pins the process to one torch thread itself; OMP_NUM_THREADS from Ray's CPU share wins there.)
        torch.set_num_threads(rollout_threads(cfg.rollout.torch_threads, cfg.rollout.cpus_per_worker))
        model_path = str(local_snapshot(model_path))  # the driver's hub snapshot, found again on this node
        self.cfg = cfg
        self.worker_index = worker_index
        self.consumer = f"rollout-{worker_index}"
        self.keys = RunKeys(cfg.run_name)
        self.client = connect(redis_url)
        self.prompts = StreamQueue(self.client, self.keys.prompts, PROMPT_GROUP, self.consumer,
                                   ledger=self.keys.ledger_keys)
        self.weights = make_weight_channel(cfg, "engine", self.client, self.keys, weights_root, worker_index=worker_index)
        self.verify = get_verifier(cfg.algorithm.verifier)
        self.engine = make_engine(
            cfg.rollout.engine,
            model_path,
            dtype=cfg.model.dtype,
            seed=cfg.seed + 1000 * worker_index,
            kv_cache_gib=cfg.rollout.vllm_kv_cache_gib,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            lora=engine_lora(cfg),  # learner.lora: versions arrive as adapters
        )
        # On a CPU-only host this worker claims the threads its engine runs with while it generates; the learner
        # takes the cores left (resetrl/thread_budget.py).
        self.threads = None if torch.cuda.is_available() else ThreadBudget(
            self.client, self.keys, f"rollout-{worker_index}", cores=host_cores(), fixed=torch.get_num_threads())
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.sampling = SamplingSettings(
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            stop=tuple(cfg.rollout.stop),
        )
        self.policy_version = 0
        self.rng = random.Random(cfg.seed + 1000 * worker_index)  # RRPO's reset steps
        self.metrics = _RolloutMetrics(worker_index)
        # A restarted actor must generate with the current policy, not the initial one (docs/design.md); so must
        # one added by `resetrl scale` to a running job.
        self.sync_weights()
        incr_stats(self.client, self.keys, actor_starts=1)  # more than num_workers: Ray restarted one
        self.totals = {"prompts": 0, "samples": 0, "tokens": 0}
        self.last_batch_tokens_per_s = 0.0
        self.last_heartbeat = 0.0
        self.state = "starting"
        self.heartbeat("starting")
        self._lease = threading.Event()  # set: the lease thread stops
        self._lease_thread: threading.Thread | None = None
        self._holding: set[str] = set()  # prompt entry ids read and not yet completed: what the lease renews
        self._holding_lock = threading.Lock()

    def engine_name(self) -> str:
        return self.engine.name

    def pid(self) -> int:
        return os.getpid()

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Work until the run's stop flag is set, or until the driver retires this worker (`resetrl scale`):
        then finish the prompts it holds first. Returns this worker's totals."""
        totals = self.totals
        self._start_lease()
        try:
            return self._run(totals)
        finally:
            self._lease.set()

    def _run(self, totals: dict) -> dict:
        # Entries this consumer name already held (a restart of the same worker) come first.
        backlog = self._hold(self.prompts.read(count=1000, pending=True))
        if backlog:
            incr_stats(self.client, self.keys, prompts_replayed=len(backlog))
        self.heartbeat("running")
        iteration = 0
        while not stop_requested(self.client, self.keys):
            if retire_requested(self.client, self.keys, self.worker_index):
                self.finish_pending()  # the backlog is part of what this consumer holds pending
                break
            iteration += 1
            if backlog:
                entries, backlog = backlog[: self.cfg.rollout.prompts_per_batch], backlog[self.cfg.rollout.prompts_per_batch :]
            elif iteration % _RECLAIM_EVERY == 0 and (reclaimed := self.prompts.reclaim(self.cfg.queue.claim_idle_ms)):
                backlog = self._hold(reclaimed)
                incr_stats(self.client, self.keys, prompts_reclaimed=len(reclaimed))
                continue
            elif orphans := self._hold(self.prompts.read(count=1000, pending=True)):
                # Between batches this worker holds nothing, yet Redis says it does: a read whose reply was lost
                # (Redis restarted under it) delivered them. Take them now rather than after claim_idle_ms.
                backlog = orphans
                incr_stats(self.client, self.keys, prompts_replayed=len(orphans))
                continue
            else:
                entries = self.prompts.read(count=self.cfg.rollout.prompts_per_batch, block_ms=500)
            if not entries:
                # Idle workers keep up with the policy too: with the nccl channel the learner's broadcast waits for
                # every engine, so a worker without prompts must still join it.
                self.sync_weights()
                if time.monotonic() - self.last_heartbeat > _IDLE_HEARTBEAT_S:
                    self.heartbeat("running")
                continue
            self.sync_weights()
            self.process(entries)
            self.heartbeat("running")
        return totals

    def finish_pending(self) -> None:
        """Retiring: take no new prompts; process every entry this consumer holds unacknowledged, batch by batch.

        The entries are processed rather than handed back: pending entries can only move to another consumer by
        being claimed, which a live worker does only after claim_idle_ms, so handing back would stall them.
        """
        self.heartbeat("retiring")
        per_batch = self.cfg.rollout.prompts_per_batch
        # Read wide: a held entry deleted meanwhile comes back empty and is skipped; it must not hide the rest.
        while (held := self._hold(self.prompts.read(count=1000, pending=True))) and not stop_requested(self.client, self.keys):
            for start in range(0, len(held), per_batch):
                self.sync_weights()
                self.process(held[start : start + per_batch])
                self.heartbeat("retiring")
        self.heartbeat("retired")

    def _start_lease(self) -> None:
        if self._lease_thread is not None and self._lease_thread.is_alive():
            return
        self._lease.clear()
        self._lease_thread = threading.Thread(target=self._keep_lease, name=f"lease-{self.consumer}", daemon=True)
        self._lease_thread.start()

    def _hold(self, entries: list[StreamEntry]) -> list[StreamEntry]:
        with self._holding_lock:
            self._holding.update(entry.entry_id for entry in entries)
        return entries

    def _release(self, entries: list[StreamEntry]) -> None:
        with self._holding_lock:
            self._holding.difference_update(entry.entry_id for entry in entries)

    def _keep_lease(self) -> None:
        """Renew this consumer's claim on every prompt it holds, and heartbeat, until run() returns: a batch that
        takes longer than claim_idle_ms keeps its prompts. A dead process renews nothing, so its prompts go idle."""
        period_s = max(0.05, self.cfg.queue.claim_idle_ms / 1000 / _RENEWALS_PER_IDLE)
        while not self._lease.wait(period_s):
            try:
                with self._holding_lock:
                    holding = list(self._holding)
                self.prompts.renew(holding)
                if time.monotonic() - self.last_heartbeat > _IDLE_HEARTBEAT_S:
                    self.heartbeat(self.state)
            except Exception as exc:  # Redis down beyond the client's retries: try again at the next period
                log.warning("lease renewal of %s failed: %s", self.consumer, exc)

    def heartbeat(self, state: str) -> None:
        """This worker's line in `resetrl status` (the run's `workers` hash in Redis)."""
        self.state = state
        self.last_heartbeat = time.monotonic()
        write_heartbeat(
            self.client, self.keys, self.worker_index, state=state, consumer=self.consumer, pid=os.getpid(),
            policy_version=self.policy_version, tokens_per_s=round(self.last_batch_tokens_per_s, 2), **self.totals,
        )

    def sync_weights(self) -> bool:
        latest = self.weights.latest()
        # Any other version, older ones included: a learner restarted from a checkpoint re-publishes its older
        # weights, and the rollout must follow it (docs/design.md, "What a crash replays").
        if latest is None or latest[0] == self.policy_version:
            return False
        version, location = latest
        started = time.perf_counter()
        if not self.weights.load_into(self.engine, version, location):  # pruned or called off: keep the old ones
            return False
        self.policy_version = version
        incr_stats(self.client, self.keys, weight_loads=1, weight_load_seconds=time.perf_counter() - started)
        return True

    def process(self, entries: list[StreamEntry]) -> dict:
        self._hold(entries)
        try:
            return self._process(entries)
        finally:
            self._release(entries)

    def _process(self, entries: list[StreamEntry]) -> dict:
        prompts, good_ids, bad_entries, reasons = [], [], [], []
        for entry in entries:
            try:
                prompts.append(decode_prompt(entry.payload))
                good_ids.append(entry.entry_id)
            except WireFormatError as exc:
                log.error("prompt entry %s rejected to %s: %s", entry.entry_id, self.prompts.dead_stream, exc)
                bad_entries.append(entry)
                reasons.append(str(exc))
        if bad_entries:
            # Kept with the reason in <stream>:dead and acknowledged: never retried, never silently gone; the prompt
            # id the feed named beside the payload settles in the ledger as dead-lettered in the same transaction.
            self.prompts.dead_letter(bad_entries, reasons, marks=[
                Mark(entry.prompt_id, "dead_lettered", entry.entry_id) for entry in bad_entries if entry.prompt_id])
            incr_stats(self.client, self.keys, prompts_rejected=len(bad_entries))
        if not prompts:
            return {"prompts": 0, "samples": 0, "tokens": 0}

        ctx = RolloutContext(self.cfg, self.engine, self.tokenizer, self.verify, self.sampling, self.policy_version, self.rng)
        prompt_ids = [render_prompt(self.tokenizer, self.cfg.data, prompt) for prompt in prompts]
        group_ids = [f"{prompt.prompt_id}@{entry_id}" for prompt, entry_id in zip(prompts, good_ids)]
        started = time.perf_counter()
        # The method decides what to sample and how to credit it (resetrl/methods/; each batches its engine calls).
        with self.threads.busy() if self.threads is not None else contextlib.nullcontext():
            records = self.cfg.algorithm.method.rollout(ctx, prompts, group_ids, prompt_ids)
        generate_seconds = time.perf_counter() - started

        # The experience and the prompt acks land together, tagged with this processing, for the prompts this worker
        # still holds: a crash before replays the prompts, never loses them; nothing lands twice.
        completed, landed = self._complete(prompts, good_ids, records)
        lost_lease = len(good_ids) - len(completed)
        if lost_lease:
            log.warning("%d prompt(s) of this batch were reclaimed by another worker meanwhile; their experience is "
                        "not pushed (the other worker's is)", lost_lease)
        # Zeros are not sent: a counter appears in the run's stats once something happened.
        counters = {name: value for name, value in ctx.stats.items() if value}
        if lost_lease:
            counters["prompts_lease_lost"] = lost_lease
        incr_stats(
            self.client, self.keys, prompts_done=len(completed), samples_generated=landed,
            generate_seconds=generate_seconds, **counters,
        )
        tokens = int(ctx.stats["tokens_generated"])
        self.metrics.record_batch(tokens, landed, generate_seconds, self.policy_version)
        batch = {"prompts": len(completed), "samples": landed, "tokens": tokens}
        for name in self.totals:
            self.totals[name] += batch[name]
        self.last_batch_tokens_per_s = tokens / max(generate_seconds, 1e-9)
        return batch

    def _complete(self, prompts, entry_ids: list[str], records) -> tuple[list[str], int]:
        """Tag the records with this processing and land them with the prompt acks (StreamQueue.complete); the
        entry ids completed and the records they landed."""
        tag = uuid.uuid4().hex
        # A method's group ids start with the prompt entry's, `<prompt id>@<entry id>` (process above).
        by_entry: dict[str, list] = {f"{prompt.prompt_id}@{entry_id}": [] for prompt, entry_id in zip(prompts, entry_ids)}
        for record in records:
            entry = record.group_id  # the entry's group id, or one of its sub-groups: `<entry>/<sub-group>`
            while entry not in by_entry and "/" in entry:
                entry = entry.rsplit("/", 1)[0]
            if entry not in by_entry:
                raise RuntimeError(f"record {record.record_id}: group id {record.group_id!r} does not start with the "
                                   "group id of a prompt entry of this batch (a method must derive its group ids "
                                   "from the ones it is given)")
            by_entry[entry].append(record)
        processed = []
        for (entry, own), entry_id, prompt in zip(by_entry.items(), entry_ids, prompts):
            for record in own:
                record.metadata = {**record.metadata, PROCESSING_TAG: tag, PROCESSING_RECORDS: len(own)}
            processed.append((entry_id, prompt.prompt_id, [encode_experience(record) for record in own]))
        completed = set(self.prompts.complete(self.keys.experience, processed, tag))
        landed = sum(len(own) for (_, own), entry_id in zip(by_entry.items(), entry_ids) if entry_id in completed)
        return [entry_id for entry_id in entry_ids if entry_id in completed], landed

    def close(self) -> None:
        self._lease.set()
        self.engine.close()
        self.client.close()

    def __repr__(self) -> str:
        # The Ray dashboard's Repr column and log prefixes (taken once, when the actor has started).
        engine = getattr(getattr(self, "engine", None), "name", "?")
        return (f"RolloutActor(rollout-{getattr(self, 'worker_index', '?')}, engine={engine}, "
                f"policy v{getattr(self, 'policy_version', 0)})")
