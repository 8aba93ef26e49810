"""Experience records -> padded tensors, split into micro-batches.

Layout of a `MicroBatch` of B sequences padded on the right to length T:
- input_ids, attention_mask: [B, T], what the model reads (padding: pad_token_id, mask 0).
- loss_mask, advantages, behaviour_logprobs: [B, T-1], next-token aligned like `token_logprobs`: position t holds
  the record's value for token t+1, i.e. `loss_mask[b, t] = record.loss_mask[t + 1]`. A record's per-token arrays
  describe the token at the same index (ExperienceRecord), and token t+1 is predicted from logits at position t.
  Token 0 is never predicted, so its record values are not used.
Positions outside the loss mask get advantage 0 and behaviour log-prob 0, so a NaN a producer left on a prompt
token cannot reach the loss (a masked log-ratio then is just the current log-prob, a finite number).
Supervised records (target_token_ids set: an expert solution, a repaired trajectory) put their trained tokens in
`sft_mask` instead of `loss_mask`, with their weight in `advantages`: the learner trains them with the weighted NLL
(losses.supervised_loss), the others with the policy loss. The two masks never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from resetrl.record import ExperienceRecord


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # long [B, T]
    attention_mask: torch.Tensor  # long [B, T]
    loss_mask: torch.Tensor  # float [B, T-1]
    advantages: torch.Tensor  # float [B, T-1]
    behaviour_logprobs: torch.Tensor  # float [B, T-1]
    temperatures: torch.Tensor  # float [B]
    sft_mask: torch.Tensor  # float [B, T-1]: trained tokens of supervised records (loss_mask is 0 on their rows)

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_loss_tokens(self) -> int:
        """Trained tokens, policy-gradient and supervised."""
        return int(self.loss_mask.sum() + self.sft_mask.sum())

    @property
    def num_pg_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def num_sft_tokens(self) -> int:
        return int(self.sft_mask.sum())

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate(records: list[ExperienceRecord], pad_token_id: int = 0) -> MicroBatch:
    """Pad `records` on the right to their longest length and shift the per-token values (module docstring).
    No records give tensors of no rows (an idle micro-batch, learner/packing.py)."""
    batch = len(records)
    length = max((len(r.token_ids) for r in records), default=1)
    input_ids = np.full((batch, length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    loss_mask = np.zeros((batch, length - 1), dtype=np.float32)
    advantages = np.zeros((batch, length - 1), dtype=np.float32)
    behaviour_logprobs = np.zeros((batch, length - 1), dtype=np.float32)
    sft_mask = np.zeros((batch, length - 1), dtype=np.float32)
    for row, record in enumerate(records):
        n = len(record.token_ids)
        input_ids[row, :n] = record.token_ids
        attention_mask[row, :n] = 1
        trained = np.asarray(record.loss_mask[1:]) > 0
        (sft_mask if record.target_token_ids is not None else loss_mask)[row, : n - 1] = trained
        advantages[row, : n - 1] = np.where(trained, record.advantages[1:], 0.0)
        behaviour_logprobs[row, : n - 1] = np.where(trained, record.behaviour_logprobs[1:], 0.0)
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        loss_mask=torch.from_numpy(loss_mask),
        advantages=torch.from_numpy(advantages),
        behaviour_logprobs=torch.from_numpy(behaviour_logprobs),
        temperatures=torch.tensor([r.temperature for r in records], dtype=torch.float32),
        sft_mask=torch.from_numpy(sft_mask),
    )


def micro_batches(records: list[ExperienceRecord], micro_batch_size: int, pad_token_id: int = 0) -> list[MicroBatch]:
    """Split one step's records into micro-batches of `micro_batch_size` (the last one may be smaller).

    Records are sorted by length first, so sequences of similar length share a micro-batch and little compute
    goes to padding; the step's gradient does not depend on the order.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1 (got {micro_batch_size})")
    ordered = sorted(records, key=lambda r: len(r.token_ids))
    return [collate(ordered[i : i + micro_batch_size], pad_token_id) for i in range(0, len(ordered), micro_batch_size)]


def trained_tokens(records: list[ExperienceRecord]) -> tuple[int, int]:
    """(policy-gradient, supervised) trained tokens of `records`: what their micro-batches' loss_mask and sft_mask
    sum to, counted without collating (a rank of a multi-rank learner collates only its shard)."""
    pg = sft = 0
    for record in records:
        count = int((np.asarray(record.loss_mask[1:]) > 0).sum())
        if record.target_token_ids is not None:
            sft += count
        else:
            pg += count
    return pg, sft
