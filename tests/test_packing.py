"""Token-budget micro-batches (learner/packing.py): records are never split, the budget holds (a row longer than it
gets a micro-batch of its own), a prompt's records never straddle ranks, and every trained token gets its logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resetrl.config import load_config
from resetrl.learner.packing import (
    Budget, attention_cost, forward_sequence, group_rows, plan_micro_batches, prompt_units, shard_units, unit_rows,
)
from resetrl.record import ExperienceRecord

REPO = Path(__file__).resolve().parent.parent


def record(name: str, prompt: list[int], response: list[int], trained: list[int] | None = None) -> ExperienceRecord:
    ids = np.array(prompt + response, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[len(prompt):] = 1 if trained is None else trained
    return ExperienceRecord(
        record_id=name, prompt_id=name.split("#")[0], group_id=name.split("#")[0], method="grpo", policy_version=0,
        token_ids=ids, prompt_length=len(prompt), loss_mask=mask, advantages=mask.astype(np.float32),
        behaviour_logprobs=np.zeros(len(ids), np.float32), reward=0.0, temperature=1.0,
    )


def batch(prompts: int = 4, group: int = 4, prompt_len: int = 10, response_lens=(3, 6, 9, 12)):
    rng = np.random.default_rng(1)
    records = []
    for p in range(prompts):
        prompt = rng.integers(1, 300, prompt_len).tolist()
        for g in range(group):
            response = rng.integers(1, 300, response_lens[g % len(response_lens)]).tolist()
            records.append(record(f"p{p}#{g}", prompt, response))
    return records


def trained_count(records) -> int:
    return sum(int((r.loss_mask[1:] > 0).sum()) for r in records)


def test_the_forward_sequence_stops_at_the_last_trained_tokens_predecessor():
    r = record("p#0", [1, 2, 3], [4, 5, 6, 7], trained=[1, 1, 0, 0])
    tokens, wanted = forward_sequence(r)
    # tokens 4 and 5 are trained: predicted at positions 2 and 3; nothing after position 3 is needed
    assert tokens.tolist() == [1, 2, 3, 4] and wanted.tolist() == [False, False, True, True]
    assert forward_sequence(record("p#1", [1, 2], [3], trained=[0])) is None


def test_longest_processing_time_first_sharding_by_hand():
    # 5 -> rank 0, 4 -> rank 1, 3 -> rank 1 (4 < 5), 3 -> rank 0 (5 < 7)
    assert shard_units([5, 4, 3, 3], 2) == [[0, 3], [1, 2]]
    assert shard_units([7], 3) == [[0], [], []]  # more ranks than prompts: the others idle


def test_rows_fill_micro_batches_longest_first_within_rows_times_longest():
    # a record [1, 2, .., n+1] trains its last n tokens: its row is cut after token n (n tokens)
    rows = [unit_rows([record(f"p{i}#0", [1], list(range(2, 2 + n)))], True, Budget())[0]
            for i, n in enumerate([2, 9, 4, 5])]
    assert [r.length for r in rows] == [2, 9, 4, 5]
    # budget 12: [9] alone (2 x 9 > 12); then 5 and 4 (2 x 5 = 10), then 2 (3 x 5 = 15 > 12)
    assert [[r.length for r in mb] for mb in group_rows(rows, Budget(max_tokens=12))] == [[9], [5, 4], [2]]


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("max_tokens", [30, 64, 200])
def test_records_are_never_split_and_the_budget_holds(shared_prefix, max_tokens):
    records = batch()
    mbs = plan_micro_batches(records, shared_prefix=shared_prefix, budget=Budget(max_tokens=max_tokens))
    seen = [r.record_id for mb in mbs for r in mb.records]
    assert sorted(seen) == sorted(r.record_id for r in records)  # each record once, whole
    for mb in mbs:
        assert mb.num_tokens <= max_tokens or mb.num_rows == 1  # only a lone row may exceed the budget
        lm = mb.loss
        assert len(mb.pair_row) == int(lm.loss_mask.sum() + lm.sft_mask.sum())  # every trained token has its logits
    assert sum(len(mb.pair_row) for mb in mbs) == trained_count(records)


def test_a_record_longer_than_the_budget_gets_a_micro_batch_of_its_own():
    long = record("long#0", [1, 2, 3], list(range(10, 60)))
    short = [record(f"s{i}#0", [1, 2, 3], [7, 8, 9 + i]) for i in range(3)]
    mbs = plan_micro_batches(short + [long], shared_prefix=True, budget=Budget(max_tokens=20))
    alone = [mb for mb in mbs if mb.num_tokens > 20]
    assert len(alone) == 1 and alone[0].num_rows == 1 and alone[0].loss.input_ids.shape[0] == 1
    assert sum(len(mb.pair_row) for mb in mbs) == trained_count(short + [long])


def test_a_group_larger_than_the_budget_splits_into_rows_that_keep_sharers_together():
    prompt = list(range(1, 11))
    # two pairs: each pair shares 5 more tokens after the prompt
    group = [record(f"g#{i}", prompt, [50 + i // 2] * 5 + [90 + i] * 3) for i in range(4)]
    # each record runs 17 tokens (its last one is cut): the prompt, its pair's 5, 2 of its own
    assert unit_rows(group, True, Budget())[0].length == 10 + 2 * 5 + 4 * 2  # 28: the whole group in one row
    rows = unit_rows(group, True, Budget(max_tokens=25))
    # a pair is 10 + 5 + 2 x 2 = 19 tokens; a third record would add 5 + 2 (26 > 25)
    assert [r.length for r in rows] == [19, 19]
    assert sorted(sorted(rec.record_id for rec in r.records) for r in rows) == [["g#0", "g#1"], ["g#2", "g#3"]]


def test_rows_merge_when_the_shared_tokens_outweigh_the_longer_rows_attention():
    # two prompts whose records start with the same 4 tokens (a chat template's system turn): rows of 10 tokens each,
    # 16 merged. Cost R x (L + a L^2): a = 0.01: 2 x 11 = 22 against 16 + 2.56 = 18.56, merged; a = 0.1: 40 < 41.6
    template = [7, 7, 7, 7]
    records = [record("p#0", template + [1, 2, 3], [4, 5, 6, 9]), record("q#0", template + [8, 8, 8], [4, 5, 6, 9])]
    merged = plan_micro_batches(records, shared_prefix=True, budget=Budget(attention_cost=0.01))
    assert [(mb.num_rows, mb.input_ids.shape[1]) for mb in merged] == [(1, 16)]
    apart = plan_micro_batches(records, shared_prefix=True, budget=Budget(attention_cost=0.1))
    assert [(mb.num_rows, mb.input_ids.shape[1]) for mb in apart] == [(2, 10)]
    # never merged past the token budget: 16 > 15
    capped = plan_micro_batches(records, shared_prefix=True, budget=Budget(max_tokens=15, attention_cost=0.01))
    assert [(mb.num_rows, mb.input_ids.shape[1]) for mb in capped] == [(1, 10), (1, 10)]
    for mb in merged + apart:
        assert len(mb.pair_row) == trained_count(records)


def test_the_attention_cost_of_a_model_by_hand():
    # SmolLM2-135M: 9 heads x 64 = 576 wide, 30 layers, 134,515,008 parameters of which 49152 x 576 embeddings
    assert attention_cost(576, 30, 134_515_008 - 49_152 * 576) == pytest.approx(2 * 576 * 30 / 106_203_456)


def test_without_a_token_budget_micro_batches_hold_micro_batch_size_records():
    records = batch(prompts=3, group=2)
    mbs = plan_micro_batches(records, shared_prefix=False, budget=Budget(max_records=4))
    assert [mb.loss.input_ids.shape[0] for mb in mbs] == [4, 2]


def test_a_prompt_never_straddles_ranks_and_every_record_has_one_rank():
    records = batch(prompts=5)
    per_rank = [plan_micro_batches(records, shared_prefix=True, budget=Budget(max_tokens=64), world_size=2, rank=k)
                for k in range(2)]
    prompts = [{r.prompt_id for mb in mbs for r in mb.records} for mbs in per_rank]
    assert not prompts[0] & prompts[1] and prompts[0] | prompts[1] == {r.prompt_id for r in records}
    assert sum(len(mb.pair_row) for mbs in per_rank for mb in mbs) == trained_count(records)


def test_units_are_prompts_in_order_of_appearance():
    records = [record("b#0", [1], [2]), record("a#0", [1], [3]), record("b#1", [1], [4])]
    assert [[r.record_id for r in unit] for unit in prompt_units(records)] == [["b#0", "b#1"], ["a#0"]]


def test_repair_on_the_tiny_preset_is_no_longer_refused():
    # 2 prompts x (group 4 + 1 repair) = 10 records a step, micro_batch_size 4: refused while micro-batches had to
    # divide the step; packed micro-batches take any number of records
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["algorithm.name=repair"])
    assert cfg.records_per_step == 10 and cfg.learner.max_tokens_per_micro_batch
    load_config(REPO / "configs" / "tiny.yaml", ["learner.world_size=4", "learner.micro_batch_size=3"])
