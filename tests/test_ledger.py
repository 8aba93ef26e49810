"""The ledger: one terminal state per fed prompt id, set once in Redis when it happens; its summary does not come
from the learner's dedupe (resetrl/run_state.py ledger_summary). Real redis-server.
"""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from resetrl.cli import app
from resetrl.launch.train_loop import PromptFeeder
from resetrl.queue import Mark, StreamQueue
from resetrl.record import ExperienceRecord, PromptRecord, encode_experience
from resetrl.run_state import EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys, ledger_states, ledger_summary

KEYS = RunKeys("ledger")


def experience_record(prompt_id: str, index: int) -> ExperienceRecord:
    return ExperienceRecord(
        record_id=f"{prompt_id}@1-0/sft#sft", prompt_id=prompt_id, group_id=f"{prompt_id}@1-0/sft", method="superrl-sft",
        policy_version=0, token_ids=np.arange(1, 7, dtype=np.int32), prompt_length=2,
        loss_mask=np.array([0, 0, 1, 1, 1, 1], dtype=np.uint8), advantages=np.ones(6, dtype=np.float32),
        behaviour_logprobs=np.zeros(6, dtype=np.float32), reward=0.0, temperature=1.0,
        target_token_ids=np.arange(3, 7, dtype=np.int32), metadata={"processing": f"t{index}"},
    )


def test_every_fed_prompt_is_settled_in_flight_or_counted_lost(redis_server, redis_client):
    redis_url = redis_server.url
    problems = [PromptRecord(f"q{i}", f"{i} + 1", str(i + 1), "basic_arithmetic") for i in range(6)]
    prompts = StreamQueue(redis_client, KEYS.prompts, PROMPT_GROUP, "driver", ledger=KEYS.ledger_keys)
    prompts.ensure_group()
    PromptFeeder(prompts, problems, keys=KEYS).feed_until(6)
    worker = StreamQueue(redis_client, KEYS.prompts, PROMPT_GROUP, "rollout-0", ledger=KEYS.ledger_keys)
    learner = StreamQueue(redis_client, KEYS.experience, EXPERIENCE_GROUP, "learner-0", ledger=KEYS.ledger_keys)
    learner.ensure_group()
    e0, e1, e2, e3, e4 = worker.read(count=5)
    # SuperRL on SFT: one record per prompt for q0, q1; q2 had no signal; q3 is still being worked on.
    worker.complete(KEYS.experience, [(e0.entry_id, "q0.e0", [encode_experience(experience_record("q0.e0", 0))]),
                                      (e1.entry_id, "q1.e0", [encode_experience(experience_record("q1.e0", 0))]),
                                      (e2.entry_id, "q2.e0", [])], tag="t0")
    # q4: acknowledged and gone without a trace (what the old accounting hid behind prompts_without_records)
    worker.ack([e4.entry_id])
    r0, r1 = learner.read(count=2)
    learner.ack([r0.entry_id], marks=[Mark("q0.e0", "trained", "t0")])  # q1's record waits for its checkpoint
    summary = ledger_summary(redis_client, KEYS)
    assert summary == {"fed": 6, "trained": 1, "dropped_stale": 0, "dropped_no_signal": 1, "dead_lettered": 0,
                       "in_flight": 3, "lost": 1, "trained_twice": 0, "second_attempts": 0}  # in flight: q1, q3, q5
    status = CliRunner().invoke(app, ["status", "--redis-url", redis_url, "--run-name", KEYS.run_name])
    assert status.exit_code == 0 and json.loads(status.output)["ledger"] == summary  # what `resetrl status` shows


def test_a_settled_prompt_keeps_its_state_and_every_second_attempt_is_counted(redis_client):
    queue = StreamQueue(redis_client, KEYS.experience, EXPERIENCE_GROUP, "learner-0", ledger=KEYS.ledger_keys)
    queue.ensure_group()
    queue.ack([], marks=[Mark("a", "trained", "t1"), Mark("b", "dropped_stale", "t2")])
    queue.ack([], marks=[Mark("a", "trained", "t1")])  # the same settlement again (a replay): not an attempt
    queue.ack([], marks=[Mark("a", "trained", "t9"), Mark("b", "trained", "t3"), Mark("a", "dead_lettered", "t1")])
    assert ledger_states(redis_client, KEYS, ["a", "b", "c"]) == {"a": ("trained", "t1"), "b": ("dropped_stale", "t2")}
    summary = ledger_summary(redis_client, KEYS)
    assert (summary["trained"], summary["dropped_stale"]) == (1, 1)
    assert (summary["trained_twice"], summary["second_attempts"]) == (1, 3)
