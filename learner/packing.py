"""One step's records -> this rank's packed micro-batches (docs/design.md, "The learner step").

1. Units: the records of one prompt (its GRPO group, its reset groups, its supervised records) stay together: they
   share the prompt, so they pack well, and a group is never split across ranks.
2. Sharding: units go to ranks by longest-processing-time first (each unit to the least-loaded rank, by packed
   tokens), the same on every rank because every rank holds the whole batch.
3. Rows: with learner.shared_prefix a unit becomes one row of its prefix tree (resetrl/algorithms/shared_prefix.py),
   or several when it exceeds the micro-batch budget (records sorted, so sequences sharing the longest prefixes stay
   in one row); without it every record is a row of its own.
4. Micro-batches: rows, longest first, filled greedily up to learner.max_tokens_per_micro_batch tokens counted with
   padding (rows x the longest row), or up to learner.micro_batch_size records when the budget is None. A row longer
   than the budget gets a micro-batch of its own; records are never split.
5. Merging (with shared_prefix, given the model's attention cost): a micro-batch's rows are re-cut into fewer, longer
   rows of whole prompts when that costs less. Prompts share more than their own records: every prompt of a chat
   template starts with the same system turn and instructions (55 of the default job's 69 prompt tokens), which a
   row holding several prompts computes once, and fewer rows pad less. Longer rows cost attention over every token
   pair of the row (the block mask is dense to SDPA): a row of n tokens costs n + attention_cost x n^2 token
   equivalents, attention_cost = a token pair's attention FLOPs / a token's other FLOPs (`attention_cost`), and
   the number of rows with the least padded cost R x (L + attention_cost x L^2) wins.

Only what the loss reads is computed: each sequence is cut after its last trained token's predecessor (a causal
model's hidden state at t depends on tokens <= t only), a record with no trained token is not run at all, and the LM
head runs at the wanted positions only (`logits_to_keep`): every row is left-padded to the micro-batch's length and
keeps its wanted positions in its tail, so their union is a short tail of columns.

The loss side is unchanged: `PackedMicroBatch.loss` is the record-wise MicroBatch of learner/batching.py, and
`packed_logprobs` scatters the computed log-probs into its [records, T-1] next-token layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from resetrl.algorithms.shared_prefix import PackedRow, gathered_logprobs, pack_sequences, trie_length
from resetrl.learner.batching import MicroBatch, collate
from resetrl.record import ExperienceRecord


@dataclass(frozen=True)
class Budget:
    """What one micro-batch may hold: tokens counted with padding (None: no bound), and records (None: no bound)."""

    max_tokens: int | None = None
    max_records: int | None = None
    attention_cost: float | None = None  # the model's attention_cost; None: no merging (a row per prompt)

    def fits(self, rows: int, longest: int, records: int) -> bool:
        return ((self.max_tokens is None or rows * longest <= self.max_tokens)
                and (self.max_records is None or records <= self.max_records))


@dataclass
class Row:
    """Records computed as one packed row. `sequences` are the cut token sequences of the records that need a
    forward (`runs`: their indices into records), with the tokens whose next-token logits are wanted."""

    records: list[ExperienceRecord]
    runs: list[int]
    sequences: list[np.ndarray]
    wanted: list[np.ndarray]
    length: int  # tokens of the packed row


@dataclass
class PackedMicroBatch:
    """A micro-batch's packed forward inputs, and the map from its computed logits to the loss's layout."""

    records: list[ExperienceRecord]  # in the order of the loss side's rows
    loss: MicroBatch  # record-wise, next-token aligned (learner/batching.py)
    input_ids: torch.Tensor  # long [B, L]: packed rows, left-padded
    position_ids: torch.Tensor  # long [B, L]
    visible: torch.Tensor  # bool [B, L, L]: visible[b, i, j] = token i attends to token j
    keep: torch.Tensor  # long [K]: the columns whose logits are computed
    pair_row: torch.Tensor  # long [M]: per trained token, its row ...
    pair_keep: torch.Tensor  # long [M]: ... and its column among `keep`
    pair_target: torch.Tensor  # long [M]: the token predicted there
    pair_temperature: torch.Tensor  # float [M]: its record's sampling temperature
    pair_record: torch.Tensor  # long [M]: its record's row in `loss`
    pair_column: torch.Tensor  # long [M]: its column in `loss` (token t + 1 -> column t)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens the forward processes, padding included."""
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> "PackedMicroBatch":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "records"}
        return PackedMicroBatch(records=self.records, **moved)


def forward_sequence(record: ExperienceRecord) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens to run, which of them have wanted next-token logits) for a record; None if nothing is trained.

    Token t is wanted when token t + 1 is trained (loss_mask, supervised or not); the tokens after the last wanted
    one are cut, since no trained log-prob depends on them."""
    trained = np.asarray(record.loss_mask[1:]) > 0
    positions = np.flatnonzero(trained)
    if positions.size == 0:
        return None
    end = int(positions[-1]) + 1
    return np.asarray(record.token_ids[:end], dtype=np.int64), trained[:end]


def prompt_units(records: list[ExperienceRecord]) -> list[list[ExperienceRecord]]:
    """The records grouped by prompt, in order of first appearance."""
    units: dict[str, list[ExperienceRecord]] = {}
    for record in records:
        units.setdefault(record.prompt_id, []).append(record)
    return list(units.values())


def unit_rows(unit: list[ExperienceRecord], shared_prefix: bool, budget: Budget) -> list[Row]:
    """A unit's rows: one prefix tree per row within the budget, or one row per record without sharing."""
    cut = [forward_sequence(record) for record in unit]
    if not shared_prefix:
        return [_row([record], [c]) for record, c in zip(unit, cut)]
    # Sorted by tokens, neighbours share the longest prefixes: a split keeps them in one row.
    order = sorted(range(len(unit)), key=lambda i: () if cut[i] is None else tuple(cut[i][0].tolist()))
    rows, members = [], []
    for i in order:
        candidate = members + [i]
        sequences = [cut[j][0] for j in candidate if cut[j] is not None]
        length = trie_length(sequences) if sequences else 0
        if members and not budget.fits(1, length, len(candidate)):
            rows.append(_row([unit[j] for j in members], [cut[j] for j in members]))
            candidate = [i]
        members = candidate
    rows.append(_row([unit[j] for j in members], [cut[j] for j in members]))
    return rows


def _row(records: list[ExperienceRecord], cut: list) -> Row:
    runs = [i for i, c in enumerate(cut) if c is not None]
    sequences = [cut[i][0] for i in runs]
    return Row(records=records, runs=runs, sequences=sequences, wanted=[cut[i][1] for i in runs],
               length=trie_length(sequences) if sequences else 0)


def shard_units(costs: list[int], world_size: int) -> list[list[int]]:
    """Unit indices per rank: longest first, each to the least-loaded rank (ties to the lower rank and index)."""
    loads = [0] * world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for unit in sorted(range(len(costs)), key=lambda u: (-costs[u], u)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        ranks[rank].append(unit)
        loads[rank] += costs[unit]
    return [sorted(units) for units in ranks]


def group_rows(rows: list[Row], budget: Budget) -> list[list[Row]]:
    """Rows into micro-batches, longest first, each filled while rows x longest row and its records fit."""
    batches: list[list[Row]] = []
    current: list[Row] = []
    longest = records = 0
    for row in sorted(rows, key=lambda r: -r.length):
        if current and not budget.fits(len(current) + 1, max(longest, row.length), records + len(row.records)):
            batches.append(current)
            current, longest, records = [], 0, 0
        current.append(row)
        longest, records = max(longest, row.length), records + len(row.records)
    if current:
        batches.append(current)
    return batches


def attention_cost(attention_width: int, layers: int, body_parameters: int) -> float:
    """A token pair's attention FLOPs over a token's other FLOPs, forward and backward alike: per layer a pair
    costs 4 x attention_width (q.k and the weighted v), a token 2 x its parameters outside the embeddings."""
    return 2 * attention_width * layers / max(body_parameters, 1)


def merge_rows(rows: list[Row], budget: Budget) -> list[Row]:
    """One micro-batch's rows re-cut into the number of rows of whole prompts (spread longest first over the
    rows) whose padded cost R x (L + attention_cost x L^2) is least, within the token budget (module docstring)."""
    if budget.attention_cost is None or len(rows) < 2:
        return rows
    alpha = budget.attention_cost

    def cost(cut: list[Row]) -> float:
        longest = max(row.length for row in cut)
        return len(cut) * (longest + alpha * longest * longest)

    best, best_cost = rows, cost(rows)
    ordered = sorted(rows, key=lambda r: -r.length)
    for count in range(1, len(rows)):
        bins: list[list[Row]] = [[] for _ in range(count)]
        loads = [0] * count
        for row in ordered:
            target = min(range(count), key=lambda b: (loads[b], b))
            bins[target].append(row)
            loads[target] += row.length
        merged = [_merge(b) for b in bins]
        longest = max(row.length for row in merged)
        if budget.max_tokens is not None and count * longest > budget.max_tokens:
            continue
        if cost(merged) < best_cost:
            best, best_cost = merged, cost(merged)
    return best


def _merge(rows: list[Row]) -> Row:
    if len(rows) == 1:
        return rows[0]
    records, runs, sequences, wanted = [], [], [], []
    for row in rows:
        runs += [len(records) + r for r in row.runs]
        records += row.records
        sequences += row.sequences
        wanted += row.wanted
    return Row(records=records, runs=runs, sequences=sequences, wanted=wanted,
               length=trie_length(sequences) if sequences else 0)


def plan_micro_batches(records: list[ExperienceRecord], *, shared_prefix: bool, budget: Budget,
                       world_size: int = 1, rank: int = 0, pad_token_id: int = 0) -> list[PackedMicroBatch]:
    """This rank's micro-batches of one step's records (module docstring)."""
    units = [unit_rows(unit, shared_prefix, budget) for unit in prompt_units(records)]
    costs = [sum(row.length for row in rows) for rows in units]
    mine = shard_units(costs, world_size)[rank]
    rows = [row for u in mine for row in units[u]]
    batches = group_rows(rows, budget)
    if shared_prefix:
        batches = [merge_rows(batch, budget) for batch in batches]
    return [collate_packed(batch, pad_token_id) for batch in batches]


def collate_packed(rows: list[Row], pad_token_id: int = 0) -> PackedMicroBatch:
    """Pack each row's prefix tree, left-pad the rows to one length, and map every trained token to its logits."""
    records = [record for row in rows for record in row.records]
    packed: list[tuple[int, Row, PackedRow]] = []  # (index of the row's first record, row, packed row)
    first = 0
    for row in rows:
        if row.sequences:
            packed.append((first, row, pack_sequences(row.sequences, row.wanted)))
        first += len(row.records)
    if not packed:  # nothing trained here: one token still runs, so every parameter gets its (zero) gradient
        packed.append((0, _IDLE_ROW, pack_sequences(_IDLE_ROW.sequences, _IDLE_ROW.wanted)))
    length = max((p.length for _, _, p in packed), default=0)
    batch = len(packed)
    input_ids = np.full((batch, length), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((batch, length), dtype=np.int64)
    visible = np.zeros((batch, length, length), dtype=bool)
    wanted_columns = np.zeros(length, dtype=bool)
    # Per trained token: its row, its column in the padded row, the token it predicts, its record, its loss column.
    pairs: list[np.ndarray] = []
    temperatures: list[np.ndarray] = []
    for b, (first, row, p) in enumerate(packed):
        pad = length - p.length
        input_ids[b, pad:] = p.token_ids
        position_ids[b, pad:] = p.position_ids
        visible[b, pad:, pad:] = p.visibility()
        visible[b, np.arange(pad), np.arange(pad)] = True  # padding sees itself: no empty softmax row
        wanted_columns[pad:] |= p.wanted
        for s, r in enumerate(row.runs):
            record = row.records[r]
            columns = np.flatnonzero(row.wanted[s])
            pairs.append(np.stack([np.full(len(columns), b), pad + p.index[s][columns],
                                   np.asarray(record.token_ids, dtype=np.int64)[columns + 1],
                                   np.full(len(columns), first + r), columns]).astype(np.int64))
            temperatures.append(np.full(len(columns), record.temperature, dtype=np.float32))
    keep = np.flatnonzero(wanted_columns)
    pair = np.concatenate(pairs, axis=1) if pairs else np.zeros((5, 0), dtype=np.int64)
    return PackedMicroBatch(
        records=records,
        loss=collate(records, pad_token_id),
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        visible=torch.from_numpy(visible),
        keep=torch.from_numpy(keep),
        pair_row=torch.from_numpy(pair[0].copy()),
        pair_keep=torch.from_numpy(np.searchsorted(keep, pair[1]).astype(np.int64)),
        pair_target=torch.from_numpy(pair[2].copy()),
        pair_temperature=torch.from_numpy(np.concatenate(temperatures) if temperatures else np.zeros(0, np.float32)),
        pair_record=torch.from_numpy(pair[3].copy()),
        pair_column=torch.from_numpy(pair[4].copy()),
    )


# A row of one token whose logits are computed but feed no loss (idle micro-batches, rows of untrained records).
_IDLE_ROW = Row(records=[], runs=[], sequences=[np.zeros(1, dtype=np.int64)], wanted=[np.ones(1, dtype=bool)], length=1)


def idle_micro_batch() -> PackedMicroBatch:
    """A micro-batch that trains nothing: one token through the model. A rank with fewer micro-batches than another
    runs these, because ZeRO's collectives run in every forward and backward (learner/learner.py)."""
    return collate_packed([_IDLE_ROW])


def attention_mask(visible: torch.Tensor, dtype: torch.dtype, implementation: str) -> torch.Tensor:
    """The [B, 1, L, L] mask a Hugging Face model takes as given: bool for SDPA, additive (0 / -inf-like) for eager
    attention, which adds it to the scores."""
    mask = visible.unsqueeze(1)
    if implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def packed_logprobs(logits: torch.Tensor, mb: PackedMicroBatch) -> torch.Tensor:
    """Log-probs of the trained tokens from logits [B, K, V] at the kept columns, scattered into the loss layout
    [records, T-1] (0 where nothing is trained: the loss masks those positions out)."""
    selected = logits[mb.pair_row, mb.pair_keep]
    values = gathered_logprobs(selected, mb.pair_target, mb.pair_temperature)
    out = torch.zeros(mb.loss.loss_mask.shape, dtype=values.dtype, device=values.device)
    return out.index_put((mb.pair_record, mb.pair_column), values)
