"""The learner's intake: everything between the experience stream and a batch to train on (rank 0 only).

Read -> validate -> dedupe -> staleness -> batch; then, after the step, ack (or hold the acks until a checkpoint
covers the step) and the accounting (which records and prompts this model's history has trained). The step itself
(learner/learner.py) never speaks to Redis; the intake never touches the model.

Reliability (docs/design.md, "Reliability contract"): an entry is acknowledged only after the optimizer step that
used it (and, with checkpoints on, the checkpoint covering that step), so a learner that dies mid-step replays it.
A malformed entry is dead-lettered with its reason, never retried; a second copy of a trained record is acked and
counted, never trained twice; a record more than `max_staleness` versions old is dropped and counted.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from resetrl.queue import StreamQueue
from resetrl.record import ExperienceRecord, WireFormatError, decode_experience
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys, incr_stats, mark_prompts_dropped_stale, stop_requested

log = logging.getLogger(__name__)

CONSUMER = "learner-0"


class ExperienceIntake:
    def __init__(self, client, keys: RunKeys, records_per_step: int, vocab_size: int, max_staleness: int,
                 read_block_ms: int):
        self.client, self.keys = client, keys
        self.records_per_step = records_per_step
        self.vocab_size = vocab_size
        self.max_staleness = max_staleness
        self.read_block_ms = read_block_ms
        self.queue = StreamQueue(client, keys.experience, EXPERIENCE_GROUP, CONSUMER)
        self.queue.ensure_group()
        # (entry id, record, its payload as read): read, not yet trained on, not acked.
        self.buffer: list[tuple[str, ExperienceRecord, bytes]] = []
        self.dropped_stale = 0  # since the last batch handed out
        self.held: list[str] = []  # trained (or skipped) entry ids awaiting the next checkpoint's ack
        self.trained_ids: set[str] = set()  # every record id trained in this model's history
        self.trained_prompts: set[str] = set()
        self.records_trained = 0  # records trained in this model's history (duplicates would make it > ids)
        self.duplicates_dropped = 0

    def take_back_pending(self) -> None:
        """A restarted learner first takes back what it held unacknowledged: never trained on by the model it
        restored, except records a checkpoint covers whose ack was lost, which the dedupe drops."""
        self.accept(self.queue.read(count=None, pending=True))

    # ---- reading ------------------------------------------------------------------------------------------------
    def next_batch(self, version: int, timeout_s: float | None) -> list[tuple[str, ExperienceRecord, bytes]] | None:
        """Block until the buffer holds records_per_step fresh records; keep them for the next call on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        block_ms = self.read_block_ms
        while True:
            if stop_requested(self.client, self.keys):
                return None  # what the buffer holds stays pending in Redis, replayed by a resumed learner
            self.drop_stale(version)
            if len(self.buffer) >= self.records_per_step:
                break
            if deadline is not None:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    return None
                block_ms = max(1, min(self.read_block_ms, remaining_ms))
            self.accept(self.queue.read(count=self.records_per_step - len(self.buffer), block_ms=block_ms))
        batch, self.buffer = self.buffer[: self.records_per_step], self.buffer[self.records_per_step :]
        return batch

    def accept(self, entries) -> None:
        rejected, reasons, duplicates = [], [], []
        buffered = {record.record_id for _, record, _ in self.buffer}
        for entry in entries:
            try:
                record = self.check(decode_experience(entry.payload))
            except WireFormatError as exc:
                log.warning("rejecting experience entry %s to %s: %s", entry.entry_id, self.queue.dead_stream, exc)
                rejected.append(entry)
                reasons.append(str(exc))
                continue
            if record.record_id in self.trained_ids or record.record_id in buffered:
                # Already trained (a checkpoint covered it but its ack was lost) or a second copy of the same
                # record (a rollout worker died between pushing experience and acknowledging its prompt).
                duplicates.append(entry.entry_id)
                continue
            buffered.add(record.record_id)
            self.buffer.append((entry.entry_id, record, entry.payload))
        if rejected:
            # Dead-lettered (kept with the reason, acked): a malformed entry stays malformed, never retried.
            self.queue.dead_letter(rejected, reasons)
            incr_stats(self.client, self.keys, records_rejected=len(rejected))
        if duplicates:
            self.queue.ack(duplicates)
            self.duplicates_dropped += len(duplicates)
            incr_stats(self.client, self.keys, records_duplicate=len(duplicates))

    def check(self, record: ExperienceRecord) -> ExperienceRecord:
        """What would crash or poison a whole step is refused per record, with the reason."""
        if len(record.token_ids) < 2:
            raise WireFormatError(f"record {record.record_id} has {len(record.token_ids)} tokens; at least 2 needed")
        if record.token_ids.min() < 0 or record.token_ids.max() >= self.vocab_size:
            raise WireFormatError(f"record {record.record_id} has token ids outside the vocabulary [0, {self.vocab_size})")
        if not (record.temperature > 0 and math.isfinite(record.temperature)):
            raise WireFormatError(f"record {record.record_id} has temperature {record.temperature}; must be > 0")
        target = record.target_token_ids
        if target is not None and not np.array_equal(target, record.token_ids[record.prompt_length :]):
            # A supervised record's target is its response (actors/trajectories.supervised_record).
            raise WireFormatError(f"record {record.record_id}: target_token_ids differ from token_ids[prompt_length:]")
        return record

    def drop_stale(self, version: int) -> None:
        stale = [(eid, r) for eid, r, _ in self.buffer if version - r.policy_version > self.max_staleness]
        if not stale:
            return
        self.buffer = [item for item in self.buffer if version - item[1].policy_version <= self.max_staleness]
        self.queue.ack([eid for eid, _ in stale])
        incr_stats(self.client, self.keys, samples_dropped_stale=len(stale))
        mark_prompts_dropped_stale(self.client, self.keys, {r.prompt_id for _, r in stale})  # final: for the accounting
        self.dropped_stale += len(stale)

    def take_dropped_stale(self) -> int:
        dropped, self.dropped_stale = self.dropped_stale, 0
        return dropped

    # ---- after the step -----------------------------------------------------------------------------------------
    def trained(self, records: list[ExperienceRecord]) -> None:
        self.trained_ids.update(r.record_id for r in records)
        self.trained_prompts.update(r.prompt_id for r in records)
        self.records_trained += len(records)

    def hold(self, entry_ids: list[str]) -> None:
        self.held.extend(entry_ids)

    def ack_held(self) -> None:
        self.queue.ack(self.held)
        self.held = []

    # ---- checkpoints and the run's accounting -------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "trained_record_ids": sorted(self.trained_ids),
            "trained_prompt_ids": sorted(self.trained_prompts),
            "records_trained": self.records_trained,
        }

    def restore(self, state: dict) -> None:
        self.trained_ids = set(state["trained_record_ids"])
        self.trained_prompts = set(state["trained_prompt_ids"])
        self.records_trained = int(state["records_trained"])

    def accounting(self) -> dict:
        return {
            "trained_prompt_ids": sorted(self.trained_prompts),
            "records_trained": self.records_trained,
            "records_trained_unique": len(self.trained_ids),
            "duplicates_trained": self.records_trained - len(self.trained_ids),
            "duplicates_dropped": self.duplicates_dropped,
        }
