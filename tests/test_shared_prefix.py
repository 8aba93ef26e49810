"""Shared-prefix packing (resetrl/algorithms/shared_prefix.py, learner/packing.py) against the unshared computation.

The specification: a batch mixing a GRPO group (shared prompt), a reset group (shared prompt + parent prefix, trained
on the suffix only), supervised records and a record that shares nothing gives, packed into prefix trees with block
attention masks and logits only at the trained positions, the loss and gradients of the padded one-record-per-row
forward, within 1e-5 relative (fp32, the tiny random Llama), with and without gradient checkpointing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resetrl.algorithms.losses import token_logprobs
from resetrl.algorithms.objective import LossSettings, Shares, micro_batch_loss
from resetrl.algorithms.shared_prefix import gathered_logprobs, pack_sequences, trie_length
from resetrl.learner.batching import collate
from resetrl.learner.packing import Budget, attention_mask, packed_logprobs, plan_micro_batches
from resetrl.record import ExperienceRecord

VOCAB = 300


# ---- the prefix tree, by hand --------------------------------------------------------------------------------------

def test_a_group_shares_its_prompt_and_a_reset_group_its_prefix_too():
    prompt = [5, 6, 7]
    sequences = [np.array(prompt + [1, 2]), np.array(prompt + [1, 3, 4]), np.array(prompt + [9])]
    row = pack_sequences(sequences)
    # trie: [5 6 7] -> [1] -> {[2], [3 4]}; [5 6 7] -> [9]: 3 + 1 + 1 + 2 + 1 = 8 tokens instead of 13
    assert row.length == 8 == trie_length(sequences)
    for s, sequence in enumerate(sequences):
        assert row.token_ids[row.index[s]].tolist() == sequence.tolist()
        assert row.position_ids[row.index[s]].tolist() == list(range(len(sequence)))
    visible = row.visibility()
    first, second, third = (row.index[s] for s in range(3))
    # the "2" of sequence 0 sees its own path (prompt, 1, itself), not sequence 1's "3 4" nor sequence 2's "9"
    assert visible[first[-1]].sum() == 5 and visible[first[-1], first].all()
    assert not visible[first[-1], second[-2:]].any() and not visible[first[-1], third[-1]]
    # the shared "1" sees the prompt and itself only: causal within a shared node
    assert visible[first[3]].sum() == 4
    # the prompt's first token sees itself only
    assert visible[first[0]].sum() == 1


def test_identical_sequences_and_a_sequence_that_is_a_prefix_of_another_pack_once():
    sequences = [np.array([1, 2, 3]), np.array([1, 2, 3]), np.array([1, 2])]
    row = pack_sequences(sequences)
    assert row.length == 3 == trie_length(sequences)
    assert row.index[0].tolist() == row.index[1].tolist() and row.index[2].tolist() == row.index[0][:2].tolist()
    assert row.visibility().tolist() == np.tril(np.ones((3, 3), dtype=bool)).tolist()


def test_wanted_nodes_go_last_so_padded_rows_share_a_tail():
    # trie: A = [1 2 3] (its "3" wanted), B = [4 5] under A (its "4" wanted), C = [7] under A (nothing wanted)
    sequences = [np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 7])]
    wanted = [np.array([0, 0, 1, 1, 0], bool), np.array([0, 0, 1, 0], bool)]
    row = pack_sequences(sequences, wanted)
    assert row.token_ids.tolist() == [7, 1, 2, 3, 4, 5]  # C first, then A and B in creation order
    assert row.position_ids.tolist() == [3, 0, 1, 2, 3, 4]
    assert row.wanted.tolist() == [False, False, False, True, True, False]
    assert row.visibility()[0].tolist() == [True, True, True, True, False, False]  # "7" sees A and itself


def test_gathered_logprobs_are_token_logprobs():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    temperatures = torch.tensor([0.7, 1.3])
    expected = token_logprobs(logits, ids, temperatures)
    got = gathered_logprobs(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), temperatures.repeat_interleave(4))
    torch.testing.assert_close(got.view(2, 4), expected, rtol=0, atol=1e-6)


# ---- the packed forward equals the unshared one ---------------------------------------------------------------------

def _record(name, prompt, response, *, context=(), advantage=1.0, temperature=1.0, supervised=False, mask=None):
    """prompt + (reset prefix, untrained) + response; loss mask on the response (or `mask` over it)."""
    ids = np.array(list(prompt) + list(context) + list(response), dtype=np.int32)
    trained_from = len(prompt) + len(context)
    loss_mask = (np.arange(len(ids)) >= trained_from).astype(np.uint8)
    if mask is not None:
        loss_mask[trained_from:] = mask
    rng = np.random.default_rng(len(name) * 7 + len(ids))
    return ExperienceRecord(
        record_id=name, prompt_id=name.split("/")[0], group_id=name.rsplit("#", 1)[0], method="test",
        policy_version=0, token_ids=ids, prompt_length=len(prompt), loss_mask=loss_mask,
        advantages=np.where(loss_mask > 0, advantage, 0.0).astype(np.float32),
        behaviour_logprobs=np.where(loss_mask > 0, rng.normal(-5.7, 0.3, len(ids)), 0.0).astype(np.float32),
        reward=0.0, temperature=temperature,
        target_token_ids=ids[len(prompt):].copy() if supervised else None,
    )


def mixed_batch() -> list[ExperienceRecord]:
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(1, VOCAB, n).tolist()  # noqa: E731
    p0, p1, p2 = tokens(9), tokens(6), tokens(5)
    parent = tokens(7)  # the failed parent's steps 1..k-1: the G2 continuations' shared context
    shared_start = tokens(2)  # two G1 samples begin alike: a deeper branch of the tree
    return [
        # GRPO group G1 on p0 (two share their first response tokens), different lengths
        _record("a/g1#0", p0, shared_start + tokens(6), advantage=1.0),
        _record("a/g1#1", p0, shared_start + tokens(3), advantage=-1.0),
        _record("a/g1#2", p0, tokens(8), advantage=0.5),
        # the parent itself, trained in G1 too; the reset group G2 continues from p0 + parent, suffix only
        _record("a/g1#3", p0, parent + tokens(4), advantage=-0.5),
        _record("a/g2#0", p0, tokens(5), context=parent, advantage=1.2, temperature=0.7),
        _record("a/g2#1", p0, tokens(2), context=parent, advantage=-1.2, temperature=0.7),
        # a supervised (expert / repair) record of the same prompt, gated to a span
        _record("a/sft#0", p0, tokens(7), supervised=True, mask=[0, 1, 1, 1, 0, 1, 1]),
        # another prompt: a group of two, one of which has no trained token at all (an empty continuation)
        _record("b/g#0", p1, tokens(10), advantage=0.3),
        _record("b/g#1", p1, tokens(4), advantage=-0.3, mask=[0, 0, 0, 0]),
        # a prompt with one record: nothing to share
        _record("c/g#0", p2, tokens(3), advantage=2.0, temperature=1.3),
    ]


SETTINGS = LossSettings(policy_loss="ppo_clip", clip_eps_low=0.2, clip_eps_high=0.28, aggregation="token_mean",
                        kl_coef=0.0)


def _shares(records) -> Shares:
    return Shares(pg=1.0, pg_tokens=1.0, sft=1.0, micro_batches=1)


def unshared_loss(model, records, settings=SETTINGS) -> torch.Tensor:
    """Today's computation: every record a right-padded row, logits everywhere, one micro-batch."""
    mb = collate(records)
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    logprobs = token_logprobs(logits, mb.input_ids, mb.temperatures)
    loss, _ = micro_batch_loss(settings, _shares(records), logprobs, mb.behaviour_logprobs, mb.advantages,
                               mb.loss_mask, mb.sft_mask, weights=(0.7, 0.3, 0.0))
    return loss


def packed_loss(model, records, shared_prefix=True, settings=SETTINGS, budget=Budget()) -> torch.Tensor:
    [mb] = plan_micro_batches(records, shared_prefix=shared_prefix, budget=budget)
    mask = attention_mask(mb.visible, torch.float32, model.config._attn_implementation)
    logits = model(input_ids=mb.input_ids, attention_mask=mask, position_ids=mb.position_ids,
                   logits_to_keep=mb.keep).logits
    logprobs = packed_logprobs(logits, mb)
    loss, _ = micro_batch_loss(settings, _shares(records), logprobs, mb.loss.behaviour_logprobs, mb.loss.advantages,
                               mb.loss.loss_mask, mb.loss.sft_mask, weights=(0.7, 0.3, 0.0))
    return loss


def loss_and_grads(model, compute, records):
    model.zero_grad()
    loss = compute(model, records)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(reference, packed, rel=1e-5):
    (loss_ref, grads_ref), (loss, grads) = reference, packed
    assert loss == pytest.approx(loss_ref, rel=rel)
    for name, grad in grads_ref.items():
        error = float((grads[name] - grad).norm() / grad.norm().clamp(min=1e-30))
        assert error <= rel, f"{name}: relative gradient error {error:.2e}"


@pytest.fixture(scope="module")
def model_factory(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    def build(attention="sdpa", checkpointing=False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable()
        return model.train()

    return build


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_packed_loss_and_gradients_equal_the_unshared_ones(model_factory, attention):
    model, records = model_factory(attention), mixed_batch()
    reference = loss_and_grads(model, unshared_loss, records)
    assert reference[0] != 0.0
    assert_same(reference, loss_and_grads(model, packed_loss, records))
    # and without sharing (one row per record, logits only where trained)
    assert_same(reference, loss_and_grads(model, lambda m, r: packed_loss(m, r, shared_prefix=False), records))
    # and with every prompt in one row (attention all but free: rows merge), a forest of prefix trees
    merged = Budget(attention_cost=1e-9)
    [mb] = plan_micro_batches(records, shared_prefix=True, budget=merged)
    assert mb.num_rows == 1
    assert_same(reference, loss_and_grads(model, lambda m, r: packed_loss(m, r, budget=merged), records))


def test_gradient_checkpointing_gives_the_same_packed_gradients(model_factory):
    records = mixed_batch()
    reference = loss_and_grads(model_factory(), unshared_loss, records)
    assert_same(reference, loss_and_grads(model_factory(checkpointing=True), packed_loss, records))


def test_the_shared_rows_hold_fewer_tokens_and_only_trained_positions_get_logits():
    records = mixed_batch()
    [shared] = plan_micro_batches(records, shared_prefix=True, budget=Budget())
    [unshared] = plan_micro_batches(records, shared_prefix=False, budget=Budget())
    assert shared.num_rows == 3 and unshared.num_rows == 9  # one per prompt; b/g#1 has no trained token: not run
    real = lambda mb: int((mb.visible.diagonal(dim1=1, dim2=2) & (mb.visible.sum(-1) > 1)).sum())  # noqa: E731
    assert int(shared.visible.any(-1).sum()) < int(unshared.visible.any(-1).sum()) and real(shared) < real(unshared)
    trained = int(shared.loss.loss_mask.sum() + shared.loss.sft_mask.sum())
    assert len(shared.pair_row) == trained  # one gathered logit row per trained token
    # the G1 samples and the G2 continuations each need the prompt's (or the prefix's) last position once
    assert len(shared.keep) < trained


def test_a_lora_adapter_gets_the_same_packed_gradients(model_factory):
    peft = pytest.importorskip("peft")
    model = model_factory()
    # B starts at zero, so A would get no gradient: a random B makes both adapter matrices train
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                               init_lora_weights=False))
    records = mixed_batch()
    reference, packed = loss_and_grads(model, unshared_loss, records), loss_and_grads(model, packed_loss, records)
    # only the adapter trains: its A and B matrices are the gradients compared
    assert len(reference[1]) == 2 * 2 * 3 and all("lora_" in name for name in reference[1])
    assert_same(reference, packed)
