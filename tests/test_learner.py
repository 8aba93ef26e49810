"""The learner against a real redis-server, real DeepSpeed (CPU, gloo) and a tiny random Llama.

The first DeepSpeed start in a fresh environment builds its shm comm op (~70-90 s on 2 cores) into
~/.cache/resetrl/torch_extensions; later starts take about a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from resetrl.config import config_from_dict
from resetrl.learner.learner import Learner
from resetrl.queue import StreamQueue
from resetrl.record import ExperienceRecord, encode_experience
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys, read_stats, request_stop
from resetrl.weights import WEIGHTS_FILE, SharedFolderWeightChannel

VOCAB = 300
PROMPT_LEN, RESPONSE_LEN = 4, 8
RECORDS_PER_STEP = 4  # prompts_per_step 2 x group_size 2


def make_config(run_name: str, learner: dict | None = None, algorithm: dict | None = None):
    return config_from_dict({
        "run_name": run_name,
        "rollout": {"group_size": 2, "max_new_tokens": RESPONSE_LEN},
        "learner": {"prompts_per_step": 2, "micro_batch_size": 2, "lr": 1e-3, "read_block_ms": 100,
                    "max_staleness": 1, **(learner or {})},
        "algorithm": algorithm or {},
    })


@pytest.fixture()
def make_learner(redis_server, redis_client, tiny_model_dir, tmp_path):
    learners = []

    def build(run_name="t", **overrides):
        learner = Learner(make_config(run_name, **overrides), str(tiny_model_dir), redis_server.url,
                          weights_root=str(tmp_path / "weights"))
        learners.append(learner)
        return learner

    yield build
    for learner in learners:
        learner.close()


def record(i: int, policy_version: int = 0, advantage: float = 1.0, seed: int = 0) -> ExperienceRecord:
    rng = np.random.default_rng(seed * 1000 + i)
    length = PROMPT_LEN + RESPONSE_LEN
    response = np.arange(length) >= PROMPT_LEN
    return ExperienceRecord(
        record_id=f"rec-{seed}-{i}", prompt_id=f"p{i // 2}", group_id=f"g{i // 2}", method="grpo",
        policy_version=policy_version, token_ids=rng.integers(1, VOCAB, size=length).astype(np.int32),
        prompt_length=PROMPT_LEN, loss_mask=response.astype(np.uint8),
        advantages=np.where(response, advantage, 0.0).astype(np.float32),
        # about log(1/300): what a near-uniform random model gives, so ratios start near 1
        behaviour_logprobs=np.where(response, -5.7, 0.0).astype(np.float32),
        reward=1.0 if advantage > 0 else 0.0, temperature=1.0,
    )


def push(client, run_name: str, records: list[ExperienceRecord]) -> None:
    queue = StreamQueue(client, RunKeys(run_name).experience, EXPERIENCE_GROUP, "test-producer")
    queue.put_many([encode_experience(r) for r in records])


def group_of_four(policy_version=0, seed=0, advantages=(1.0, -1.0, 1.0, -1.0)):
    return [record(i, policy_version, a, seed) for i, a in enumerate(advantages)]


def assert_queue_drained(client, run_name="t"):
    queue = StreamQueue(client, RunKeys(run_name).experience, EXPERIENCE_GROUP, "x")
    assert queue.depth() == 0
    assert queue.pending_count() == 0


def test_steps_publish_new_weights_then_ack(make_learner, redis_client, tiny_model_dir):
    learner = make_learner()
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    push(redis_client, "t", group_of_four())
    metrics = learner.train_step(timeout_s=60)
    assert metrics["step"] == 1 and learner.policy_version() == 1
    assert metrics["samples_trained"] == RECORDS_PER_STEP and not metrics["skipped"]
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert metrics["reward_mean"] == 0.5 and metrics["response_len_mean"] == RESPONSE_LEN
    assert_queue_drained(redis_client)

    version, path = learner.channel.latest()
    assert version == 1 and path.endswith("v000001")
    assert int(redis_client.get(RunKeys("t").learner_version)) == 1
    published = load_file(f"{path}/{WEIGHTS_FILE}")
    assert "lm_head.weight" not in published  # tied to the embedding, which is written
    assert set(published) == set(initial) - {"lm_head.weight"}
    assert any(not torch.equal(published[name], initial[name]) for name in published)

    # the folder is what an HF engine loads: strict=False because the tied head is re-tied, not read
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    missing, unexpected = model.load_state_dict(published, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    assert torch.equal(model.lm_head.weight, published["model.embed_tokens.weight"])

    push(redis_client, "t", group_of_four(policy_version=1, seed=1))
    metrics = learner.train_step(timeout_s=60)
    assert metrics["step"] == 2 and learner.channel.latest()[0] == 2
    stats = read_stats(redis_client, RunKeys("t"))
    assert stats["samples_trained"] == 8 and stats["learner_steps"] == 2
    assert stats["tokens_trained"] == 8 * RESPONSE_LEN  # every response token of the two steps
    assert stats["records_trained_suffix_only"] == 0  # GRPO records train on the whole response
    assert_queue_drained(redis_client)


def test_zero_advantages_give_zero_loss(make_learner, redis_client):
    learner = make_learner()
    push(redis_client, "t", group_of_four(advantages=(0.0, 0.0, 0.0, 0.0)))
    metrics = learner.train_step(timeout_s=60)
    assert metrics["loss"] == 0.0 and metrics["clip_fraction"] == 0.0


def test_stale_records_are_dropped_and_a_garbage_entry_is_rejected(make_learner, redis_client):
    learner = make_learner(learner={"max_staleness": 0})
    push(redis_client, "t", group_of_four())
    assert learner.train_step(timeout_s=60)["policy_version"] == 1
    # version 0 records are now one version old: more than max_staleness 0
    push(redis_client, "t", [record(9, policy_version=0, seed=2), record(10, policy_version=0, seed=2)])
    StreamQueue(redis_client, RunKeys("t").experience, EXPERIENCE_GROUP, "p").put(b"\x93not a record")
    push(redis_client, "t", group_of_four(policy_version=1, seed=3))
    metrics = learner.train_step(timeout_s=60)
    assert metrics["policy_version"] == 2
    assert metrics["samples_dropped_stale"] == 2 and metrics["samples_trained"] == RECORDS_PER_STEP
    stats = read_stats(redis_client, RunKeys("t"))
    assert stats["samples_dropped_stale"] == 2 and stats["records_rejected"] == 1
    assert_queue_drained(redis_client)


def test_timeout_keeps_what_was_read_and_stop_returns_none(make_learner, redis_client):
    learner = make_learner()
    push(redis_client, "t", group_of_four()[:2])
    assert learner.train_step(timeout_s=0.5) is None
    push(redis_client, "t", group_of_four()[2:])
    assert learner.train_step(timeout_s=60)["samples_trained"] == RECORDS_PER_STEP
    request_stop(redis_client, RunKeys("t"))
    assert learner.train_step() is None


def test_a_restarted_learner_replays_its_pending_entries(make_learner, redis_client):
    first = make_learner()
    push(redis_client, "t", group_of_four()[:3])
    assert first.train_step(timeout_s=0.5) is None  # holds 3 entries, unacknowledged
    first.close()
    assert StreamQueue(redis_client, RunKeys("t").experience, EXPERIENCE_GROUP, "x").pending_count() == 3

    second = make_learner()
    push(redis_client, "t", group_of_four()[3:])
    metrics = second.train_step(timeout_s=60)
    assert metrics["samples_trained"] == RECORDS_PER_STEP
    assert_queue_drained(redis_client)


def test_a_non_finite_loss_skips_the_step(make_learner, redis_client):
    learner = make_learner()
    before = {k: v.clone() for k, v in learner.engine.module.state_dict().items()}
    # finite inputs whose token-mean loss overflows float32: 32 tokens x -3e38
    push(redis_client, "t", group_of_four(advantages=(3e38, 3e38, 3e38, 3e38)))
    metrics = learner.train_step(timeout_s=60)
    assert metrics["skipped"] and learner.policy_version() == 0 and learner.channel.latest() is None
    assert read_stats(redis_client, RunKeys("t")) == {"steps_skipped_nonfinite": 1}
    assert_queue_drained(redis_client)
    after = learner.engine.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and the next step is an ordinary one
    push(redis_client, "t", group_of_four(seed=1))
    metrics = learner.train_step(timeout_s=60)
    assert not metrics["skipped"] and learner.policy_version() == 1 and np.isfinite(metrics["loss"])


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_other_zero_stages_with_a_kl_penalty(make_learner, redis_client, tiny_model_dir, zero_stage):
    learner = make_learner(learner={"zero_stage": zero_stage}, algorithm={"kl_coef": 0.1, "dual_clip": 3.0})
    push(redis_client, "t", group_of_four(advantages=(3e38,) * 4))
    assert learner.train_step(timeout_s=60)["skipped"]
    push(redis_client, "t", group_of_four(seed=1))
    metrics = learner.train_step(timeout_s=60)
    # KL exactly 0 before this step's update: the skipped step left the policy equal to the reference
    assert metrics["policy_version"] == 1 and metrics["kl"] == 0.0
    push(redis_client, "t", group_of_four(policy_version=1, seed=2))
    metrics = learner.train_step(timeout_s=60)
    assert metrics["kl"] > 0
    published = load_file(f"{learner.channel.latest()[1]}/{WEIGHTS_FILE}")
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert published["model.embed_tokens.weight"].shape == initial["model.embed_tokens.weight"].shape
    assert not torch.equal(published["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_the_weight_folder_keeps_the_newest_versions(redis_client, tmp_path):
    channel = SharedFolderWeightChannel(tmp_path, redis_client, RunKeys("w"), keep=3)
    assert channel.latest() is None
    embedding = torch.arange(6.0).view(3, 2)
    for version in range(1, 6):
        path = channel.publish({"model.embed_tokens.weight": embedding, "lm_head.weight": embedding}, version)
    assert channel.latest() == (5, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000003", "v000004", "v000005"]
    assert list(load_file(f"{path}/{WEIGHTS_FILE}")) == ["model.embed_tokens.weight"]



def mixed_step() -> list[ExperienceRecord]:
    """6 records of 3 prompts: a GRPO pair sharing its prompt; on the same prompt a reset pair sharing prompt + a
    parent prefix, trained on its suffix only; a supervised record (a repair) of a second prompt; a third prompt's
    single sample, longer than the others."""
    rng = np.random.default_rng(7)
    tokens = lambda n: rng.integers(1, VOCAB, n).astype(np.int32)  # noqa: E731
    p0, p1, p2, prefix = tokens(6), tokens(5), tokens(4), tokens(5)

    def make(name, prompt, response, context=(), advantage=1.0, supervised=False):
        ids = np.concatenate([prompt, np.asarray(context, np.int32), response]).astype(np.int32)
        mask = (np.arange(len(ids)) >= len(prompt) + len(context)).astype(np.uint8)
        return ExperienceRecord(
            record_id=name, prompt_id=name.split("/")[0], group_id=name.rsplit("#", 1)[0], method="grpo",
            policy_version=0, token_ids=ids, prompt_length=len(prompt), loss_mask=mask,
            advantages=np.where(mask, advantage, 0.0).astype(np.float32),
            behaviour_logprobs=np.where(mask, -5.7, 0.0).astype(np.float32), reward=float(advantage > 0),
            temperature=0.8, target_token_ids=ids[len(prompt):].copy() if supervised else None,
        )

    return [
        make("a/g1#0", p0, tokens(7), advantage=1.0), make("a/g1#1", p0, tokens(4), advantage=-1.0),
        make("a/g2#0", p0, tokens(6), context=prefix, advantage=0.8),
        make("a/g2#1", p0, tokens(3), context=prefix, advantage=-0.8),
        make("b/repair#0", p1, tokens(6), supervised=True), make("c/g#0", p2, tokens(20), advantage=0.5),
    ]


# One record per micro-batch and row, as before packing; one row per prompt, all in one micro-batch; micro-batches
# of at most 24 tokens: prompt a's 27-token tree splits into rows of 15 and 18 tokens, and no two rows fit together.
PACKINGS = {
    "one_record_per_micro_batch": {"shared_prefix": False, "max_tokens_per_micro_batch": None, "micro_batch_size": 1},
    "shared_one_micro_batch": {"shared_prefix": True},
    "shared_small_budget": {"shared_prefix": True, "max_tokens_per_micro_batch": 24},
}


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_the_step_is_the_same_however_the_records_are_packed(make_learner, redis_client, zero_stage):
    steps = {}
    for name, packing in PACKINGS.items():
        learner = make_learner(name, learner={"prompts_per_step": 3, "zero_stage": zero_stage, **packing},
                               algorithm={"kl_coef": 0.05})
        push(redis_client, name, mixed_step())
        metrics = learner.train_step(timeout_s=60)
        assert metrics["samples_trained"] == 6 and not metrics["skipped"]
        steps[name] = (metrics, {k: v.detach().clone() for k, v in learner.engine.module.state_dict().items()})
    reference, weights = steps["one_record_per_micro_batch"]
    assert reference["micro_batches"] == 6 and steps["shared_one_micro_batch"][0]["micro_batches"] == 1
    assert steps["shared_small_budget"][0]["micro_batches"] == 4
    # the prefix trees run fewer tokens than the six records do
    assert steps["shared_one_micro_batch"][0]["forward_tokens"] < sum(len(r.token_ids) for r in mixed_step())
    for name in ("shared_one_micro_batch", "shared_small_budget"):
        metrics, packed = steps[name]
        for key in ("loss", "pg_loss", "sft_loss", "kl", "clip_fraction", "ratio_mean", "approx_kl", "grad_norm"):
            if reference[key] is None:  # DeepSpeed reports no gradient norm without ZeRO
                assert metrics[key] is None and zero_stage == 0, (name, key)
                continue
            assert metrics[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-8), (name, key)
        # Adam's first step moves a weight by about lr = 1e-3 whatever its gradient's size, so a gradient near Adam's
        # eps (1e-8) turns float noise into ~1e-6: 1e-5 is 1% of the step (as in tests/test_learner_multirank.py).
        for key, tensor in weights.items():
            torch.testing.assert_close(packed[key], tensor, rtol=0, atol=1e-5, msg=f"{name}: {key}")
