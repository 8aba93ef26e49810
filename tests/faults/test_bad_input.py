"""Bad input against the real roles: poison queue entries go to the dead-letter stream, a hanging or garbage
verifier scores 0 and is counted, and the worker carries on.

Real redis-server, a real RolloutActor (HF engine, tiny random Llama, no Ray) and a real Learner (DeepSpeed).
"""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest

from resetrl.actors.rollout_actor import RolloutActor
from resetrl.config import ModelConfig, config_from_dict
from resetrl.learner.learner import Learner
from resetrl.models import resolve_model
from resetrl.queue import StreamQueue
from resetrl.record import ExperienceRecord, PromptRecord, decode_experience, encode_experience, encode_prompt
from resetrl.run_state import EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys, ledger_summary, read_stats
from resetrl.verifiers import register
from resetrl.verifiers.guard import abandoned_threads

_release = threading.Event()


@register("test-hangs")
def hanging_verifier(response_text: str, prompt: PromptRecord) -> float:
    _release.wait(30)  # a verifier stuck on a pathological input
    return 1.0


@register("test-garbage")
def garbage_verifier(response_text: str, prompt: PromptRecord) -> float:
    return float("nan")


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model(ModelConfig(name="tiny-llama"))


def config(run_name: str, verifier: str = "math", **learner):
    return config_from_dict({
        "run_name": run_name, "seed": 0,
        "model": {"name": "tiny-llama"},
        "rollout": {"engine": "hf", "group_size": 2, "prompts_per_batch": 2, "max_new_tokens": 4},
        "algorithm": {"verifier": verifier, "verifier_timeout_s": 0.5},
        "learner": {"prompts_per_step": 1, "micro_batch_size": 2, "read_block_ms": 100, **learner},
    })


def wrong_version(payload: bytes) -> bytes:
    message = msgpack.unpackb(payload, raw=False)
    message["version"] = 99
    return msgpack.packb(message, use_bin_type=True)


GOOD_PROMPT = PromptRecord(prompt_id="p1", question="1 + 1", answer="2", task="basic_arithmetic")


def test_bad_prompt_entries_are_dead_lettered_and_the_good_one_is_used(redis_server, redis_client, tiny_path, tmp_path):
    cfg = config("bad-prompts")
    keys = RunKeys(cfg.run_name)
    actor = RolloutActor(cfg, 0, str(tiny_path), redis_server.url, str(tmp_path / "weights"))
    prompts = StreamQueue(redis_client, keys.prompts, PROMPT_GROUP, "driver", ledger=keys.ledger_keys)
    prompts.ensure_group()
    StreamQueue(redis_client, keys.experience, EXPERIENCE_GROUP, "driver").ensure_group()
    # Fed as the driver feeds (each prompt id enters the ledger), so the ledger must account for the bad two.
    prompts.feed(keys.prompts_fed, 0, [b"\xff\xfe corrupt", wrong_version(encode_prompt(GOOD_PROMPT)),
                                  encode_prompt(GOOD_PROMPT)], ["p-corrupt", "p-v99", GOOD_PROMPT.prompt_id])

    done = actor.process(actor.prompts.read(count=10))
    assert done["prompts"] == 1 and done["samples"] == 2
    dead = prompts.dead_letters()
    assert [d["payload"][:3] for d in dead][0] == b"\xff\xfe "
    assert "not a msgpack record" in dead[0]["reason"] or "format" in dead[0]["reason"]
    assert "version 99" in dead[1]["reason"] and dead[1]["consumer"] == "rollout-0"
    assert read_stats(redis_client, keys)["prompts_rejected"] == 2
    assert prompts.depth() == 0 and prompts.pending_count() == 0  # all three acknowledged
    # They were counted lost: the worker dead-lettered them without settling their prompt ids in the ledger.
    ledger = ledger_summary(redis_client, keys)
    assert ledger["dead_lettered"] == 2 and ledger["lost"] == 0, ledger
    actor.close()


@pytest.mark.parametrize("verifier, counter", [("test-hangs", "verifier_timeouts"), ("test-garbage", "verifier_errors")])
def test_a_hanging_or_garbage_verifier_scores_0_and_the_worker_carries_on(
    redis_server, redis_client, tiny_path, tmp_path, verifier, counter
):
    cfg = config(f"verifier-{verifier}", verifier=verifier)
    keys = RunKeys(cfg.run_name)
    actor = RolloutActor(cfg, 0, str(tiny_path), redis_server.url, str(tmp_path / "weights"))
    prompts = StreamQueue(redis_client, keys.prompts, PROMPT_GROUP, "driver")
    prompts.ensure_group()
    experience = StreamQueue(redis_client, keys.experience, EXPERIENCE_GROUP, "test")
    experience.ensure_group()
    for round_ in range(2):  # the worker is still usable after the first batch
        prompts.put(encode_prompt(PromptRecord(f"p{round_}", "1 + 1", "2", "basic_arithmetic")))
        started = time.monotonic()
        assert actor.process(actor.prompts.read(count=1))["samples"] == 2
        assert time.monotonic() - started < 10  # 2 samples x 0.5 s limit, plus generation
    records = [decode_experience(e.payload) for e in experience.read(count=10)]
    assert len(records) == 4 and all(r.reward == 0.0 for r in records)
    assert all(np.isfinite(r.advantages).all() for r in records)
    stats = read_stats(redis_client, keys)
    assert stats[counter] == 4 and stats["verifier_errors"] == 4
    if verifier == "test-hangs":
        assert abandoned_threads() >= 1
        _release.set()
    actor.close()


def good_records() -> list[ExperienceRecord]:
    """Two well-formed records of one prompt, advantages -1 and +1: a step that trains on them is finite."""
    return [
        ExperienceRecord(
            record_id=f"r{i}", prompt_id="p", group_id="g", method="grpo", policy_version=0,
            token_ids=np.array([1, 2, 3, 4, 5, 6], dtype=np.int32), prompt_length=3,
            loss_mask=np.array([0, 0, 0, 1, 1, 1], dtype=np.uint8),
            advantages=np.array([0, 0, 0, 1, 1, 1], dtype=np.float32) * (1 if i else -1),
            behaviour_logprobs=np.array([0, 0, 0, -10, -10, -10], dtype=np.float32), reward=float(i), temperature=1.0,
        )
        for i in range(2)
    ]


def learner_and_queue(run_name: str, redis_server, redis_client, tiny_path, tmp_path):
    """A learner of the tiny model on run `run_name`, and a producer on its experience stream."""
    cfg = config(run_name)
    keys = RunKeys(cfg.run_name)
    learner = Learner(cfg, str(tiny_path), redis_server.url, weights_root=str(tmp_path / "weights"))
    return keys, learner, StreamQueue(redis_client, keys.experience, EXPERIENCE_GROUP, "producer")


def other_prompts_record(good: ExperienceRecord, name: str) -> ExperienceRecord:
    """`good` as the record of another prompt: a dead-lettered record settles its own prompt in the ledger."""
    return ExperienceRecord(**{**good.__dict__, "record_id": name, "prompt_id": f"p-{name}", "group_id": f"g-{name}"})


def test_bad_experience_entries_are_dead_lettered_and_the_step_trains_on_the_good_ones(
    redis_server, redis_client, tiny_path, tmp_path
):
    keys, learner, queue = learner_and_queue("bad-experience", redis_server, redis_client, tiny_path, tmp_path)
    good = good_records()
    bad = other_prompts_record(good[0], "bad")
    out_of_vocab = ExperienceRecord(**{**bad.__dict__, "record_id": "bad-ids",
                                       "token_ids": np.array([1, 2, 3, 4, 5, 10**8], dtype=np.int32)})
    queue.put_many([b"garbage", wrong_version(encode_experience(bad)), encode_experience(out_of_vocab),
                    *(encode_experience(r) for r in good)])
    metrics = learner.train_step(timeout_s=60)
    assert metrics["samples_trained"] == 2 and np.isfinite(metrics["loss"])
    dead = queue.dead_letters()
    assert len(dead) == 3 and "outside the vocabulary" in dead[2]["reason"]
    assert read_stats(redis_client, keys)["records_rejected"] == 3
    assert queue.depth() == 0 and queue.pending_count() == 0
    learner.close()


def poisoned(payload: bytes, **changes) -> bytes:
    """A decodable record with ill-typed or non-finite fields (fields as the msgpack map holds them)."""
    message = msgpack.unpackb(payload, raw=False)
    message["fields"].update(changes.pop("fields", {}))
    for name, array in changes.items():
        message["tensors"][name]["data"] = array.astype("<f4").tobytes()
    return msgpack.packb(message, use_bin_type=True)


def test_a_poison_record_is_dead_lettered_with_its_reason_and_the_learner_carries_on(
    redis_server, redis_client, tiny_path, tmp_path
):
    # Before issue 13, policy_version "7" passed the learner's checks and raised TypeError in its staleness check:
    # the entry stayed pending and crashed the learner again on every --resume.
    keys, learner, queue = learner_and_queue("poison-experience", redis_server, redis_client, tiny_path, tmp_path)
    good = good_records()
    template = encode_experience(other_prompts_record(good[0], "poison"))
    queue.put_many([
        poisoned(template, fields={"policy_version": "7"}),
        poisoned(template, advantages=np.array([0, 0, 0, np.nan, 1, 1])),
        poisoned(template, fields={"step_boundaries": [3, 99]}),
        *(encode_experience(r) for r in good),
    ])
    metrics = learner.train_step(timeout_s=60)
    assert metrics["samples_trained"] == 2 and np.isfinite(metrics["loss"])
    reasons = [d["reason"] for d in queue.dead_letters()]
    assert reasons == [
        "record 'poison': field 'policy_version' must be a non-negative integer, got str '7'",
        "record 'poison': advantages holds 1 non-finite values (first at token 3: nan)",
        "record 'poison': step_boundaries [3, 99] must increase and lie in [prompt_length, length) = [3, 6)",
    ]
    assert read_stats(redis_client, keys)["records_rejected"] == 3
    assert queue.depth() == 0 and queue.pending_count() == 0  # acknowledged: never read again, on resume neither
    learner.close()
