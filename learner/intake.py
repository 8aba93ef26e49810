"""The learner's intake: everything between the experience stream and a batch to train on (rank 0 only).

Read -> validate -> dedupe -> staleness -> batch; then, after the step, ack (or hold the acks until a checkpoint
covers the step) together with the ledger marks they settle. The step itself (learner/learner.py) never speaks to
Redis; the intake never touches the model, and never raises on a record: whatever cannot be trained is
dead-lettered with its reason.

Reliability (docs/design.md, "Reliability contract"):
- An entry is acknowledged only after the optimizer step that used it (and, with checkpoints on, the checkpoint
  covering that step), so a learner that dies mid-step replays it. A checkpoint lists the entries it covers whose
  acks are still to be sent: a learner restored from it acks them instead of training them again.
- Exactly once per prompt entry: the records of one processing of a prompt (a rollout worker's `process`) carry its
  tag (resetrl/run_state.py processing_tag). The first processing of a prompt that arrives is the one trained; a
  record of any other processing, or a second copy of a record, is dead-lettered as a duplicate and counted
  (`records_duplicate`). What is settled is known from the ledger in Redis; what is in flight from `processings`,
  which keeps only unsettled or unfinished processings (and at most `recent_capacity`), so the dedupe state in a
  checkpoint does not grow with the run.
- Staleness per processing: all of a prompt's records from one processing share a policy version; they are dropped
  together (`prompts_dropped_stale`, `samples_dropped_stale`) unless some of them are already in a batch, in which
  case the rest are trained too: a group is trained whole or dropped whole.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import msgpack
import numpy as np

from resetrl.queue import Mark, StreamEntry, StreamQueue
from resetrl.record import ExperienceRecord, WireFormatError, decode_experience
from resetrl.run_state import (
    EXPERIENCE_GROUP, PROCESSING_TAG, RunKeys, incr_stats, ledger_states, processing_records, processing_tag,
    stop_requested,
)

log = logging.getLogger(__name__)

CONSUMER = "learner-0"
# Processings kept in memory at most: far more than are ever in flight (records read, not yet settled).
RECENT_CAPACITY = 4096

KEEP, STALE = "keep", "stale"


@dataclass
class Processing:
    """The processing of one prompt that the learner trains (the first one that arrived)."""

    tag: str
    records: int | None  # how many records it made for the prompt (None: its writer did not say)
    done: set[str] = field(default_factory=set)  # record ids trained, dropped as stale, or in a skipped step
    buffered: set[str] = field(default_factory=set)  # record ids read, not yet done
    decision: str | None = None  # KEEP once some of it is in a batch, STALE once dropped; then final
    settled: bool = False  # its ledger mark is written

    @property
    def finished(self) -> bool:
        return self.settled and self.records is not None and len(self.done) >= self.records

    def to_json(self) -> dict:
        return {"tag": self.tag, "records": self.records, "done": sorted(self.done), "decision": self.decision}

    @classmethod
    def from_json(cls, data: dict) -> "Processing":
        return cls(data["tag"], data.get("records"), set(data.get("done", ())), decision=data.get("decision"),
                   settled=True)


class ExperienceIntake:
    def __init__(self, client, keys: RunKeys, records_per_step: int, vocab_size: int, max_staleness: int,
                 read_block_ms: int, recent_capacity: int = RECENT_CAPACITY):
        self.client, self.keys = client, keys
        self.records_per_step = records_per_step
        self.vocab_size = vocab_size
        self.max_staleness = max_staleness
        self.read_block_ms = read_block_ms
        self.recent_capacity = recent_capacity
        self.queue = StreamQueue(client, keys.experience, EXPERIENCE_GROUP, CONSUMER, ledger=keys.ledger_keys)
        self.queue.ensure_group()
        # (entry id, record, its payload as read): read, not yet trained on, not acked.
        self.buffer: list[tuple[str, ExperienceRecord, bytes]] = []
        self.dropped_stale = 0  # records, since the last batch handed out
        self.held: list[tuple[str, str, str]] = []  # (entry id, prompt id, tag) trained, awaiting their ack
        self.processings: OrderedDict[str, Processing] = OrderedDict()  # prompt id -> the processing trained
        self.covered: set[str] = set()  # entry ids the restored checkpoint trained, whose acks may have been lost
        self.in_step: list[tuple[str, ExperienceRecord, bytes]] = []  # the batch handed out last
        self.records_trained = 0  # by this learner process
        self.duplicates_dropped = 0

    def take_back_pending(self) -> None:
        """A restarted learner first takes back what it held unacknowledged: never trained on by the model it
        restored, except the entries its checkpoint covers, which are acked now."""
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
        for _, record, _ in batch:
            self.processings[record.prompt_id].decision = KEEP  # the rest of its processing is trained too
        self.in_step = batch
        return batch

    def accept(self, entries: list[StreamEntry]) -> None:
        """Validate, dedupe and buffer entries; dead-letter what can never be trained. Never raises on a record."""
        dead: list[tuple[StreamEntry, str, Mark | None]] = []
        decoded: list[tuple[StreamEntry, ExperienceRecord]] = []
        for entry in entries:
            try:
                decoded.append((entry, self.check(decode_experience(entry.payload))))
            except Exception as exc:  # WireFormatError, or anything a hostile payload provokes: never a crash
                reason = str(exc) if isinstance(exc, WireFormatError) else f"unreadable record: {type(exc).__name__}: {exc}"
                log.warning("rejecting experience entry %s to %s: %s", entry.entry_id, self.queue.dead_stream, reason)
                dead.append((entry, reason, _claimed_mark(entry.payload)))
        if dead:
            self.queue.dead_letter([e for e, _, _ in dead], [r for _, r, _ in dead],
                                   marks=[m for _, _, m in dead if m is not None])
            incr_stats(self.client, self.keys, records_rejected=len(dead))

        settled = ledger_states(self.client, self.keys, {r.prompt_id for _, r in decoded} - self.processings.keys())
        covered_ids, covered_marks, duplicates, reasons, stale = [], {}, [], [], []
        for entry, record in decoded:
            tag = processing_tag(record)
            if entry.entry_id in self.covered:
                # The restored checkpoint trained it; the learner that wrote the checkpoint died before its ack.
                self.covered.discard(entry.entry_id)
                covered_ids.append(entry.entry_id)
                covered_marks[record.prompt_id] = Mark(record.prompt_id, "trained", tag)
                continue
            reason = self._admit(record, tag, settled.get(record.prompt_id))
            if reason is not None:
                duplicates.append(entry)
                reasons.append(reason)
                continue
            processing = self.processings[record.prompt_id]
            if processing.decision == STALE:  # the rest of a processing dropped as stale goes the same way
                stale.append((entry.entry_id, record))
                continue
            processing.buffered.add(record.record_id)
            self.buffer.append((entry.entry_id, record, entry.payload))
        if covered_ids:
            self.queue.ack(covered_ids, marks=list(covered_marks.values()))
        if duplicates:
            # Another processing of a prompt already trained (a worker that lost its lease, a replay) or a second
            # copy of a record: kept for inspection with the reason, never trained.
            log.warning("dead-lettering %d duplicate record(s): %s", len(duplicates), reasons[0])
            self.queue.dead_letter(duplicates, reasons)
            self.duplicates_dropped += len(duplicates)
            incr_stats(self.client, self.keys, records_duplicate=len(duplicates))
        if stale:
            self._drop(stale, newly_stale=0)

    def _admit(self, record: ExperienceRecord, tag: str, settled: tuple[str, str] | None) -> str | None:
        """None if `record` belongs to the processing this learner trains for its prompt; else why it is a duplicate."""
        prompt = record.prompt_id
        processing = self.processings.get(prompt)
        if processing is None:
            if settled is not None:
                state, by = settled
                if by == tag:
                    return f"duplicate: a copy of record {record.record_id}; prompt {prompt} is already {state}"
                return (f"duplicate: prompt {prompt} is already {state} by processing {by}; this record "
                        f"({record.record_id}) is from processing {tag}")
            processing = self.processings[prompt] = Processing(tag, processing_records(record))
            self._forget_oldest()
        elif processing.tag != tag:
            return (f"duplicate: prompt {prompt} is trained from processing {processing.tag}; this record "
                    f"({record.record_id}) is from processing {tag}")
        if record.record_id in processing.done or record.record_id in processing.buffered:
            return f"duplicate: a second copy of record {record.record_id} of processing {tag}"
        return None

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
        """Drop every buffered processing more than max_staleness versions old, whole (none of it in a batch yet)."""
        newly = 0
        for _, record, _ in self.buffer:
            processing = self.processings[record.prompt_id]
            if processing.decision is None and version - record.policy_version > self.max_staleness:
                processing.decision = STALE
                newly += 1
        if not newly:
            return
        stale = [(eid, r) for eid, r, _ in self.buffer if self.processings[r.prompt_id].decision == STALE]
        self.buffer = [item for item in self.buffer if self.processings[item[1].prompt_id].decision != STALE]
        self._drop(stale, newly)

    def _drop(self, stale: list[tuple[str, ExperienceRecord]], newly_stale: int) -> None:
        marks = {r.prompt_id: Mark(r.prompt_id, "dropped_stale", processing_tag(r)) for _, r in stale}
        self.queue.ack([eid for eid, _ in stale], marks=list(marks.values()))
        for _, record in stale:
            self._done(record)
        for prompt in marks:
            self._settled(prompt)
        incr_stats(self.client, self.keys, samples_dropped_stale=len(stale), prompts_dropped_stale=newly_stale)
        self.dropped_stale += len(stale)

    def take_dropped_stale(self) -> int:
        dropped, self.dropped_stale = self.dropped_stale, 0
        return dropped

    # ---- after the step -----------------------------------------------------------------------------------------
    def trained(self, records: list[ExperienceRecord]) -> None:
        for record in records:
            self._done(record)
        self.records_trained += len(records)

    def hold(self, entry_ids: list[str], records: list[ExperienceRecord]) -> None:
        """Trained entries wait for their ack (the next checkpoint, or now without checkpoints)."""
        self.held.extend((eid, r.prompt_id, processing_tag(r)) for eid, r in zip(entry_ids, records))

    def ack_held(self) -> None:
        marks = {prompt: Mark(prompt, "trained", tag) for _, prompt, tag in self.held}
        self.queue.ack([eid for eid, _, _ in self.held], marks=list(marks.values()))
        self.held = []
        for prompt in marks:
            self._settled(prompt)

    def skipped(self, reason: str) -> None:
        """The step of the batch handed out last trained nothing (a non-finite loss): its records are dead-lettered
        with the reason, for a person to inspect, and their prompts settled so."""
        batch, self.in_step = self.in_step, []
        entries = [StreamEntry(eid, payload) for eid, _, payload in batch]
        marks = {r.prompt_id: Mark(r.prompt_id, "dead_lettered", processing_tag(r)) for _, r, _ in batch}
        self.queue.dead_letter(entries, [reason] * len(entries), marks=list(marks.values()))
        for _, record, _ in batch:
            self._done(record)
        for prompt in marks:
            self._settled(prompt)

    def _done(self, record: ExperienceRecord) -> None:
        processing = self.processings.get(record.prompt_id)
        if processing is not None:
            processing.buffered.discard(record.record_id)
            processing.done.add(record.record_id)

    def _settled(self, prompt: str) -> None:
        processing = self.processings.get(prompt)
        if processing is None:
            return
        processing.settled = True
        if processing.finished:
            del self.processings[prompt]  # from now on the ledger knows it

    def _forget_oldest(self) -> None:
        """Keep at most recent_capacity processings: the oldest settled ones go first (the ledger knows them)."""
        excess = len(self.processings) - self.recent_capacity
        if excess <= 0:
            return
        for prompt in [p for p, proc in self.processings.items() if proc.settled and not proc.buffered][:excess]:
            del self.processings[prompt]

    # ---- checkpoints and the run's accounting -------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint of this step keeps: the processings under way (bounded: not the run's history) and the
        entries the checkpoint covers whose acks are sent just after it is written."""
        return {"intake": {
            "processings": {prompt: proc.to_json() for prompt, proc in self.processings.items() if proc.done},
            "covered_entries": [eid for eid, _, _ in self.held],
        }}

    def restore(self, state: dict) -> None:
        intake = state.get("intake") or {}
        self.processings = OrderedDict(
            (prompt, Processing.from_json(data)) for prompt, data in intake.get("processings", {}).items())
        self.covered = set(intake.get("covered_entries", ()))

    def accounting(self) -> dict:
        return {"records_trained": self.records_trained, "duplicates_dropped": self.duplicates_dropped}


def _claimed_mark(payload: bytes) -> Mark | None:
    """The ledger mark of a record that cannot be used, if its bytes still name a prompt id: dead_lettered."""
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True).get("fields") or {}
        prompt = fields.get("prompt_id")
        metadata = fields.get("metadata") if isinstance(fields.get("metadata"), dict) else {}
        tag = metadata.get(PROCESSING_TAG)
        if not isinstance(tag, str) or not tag:
            tag = fields.get("group_id", "").split("/", 1)[0] if isinstance(fields.get("group_id"), str) else "-"
    except Exception:
        return None
    if not isinstance(prompt, str) or not prompt:
        return None
    return Mark(prompt, "dead_lettered", tag or "-")
