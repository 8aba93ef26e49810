"""Learner checkpoints and resume, in process, against a real redis-server and real DeepSpeed (CPU, gloo).

A learner that stops between checkpoints is replaced by one that resumes from the newest checkpoint: it has the
checkpoint's policy version, weights and optimizer state, replays the entries trained after the checkpoint (never
acknowledged), and retraining them gives bit-identical weights to the first learner's. A record already trained
is not trained twice: the second copy is dead-lettered, and the ledger has every prompt trained once. The CLI-level kill (SIGKILL of the learner process, then `resetrl train --resume`) is in
test_kill_and_resume.py.
"""

from __future__ import annotations

import numpy as np
import torch

from resetrl.config import config_from_dict
from resetrl.learner.checkpoint import latest_checkpoint
from resetrl.learner.learner import Learner
from resetrl.queue import StreamQueue
from resetrl.record import ExperienceRecord, encode_experience
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys, ledger_summary, read_stats

VOCAB, PROMPT_LEN, RESPONSE_LEN = 300, 4, 8


def make_config(run_dir, checkpoint_every=2):
    return config_from_dict({
        "run_name": "r", "run_dir": str(run_dir),
        "rollout": {"group_size": 2, "max_new_tokens": RESPONSE_LEN},
        "learner": {"prompts_per_step": 2, "micro_batch_size": 2, "lr": 1e-3, "read_block_ms": 100,
                    "max_staleness": 10, "checkpoint_every": checkpoint_every},
    })


def record(step: int, i: int) -> ExperienceRecord:
    rng = np.random.default_rng(step * 1000 + i)
    response = np.arange(PROMPT_LEN + RESPONSE_LEN) >= PROMPT_LEN
    advantage = 1.0 if i % 2 == 0 else -1.0
    return ExperienceRecord(
        record_id=f"s{step}-r{i}", prompt_id=f"s{step}-p{i // 2}", group_id=f"s{step}-g{i // 2}", method="grpo",
        policy_version=0, token_ids=rng.integers(1, VOCAB, size=len(response)).astype(np.int32),
        prompt_length=PROMPT_LEN, loss_mask=response.astype(np.uint8),
        advantages=np.where(response, advantage, 0.0).astype(np.float32),
        behaviour_logprobs=np.where(response, -5.7, 0.0).astype(np.float32), reward=float(advantage > 0),
        temperature=1.0,
    )


def push_step(client, step: int) -> None:
    queue = StreamQueue(client, RunKeys("r").experience, EXPERIENCE_GROUP, "producer")
    queue.put_many([encode_experience(record(step, i)) for i in range(4)])


def weights(learner) -> dict:
    return {k: v.detach().clone() for k, v in learner.engine.module.state_dict().items()}


def test_resume_continues_exactly_and_never_trains_a_record_twice(redis_server, redis_client, tiny_model_dir, tmp_path):
    cfg = make_config(tmp_path / "run")
    experience = StreamQueue(redis_client, RunKeys("r").experience, EXPERIENCE_GROUP, "x")
    first = Learner(cfg, str(tiny_model_dir), redis_server.url, weights_root=str(tmp_path / "w1"))
    for step in (1, 2, 3):
        push_step(redis_client, step)
        assert first.train_step(timeout_s=60)["step"] == step
        if step == 2:
            at_checkpoint = weights(first)
    after_step_3 = weights(first)
    # checkpoint at step 2 acked steps 1-2; step 3 is trained but held until the next checkpoint
    assert latest_checkpoint(cfg.run_path / "checkpoints").name == "step-00000002"
    assert experience.pending_count() == 4 and experience.depth() == 4
    first.close()  # the learner dies here (between checkpoints)

    # a second copy of an already trained record (a rollout worker that died before acking its prompt)
    StreamQueue(redis_client, RunKeys("r").experience, EXPERIENCE_GROUP, "producer").put(encode_experience(record(1, 0)))

    second = Learner(cfg, str(tiny_model_dir), redis_server.url, weights_root=str(tmp_path / "w2"), resume=True)
    assert second.policy_version() == 2 and second.resumed_from == 2
    assert second.channel.latest()[0] == 2  # the checkpoint's weights are published for the actors
    restored = weights(second)
    assert all(torch.equal(restored[k], at_checkpoint[k]) for k in at_checkpoint)
    assert read_stats(redis_client, RunKeys("r"))["learner_steps"] == 2  # counters back at the checkpoint

    metrics = second.train_step(timeout_s=60)  # step 3 again, from the replayed (unacked) entries
    assert metrics["step"] == 3
    replayed = weights(second)
    # same model, optimizer state, batch and RNG: the same weights, bit for bit
    assert all(torch.equal(replayed[k], after_step_3[k]) for k in after_step_3)

    assert second.train_step(timeout_s=1) is None  # reads the second copy of s1-r0: dropped, not trained
    accounting = second.finish()  # final checkpoint at step 3, everything acked
    assert accounting["trained_twice"] == 0 and accounting["duplicates_dropped"] == 1
    assert accounting["records_trained"] == 4 and accounting["resumed_from_step"] == 2  # this process: step 3
    ledger = ledger_summary(redis_client, RunKeys("r"))  # 6 prompts, each trained once in the model's history
    assert (ledger["trained"], ledger["trained_twice"], ledger["second_attempts"]) == (6, 0, 0)
    [dead] = experience.dead_letters()
    assert dead["reason"].startswith("duplicate: a second copy of record s1-r0")
    stats = read_stats(redis_client, RunKeys("r"))
    assert stats["samples_trained"] == 12 and stats["learner_steps"] == 3 and stats["records_duplicate"] == 1
    assert experience.depth() == 0 and experience.pending_count() == 0
    assert latest_checkpoint(cfg.run_path / "checkpoints").name == "step-00000003"
    assert sorted(p.name for p in (cfg.run_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    second.close()


def test_resume_without_a_checkpoint_starts_from_the_initial_model(redis_server, redis_client, tiny_model_dir, tmp_path):
    learner = Learner(make_config(tmp_path / "run"), str(tiny_model_dir), redis_server.url,
                      weights_root=str(tmp_path / "w"), resume=True)
    assert learner.policy_version() == 0 and learner.resumed_from == 0
    learner.close()
