"""The learner trains each prompt entry at most once, whole, and never raises on a record (docs/design.md,
"Reliability contract"): real redis-server, real DeepSpeed (CPU, gloo), the tiny random Llama.

- a second processing of a prompt (a worker that died between pushing and acking, or lost its lease), whose record
  ids differ because the method branched differently (RRPO's fallback group vs a reset), is dead-lettered as a
  duplicate, not trained;
- a poison record that decodes (policy_version "7") is dead-lettered with its reason; the learner trains on;
- staleness is decided per processing: a group half in a batch is trained whole, a stale one dropped whole;
- the dedupe state a checkpoint keeps does not grow with the run.
"""

from __future__ import annotations

import json
import zlib

import msgpack
import numpy as np
import pytest

from resetrl.config import config_from_dict
from resetrl.learner.learner import Learner
from resetrl.queue import StreamQueue
from resetrl.record import ExperienceRecord, encode_experience
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys, read_stats

VOCAB, PROMPT_LEN, RESPONSE_LEN = 300, 4, 8
KEYS = RunKeys("once")


def make_config(run_dir, **learner):
    return config_from_dict({
        "run_name": KEYS.run_name, "run_dir": str(run_dir),
        "rollout": {"group_size": 2, "max_new_tokens": RESPONSE_LEN},
        "learner": {"prompts_per_step": 2, "micro_batch_size": 2, "lr": 1e-3, "read_block_ms": 100,
                    "max_staleness": 1, **learner},
    })


@pytest.fixture()
def learner(redis_server, redis_client, tiny_model_dir, tmp_path):
    made = []

    def build(**learner_options):
        made.append(Learner(make_config(tmp_path / "run", **learner_options), str(tiny_model_dir), redis_server.url,
                            weights_root=str(tmp_path / "weights")))
        return made[-1]

    yield build
    for one in made:
        one.close()


def record(record_id: str, prompt_id: str, group_id: str, tag: str, count: int, version: int = 0,
           advantage: float = 1.0) -> ExperienceRecord:
    """One record of the processing `tag` of prompt `prompt_id`, which made `count` records for it (the metadata a
    rollout worker writes: actors/rollout_actor.py)."""
    rng = np.random.default_rng(zlib.crc32(record_id.encode()))
    response = np.arange(PROMPT_LEN + RESPONSE_LEN) >= PROMPT_LEN
    return ExperienceRecord(
        record_id=record_id, prompt_id=prompt_id, group_id=group_id, method="rrpo", policy_version=version,
        token_ids=rng.integers(1, VOCAB, size=len(response)).astype(np.int32), prompt_length=PROMPT_LEN,
        loss_mask=response.astype(np.uint8), advantages=np.where(response, advantage, 0.0).astype(np.float32),
        behaviour_logprobs=np.where(response, -5.7, 0.0).astype(np.float32), reward=float(advantage > 0),
        temperature=1.0, metadata={"processing": tag, "processing_records": count},
    )


def processing(prompt: str, tag: str, group_suffixes: list[str], version: int = 0) -> list[ExperienceRecord]:
    entry = f"{prompt}@1-0"
    return [record(f"{entry}{suffix}", prompt, f"{entry}{suffix.split('#')[0]}", tag, len(group_suffixes), version,
                   advantage=1.0 if i % 2 == 0 else -1.0)
            for i, suffix in enumerate(group_suffixes)]


def push(client, records) -> None:
    StreamQueue(client, KEYS.experience, EXPERIENCE_GROUP, "rollout-0").put_many([encode_experience(r) for r in records])


def experience(client) -> StreamQueue:
    return StreamQueue(client, KEYS.experience, EXPERIENCE_GROUP, "test")


def test_a_second_processing_of_a_prompt_is_dead_lettered_not_trained(learner, redis_client):
    first = learner()
    # The same prompt entry processed twice: RRPO found a failed parent the first time (G1 + a reset's G2), the
    # second time every fresh sample succeeded (the fallback group): different record ids, same prompt entry.
    reset = processing("a", "t1", ["/g1#0", "/g1#1", "/g2.0#0", "/g2.0#1"])
    fallback = processing("a", "t2", ["#0", "#1", "#2", "#3"])
    other = processing("b", "t3", ["#0", "#1", "#2", "#3"])
    push(redis_client, reset + fallback + other)
    trained = []
    for _ in range(2):
        metrics = first.train_step(timeout_s=30)
        assert metrics is not None
        trained.append(metrics["samples_trained"])
    assert first.train_step(timeout_s=1) is None  # nothing left to train: the second processing was not
    dead = experience(redis_client).dead_letters()
    assert len(dead) == 4 and all(d["reason"].startswith("duplicate: prompt a is ") and "processing t1" in d["reason"]
                                  and "from processing t2" in d["reason"] for d in dead), dead
    stats = read_stats(redis_client, KEYS)
    assert trained == [4, 4] and stats["samples_trained"] == 8 and stats["records_duplicate"] == 4
    assert experience(redis_client).depth() == 0


def test_a_poison_record_that_decodes_is_dead_lettered_and_the_learner_trains_on(learner, redis_client):
    first = learner()
    good = processing("a", "t1", ["#0", "#1", "#2", "#3"])
    # policy_version "7": well-formed msgpack of the right format version, but a string where an int belongs
    message = msgpack.unpackb(encode_experience(record("x@1-0#0", "x", "x@1-0", "t9", 1)), raw=False)
    message["fields"]["policy_version"] = "7"
    StreamQueue(redis_client, KEYS.experience, EXPERIENCE_GROUP, "rollout-0").put_many(
        [msgpack.packb(message, use_bin_type=True)] + [encode_experience(r) for r in good])
    metrics = first.train_step(timeout_s=30)
    assert metrics is not None and metrics["samples_trained"] == 4
    [dead] = experience(redis_client).dead_letters()
    assert "policy_version" in dead["reason"] and "'7'" in dead["reason"]
    assert read_stats(redis_client, KEYS)["records_rejected"] == 1 and experience(redis_client).depth() == 0


def test_a_group_half_in_a_batch_is_trained_whole_however_stale_the_rest_becomes(learner, redis_client):
    first = learner(max_staleness=0)
    big = processing("a", "t1", [f"/g1#{i}" for i in range(6)], version=0)  # 6 records: 4 fit in step 1
    push(redis_client, big)
    assert first.train_step(timeout_s=30)["samples_trained"] == 4  # now at version 1: big's last 2 are 1 behind
    push(redis_client, processing("b", "t2", ["#0", "#1"], version=1))
    metrics = first.train_step(timeout_s=10)
    assert metrics is not None and metrics["samples_trained"] == 4  # big's last 2 with b's 2: none dropped
    stats = read_stats(redis_client, KEYS)
    assert stats.get("samples_dropped_stale", 0) == 0 and experience(redis_client).depth() == 0


def test_a_stale_processing_is_dropped_whole_and_counted_once(learner, redis_client):
    first = learner(max_staleness=0)
    push(redis_client, processing("a", "t1", ["#0", "#1", "#2", "#3"], version=0))
    assert first.train_step(timeout_s=30)["samples_trained"] == 4
    old = processing("b", "t2", [f"/g1#{i}" for i in range(6)], version=0)  # a whole processing 1 version behind
    push(redis_client, old[:3])
    assert first.train_step(timeout_s=1) is None
    push(redis_client, old[3:] + processing("c", "t3", ["#0", "#1", "#2", "#3"], version=1))
    assert first.train_step(timeout_s=30)["samples_trained"] == 4  # c's; b's 6 went, in two reads
    stats = read_stats(redis_client, KEYS)
    assert stats["samples_dropped_stale"] == 6 and stats["prompts_dropped_stale"] == 1


def test_the_dedupe_state_in_a_checkpoint_does_not_grow_with_the_run(learner, redis_client, tmp_path):
    first = learner(checkpoint_every=1, checkpoint_keep=10)
    sizes = []
    for step in range(1, 7):
        push(redis_client, processing(f"p{step}a", f"t{step}a", ["#0", "#1"], version=step - 1)
             + processing(f"p{step}b", f"t{step}b", ["#0", "#1"], version=step - 1))
        assert first.train_step(timeout_s=30)["step"] == step
        state = json.loads((tmp_path / "run" / "checkpoints" / f"step-{step:08d}" / "learner_state.json").read_text())
        state.pop("counters")  # counter values are numbers that grow; what is kept per record or prompt must not
        sizes.append(len(json.dumps(state)) - len(str(step)))
    assert max(sizes) - min(sizes) <= 8, sizes


def test_a_methods_random_draws_are_the_same_for_an_entry_whichever_worker_processes_it():
    # RRPO's reset steps and SRL's instances come from entry_rng: two workers (two contexts, two processes' worth of
    # other random state) processing the same prompt entry draw the same, so a replay given the same samples makes
    # the same record ids; another entry or another run seed draws otherwise.
    import random
    from types import SimpleNamespace

    from resetrl.methods.base import entry_rng

    def draws(seed: int, group_id: str) -> list[int]:
        random.seed()  # each worker's global random state differs (system entropy); it must not matter
        ctx = SimpleNamespace(cfg=config_from_dict({"seed": seed}))
        return [entry_rng(ctx, group_id).randrange(1_000_000) for _ in range(5)]

    first = draws(0, "p1@1700000000000-0")
    assert draws(0, "p1@1700000000000-0") == first
    assert draws(0, "p1@1700000000000-1") != first
    assert draws(1, "p1@1700000000000-0") != first
