"""The learner: reads experience from the Redis stream, takes DeepSpeed optimizer steps, publishes weights.

A plain class; the driver runs it as Ray actors through learner/group.py. One step reads top to bottom
(STYLE.md): collect records -> micro-batches -> loss -> backward -> optimizer step -> publish weights -> ack.

Several ranks (learner.world_size > 1): one torch.distributed group, DeepSpeed data parallelism (ZeRO 0-3). Rank 0
alone speaks to the experience stream: it reads, dedupes, drops stale records, acks, and keeps the Redis-side
bookkeeping and counters. Each step it broadcasts the batch's wire-format payloads, the msgpack bytes exactly as
read from the stream, as a uint8 tensor plus a lengths tensor (no pickling: DESIGN.md), and every other rank
decodes them with decode_experience. So every rank holds the whole batch and trains on its contiguous shard of
records_per_step / world_size records. The loss is normalised by the whole batch's token (or sequence) counts,
which every rank computes from the whole batch, and scaled by world_size, because DeepSpeed averages the ranks'
gradients: the applied gradient is then the one-rank gradient of the same batch. Rank 0 alone publishes weights
(with ZeRO-3 every rank joins the parameter gather) and writes the learner's own checkpoint files; DeepSpeed's
checkpoint is written and read by every rank.

Reliability (DESIGN.md): an experience entry is acknowledged only after the optimizer step that used it and the
publication of the resulting weights, so a learner that dies mid-step replays its entries on restart (it first
re-reads the entries it holds pending). Records more than `max_staleness` policy versions old are dropped and
counted; the rest are importance-corrected by the PPO ratio against their behaviour log-probs.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from resetrl.algorithms.losses import POLICY_LOSSES, k3_kl, supervised_loss, token_logprobs
from resetrl.algorithms.superrl import gate_loss_weights, uncertainty_weights
from resetrl.config import RunConfig
from resetrl.learner.batching import MicroBatch, micro_batches, trained_tokens
from resetrl.learner.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from resetrl.queue import StreamQueue, connect
from resetrl.record import ExperienceRecord, WireFormatError, decode_experience
from resetrl.redis_server import free_port
from resetrl.run_state import EXPERIENCE_GROUP, RunKeys, incr_stats, read_stats, stop_requested
from resetrl.weights import make_weight_channel

log = logging.getLogger(__name__)

CONSUMER = "learner-0"
DEFAULT_TORCH_EXTENSIONS_DIR = "~/.cache/resetrl/torch_extensions"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Counters only the learner writes for trained steps: a resume sets them back to the checkpoint's values.
_LEARNER_COUNTERS = ("samples_trained", "learner_steps", "tokens_trained", "records_trained_suffix_only",
                     "steps_skipped_nonfinite")
# How long a rank waits in a collective (ranks > 0 wait in every step's broadcast while rank 0 reads the stream):
# a train_step timeout, a checkpoint and a weight publication must each stay well below it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# Metrics each rank sums over its shard; their sum over the ranks is the whole step's value.
_SUMMED_METRICS = ("loss", "pg_loss", "sft_loss", "kl", "clip_fraction", "dual_clip_fraction", "ratio_mean",
                   "approx_kl")


def _init_distributed(rank: int = 0, world_size: int = 1, master_addr: str | None = None,
                      master_port: int | None = None) -> None:
    """Join the learner's torch.distributed group (deepspeed.initialize needs one even for a single rank).

    One rank makes its own group on loopback; several need rank 0's address and a port (learner/group.py)."""
    # The first init builds DeepSpeed's shm comm op (~70-90 s on 2 cores); a cache directory that survives makes
    # every later start take well under a second.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(DEFAULT_TORCH_EXTENSIONS_DIR).expanduser()))
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == world_size and dist.get_rank() == rank:
            return  # a second Learner in the same process (tests) shares the group
        raise RuntimeError(f"this process is already rank {dist.get_rank()} of {dist.get_world_size()}; a learner "
                           f"rank {rank} of {world_size} needs a process of its own")
    _forget_destroyed_deepspeed_groups()
    if world_size == 1:
        master_addr, master_port = "127.0.0.1", free_port()
    elif master_addr is None or master_port is None:
        raise ValueError(f"learner rank {rank} of {world_size} needs master_addr and master_port (rank 0's)")
    # LOCAL_RANK 0: Ray gives each rank's actor its own GPUs (CUDA_VISIBLE_DEVICES), so its device is always cuda:0.
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, timeout=COLLECTIVE_TIMEOUT)


def _forget_destroyed_deepspeed_groups() -> None:
    """DeepSpeed caches its process groups in module globals. If the default group was destroyed after an earlier
    init in this process (vLLM's engine cleanup does that when both share a process, as in the test suite), those
    caches point at dead groups and deepspeed.initialize fails with 'Group ... is not registered': drop them."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups as ds_groups

    if ds_comm.cdb is None:
        return  # never initialised in this process: nothing cached
    ds_comm.cdb = None
    ds_groups.mpu = None
    for name, value in list(vars(ds_groups).items()):
        if not (name.startswith("_") and name.isupper()):
            continue
        if isinstance(value, dict):
            value.clear()
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            setattr(ds_groups, name, None)


class Learner:
    def __init__(self, cfg: RunConfig, model_path: str, redis_url: str, weights_root: str | None = None,
                 resume: bool = False, rank: int = 0, master_addr: str | None = None, master_port: int | None = None):
        self.cfg = cfg
        self.keys = RunKeys(cfg.run_name)
        self.client = connect(redis_url)  # used by rank 0 only (it connects lazily: other ranks never do)
        self.records_per_step = cfg.records_per_step
        self.version = 0  # policy version = optimizer steps taken
        self.rank, self.world_size = rank, cfg.learner.world_size

        _init_distributed(rank, self.world_size, master_addr, master_port)
        import deepspeed
        from transformers import AutoModelForCausalLM

        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[cfg.model.dtype])
        model.config.use_cache = False
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.pad_token_id = getattr(model.config, "pad_token_id", None) or 0  # any id: padding is masked
        self.vocab_size = model.config.vocab_size
        self.reference = None
        if cfg.algorithm.kl_coef > 0:
            self.reference = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)

        # Per rank: DeepSpeed's batch is micro_batch_size x gradient_accumulation_steps x world_size records.
        gradient_accumulation_steps = self.records_per_step // (cfg.learner.micro_batch_size * self.world_size)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.learner.micro_batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "gradient_clipping": cfg.learner.grad_clip,
            "zero_optimization": {"stage": cfg.learner.zero_stage},
            "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
            "fp16": {"enabled": cfg.model.dtype == "float16"},
            # torch.optim.AdamW is a "client optimizer" that DeepSpeed has not certified with ZeRO; it works.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        # SuperRL's learnable uncertainty weights [s_pg, s_sft]: two scalars beside the model, never published.
        self.log_sigma = None
        if cfg.algorithm.name == "superrl" and cfg.algorithm.superrl.weighting == "uncertainty":
            self.log_sigma = torch.zeros(2, device=self.device, requires_grad=True)
            self.log_sigma_optimizer = torch.optim.Adam([self.log_sigma], lr=cfg.algorithm.superrl.uncertainty_lr)

        self.channel = make_weight_channel(cfg, "learner", self.client, self.keys, weights_root)
        self.queue = StreamQueue(self.client, self.keys.experience, EXPERIENCE_GROUP, CONSUMER)
        if self.rank == 0:
            self.queue.ensure_group()
        # (entry id, record, its payload as read): read, not yet trained on, not acked. Rank 0 only.
        self._buffer: list[tuple[str, ExperienceRecord, bytes]] = []
        self._dropped_stale = 0  # since the last returned step
        # Checkpoints and dedupe (learner/checkpoint.py). With checkpoints on, trained entries are held unacked
        # until a checkpoint covers them, so a learner killed between checkpoints replays them on --resume.
        self.checkpoint_root = cfg.run_path / "checkpoints"
        self._held: list[str] = []  # trained (or skipped) entry ids awaiting the next checkpoint's ack
        self._trained_ids: set[str] = set()  # every record id trained in this model's history
        self._trained_prompts: set[str] = set()
        self._records_trained = 0  # records trained in this model's history (duplicates would make it > ids)
        self._duplicates_dropped = 0
        self._checkpointed_version = 0
        self.resumed_from: int | None = None
        if resume:
            self._resume()
        # A restarted learner first takes back what it held unacknowledged: those records were never trained on
        # (by the model it restored), except ones a checkpoint covers whose ack was lost: dropped by record id.
        if self.rank == 0:
            self._accept(self.queue.read(count=None, pending=True))

    # ------------------------------------------------------------------ the step

    def train_step(self, timeout_s: float | None = None) -> dict | None:
        """Train on the next records-per-step fresh records; None if the run stops or timeout_s passes first.

        With several ranks every rank calls it (the step is collective); timeout_s matters on rank 0 only."""
        batch = self._next_batch(timeout_s)
        if batch is None:
            return None
        entry_ids, records = batch

        started = time.perf_counter()
        metrics = self._optimize(records)
        train_seconds = time.perf_counter() - started

        publish_seconds = 0.0
        if metrics["skipped"]:
            if self.rank == 0:
                incr_stats(self.client, self.keys, steps_skipped_nonfinite=1)
        else:
            self.version += 1
            started = time.perf_counter()
            self._publish()
            publish_seconds = time.perf_counter() - started
            # Records whose first response tokens are masked out: reset continuations (G2) trained on suffix only.
            suffix_only = sum(1 for r in records if r.num_response_tokens and not r.loss_mask[r.prompt_length]
                              and r.target_token_ids is None)
            if self.rank == 0:
                incr_stats(
                    self.client, self.keys, samples_trained=len(records), learner_steps=1,
                    tokens_trained=metrics["loss_tokens"], records_trained_suffix_only=suffix_only,
                )
                self._trained_ids.update(r.record_id for r in records)
                self._trained_prompts.update(r.prompt_id for r in records)
                self._records_trained += len(records)
        # Ack after the step and, when checkpoints are on, only once a checkpoint covers the step (DESIGN.md).
        self._held.extend(entry_ids)
        every = self.cfg.learner.checkpoint_every
        checkpoint_seconds = 0.0
        if not every:
            self._ack_held()
        elif not metrics["skipped"] and self.version % every == 0:
            started = time.perf_counter()
            self.checkpoint()
            checkpoint_seconds = time.perf_counter() - started
        metrics["checkpoint_seconds"] = checkpoint_seconds

        dropped, self._dropped_stale = self._dropped_stale, 0
        metrics.update(
            step=self.version,
            policy_version=self.version,
            reward_mean=float(np.mean([r.reward for r in records])),
            response_len_mean=float(np.mean([r.num_response_tokens for r in records])),
            samples_trained=0 if metrics["skipped"] else len(records),
            samples_dropped_stale=dropped,
            train_seconds=train_seconds,
            publish_seconds=publish_seconds,
        )
        return metrics

    def _next_batch(self, timeout_s: float | None) -> tuple[list[str], list[ExperienceRecord]] | None:
        """(entry ids, records) of the next step: the same records on every rank, the entry ids on rank 0 only."""
        batch = self._collect(timeout_s) if self.rank == 0 else None
        if self.world_size > 1:
            payloads = self._broadcast_payloads(None if batch is None else [payload for _, _, payload in batch])
            if payloads is None:
                return None
            if self.rank > 0:  # rank 0 checked these records as it read them (_accept), so they decode cleanly
                return [], [decode_experience(payload) for payload in payloads]
        if batch is None:
            return None
        return [entry_id for entry_id, _, _ in batch], [record for _, record, _ in batch]

    def _broadcast_payloads(self, payloads: list[bytes] | None) -> list[bytes] | None:
        """Rank 0's step payloads to every rank (None: no step this call). Raw wire-format bytes in uint8 tensors,
        never a pickled object: nothing that came from Redis is unpickled (DESIGN.md)."""
        header = torch.zeros(2, dtype=torch.int64, device=self.device)  # [records, bytes]; 0 records = no step
        if self.rank == 0 and payloads is not None:
            header[0], header[1] = len(payloads), sum(len(p) for p in payloads)
        dist.broadcast(header, src=0)
        count, total = header.tolist()
        if count == 0:
            return None
        if self.rank == 0:
            lengths = torch.tensor([len(p) for p in payloads], dtype=torch.int64, device=self.device)
            data = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8).to(self.device)
        else:
            lengths = torch.empty(count, dtype=torch.int64, device=self.device)
            data = torch.empty(total, dtype=torch.uint8, device=self.device)
        dist.broadcast(lengths, src=0)
        dist.broadcast(data, src=0)
        if self.rank == 0:
            return payloads
        blob = data.cpu().numpy().tobytes()
        ends = np.cumsum(lengths.cpu().numpy())
        return [blob[end - length : end] for end, length in zip(ends.tolist(), lengths.tolist())]

    def _shard(self, records: list[ExperienceRecord]) -> list[ExperienceRecord]:
        """This rank's contiguous share of the step's records (the config makes it a whole number of micro-batches)."""
        size = len(records) // self.world_size
        return records[self.rank * size : (self.rank + 1) * size]

    def _optimize(self, records: list[ExperienceRecord]) -> dict:
        """Forward/backward every micro-batch of this rank's shard, then one optimizer step (DeepSpeed takes it on
        the last one, averaging the ranks' gradients).

        The step's loss is one aggregate over the whole batch (all ranks): each micro-batch loss is weighted by its
        share of the batch's normaliser (trained tokens for token_mean, sequences for seq_mean_token_sum), counted
        over the whole batch, which every rank holds. The loss passed to backward is scaled by
        gradient_accumulation_steps, because DeepSpeed divides every micro-batch loss by it, and by world_size,
        because it averages the ranks' gradients: the sum of all micro-batch losses of all ranks is the step loss.
        """
        algo = self.cfg.algorithm
        batches = micro_batches(self._shard(records), self.cfg.learner.micro_batch_size, self.pad_token_id)
        gas = self.engine.gradient_accumulation_steps()
        if len(batches) != gas:
            raise RuntimeError(f"{len(batches)} micro-batches for a step, DeepSpeed expects {gas}")
        # Supervised records (expert or repaired targets, batching.py) are normalised apart from the policy-gradient
        # ones; the step loss is w_pg (L_PG + kl) + w_sft L_SFT + regulariser (_loss_weights). Without supervised
        # records it is L_PG + kl, as before.
        pg_tokens, sft_tokens = trained_tokens(records)
        total_tokens = pg_tokens + sft_tokens
        pg_records = sum(1 for r in records if r.target_token_ids is None)
        step_micro_batches = gas * self.world_size
        skipped_before = self.engine.skipped_steps
        nonfinite = False
        totals = {"loss": 0.0, "pg_loss": 0.0, "sft_loss": 0.0, "kl": 0.0, "clip_fraction": 0.0,
                  "dual_clip_fraction": 0.0, "ratio_mean": 0.0, "approx_kl": 0.0}

        self.engine.train()
        for mb in batches:
            mb = mb.to(self.device)
            if algo.loss_aggregation == "token_mean":
                share = mb.num_pg_tokens / max(pg_tokens, 1)
            else:
                share = mb.num_sequences / max(pg_records, 1)  # supervised rows add 0 to the sequence sum
            token_share = mb.num_pg_tokens / max(pg_tokens, 1)  # statistics are token means
            sft_share = mb.num_sft_tokens / max(sft_tokens, 1)
            w_pg, w_sft, regulariser = self._loss_weights(records)  # per micro-batch: learnable ones are in its graph

            logits = self.engine(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            logprobs = token_logprobs(logits, mb.input_ids, mb.temperatures)
            pg_loss, stats = POLICY_LOSSES[algo.policy_loss](
                logprobs, mb.behaviour_logprobs, mb.advantages, mb.loss_mask,
                clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                aggregation=algo.loss_aggregation, norm_length=self.cfg.rollout.max_new_tokens,
            )
            kl = self._kl_to_reference(mb, logprobs)
            sft_loss = supervised_loss(logprobs, mb.advantages, mb.sft_mask)
            # This micro-batch's part of the step loss (its shares of the step's normalisers).
            loss = (w_pg * (pg_loss + algo.kl_coef * kl) * share + w_sft * sft_loss * sft_share
                    + regulariser / step_micro_batches)

            if not torch.isfinite(loss):
                nonfinite = True
            if nonfinite:
                # Make every gradient NaN, so the optimizer's overflow check (ZeRO 1-3) discards the whole step
                # instead of applying the finite part of it; stage 0 is handled before its step below.
                loss = loss * float("nan")
            self.engine.backward(loss * gas * self.world_size)
            if self.cfg.learner.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                self._step_stage0(nonfinite)
            else:
                self.engine.step()

            totals["loss"] += float(loss.detach())
            totals["pg_loss"] += float(pg_loss.detach()) * share
            totals["sft_loss"] += float(sft_loss.detach()) * sft_share
            totals["kl"] += float(kl.detach()) * share
            for name in ("clip_fraction", "dual_clip_fraction", "ratio_mean", "approx_kl"):
                totals[name] += stats[name] * token_share

        skipped = nonfinite or self.engine.skipped_steps > skipped_before
        if self.world_size > 1:
            # One NaN rank has poisoned every rank's averaged gradients; agree on the skip and sum the metrics.
            summed = torch.tensor([totals[name] for name in _SUMMED_METRICS] + [float(skipped)], dtype=torch.float64,
                                  device=self.device)
            dist.all_reduce(summed)
            *values, skipped_ranks = summed.tolist()
            totals.update(zip(_SUMMED_METRICS, values))
            skipped = skipped_ranks > 0
        grad_norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None and not skipped else None
        totals["skipped"] = skipped
        totals["loss_tokens"] = total_tokens
        totals["pg_weight"], totals["sft_weight"] = (float(torch.as_tensor(w).detach()) for w in (w_pg, w_sft))
        if self.log_sigma is not None:
            if self.world_size > 1 and self.log_sigma.grad is not None:
                # Not a DeepSpeed parameter, so not averaged by it: each rank holds world_size x its shard's part.
                dist.all_reduce(self.log_sigma.grad)
                self.log_sigma.grad /= self.world_size
            if not skipped:
                self.log_sigma_optimizer.step()
            self.log_sigma_optimizer.zero_grad()
            totals["log_sigma_pg"], totals["log_sigma_sft"] = self.log_sigma.tolist()
        return totals

    def _loss_weights(self, records: list[ExperienceRecord]) -> tuple:
        """(w_pg, w_sft, regulariser) of the step loss w_pg L_PG + w_sft L_SFT + regulariser (ALGORITHMS.md):
        SuperRL's gate (fractions of the step's prompts on PG and on SFT) or its uncertainty weights; for
        repaired trajectories (IOP) 1 and algorithm.repair.loss_coef; 1 and 0 when nothing is supervised."""
        algo = self.cfg.algorithm
        supervised = [r for r in records if r.target_token_ids is not None]
        if self.log_sigma is not None:
            return uncertainty_weights(self.log_sigma, has_pg=len(supervised) < len(records), has_sft=bool(supervised))
        if not supervised:
            return 1.0, 0.0, 0.0
        if algo.name == "superrl":
            sft_prompts = {r.prompt_id for r in supervised}
            pg_prompts = {r.prompt_id for r in records if r.target_token_ids is None} - sft_prompts
            return (*gate_loss_weights(len(pg_prompts), len(sft_prompts)), 0.0)
        return 1.0, algo.repair.loss_coef, 0.0

    def _kl_to_reference(self, mb: MicroBatch, logprobs: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            return torch.zeros((), device=logprobs.device)
        with torch.no_grad():
            ref_logits = self.reference(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            ref_logprobs = token_logprobs(ref_logits, mb.input_ids, mb.temperatures)
        return k3_kl(logprobs, ref_logprobs, mb.loss_mask, self.cfg.algorithm.loss_aggregation,
                     self.cfg.rollout.max_new_tokens)

    def _step_stage0(self, nonfinite_loss: bool) -> None:
        """The boundary step without ZeRO, which has no overflow check in fp32: skip it by hand when needed."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not nonfinite_loss and all(bool(torch.isfinite(g).all()) for g in grads):
            self.engine.step()
            return
        # Count the micro-step without an update (keeps DeepSpeed's accumulation counter aligned), drop the grads.
        self.engine.set_gradient_accumulation_boundary(False)
        self.engine.step()
        self.engine.set_gradient_accumulation_boundary(None)  # back to counting micro-steps
        self.engine.zero_grad()
        self.engine.skipped_steps += 1

    def _publish(self) -> None:
        # Every rank takes part in gathering ZeRO-3 partitions (the channel gathers all at once, or per bucket for
        # nccl); rank 0 alone sends.
        self.channel.publish_module(self.engine.module, self.version, self.cfg.learner.zero_stage, send=self.rank == 0)

    # ------------------------------------------------------------------ reading experience

    def _collect(self, timeout_s: float | None) -> list[tuple[str, ExperienceRecord, bytes]] | None:
        """Block until the buffer holds records_per_step fresh records; keep them for the next call on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        block_ms = self.cfg.learner.read_block_ms
        while True:
            if stop_requested(self.client, self.keys):
                return None  # what the buffer holds stays pending in Redis, replayed by a resumed learner
            self._drop_stale()
            if len(self._buffer) >= self.records_per_step:
                break
            if deadline is not None:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    return None
                block_ms = max(1, min(self.cfg.learner.read_block_ms, remaining_ms))
            self._accept(self.queue.read(count=self.records_per_step - len(self._buffer), block_ms=block_ms))
        batch, self._buffer = self._buffer[: self.records_per_step], self._buffer[self.records_per_step :]
        return batch

    def _accept(self, entries) -> None:
        rejected, reasons, duplicates = [], [], []
        buffered = {record.record_id for _, record, _ in self._buffer}
        for entry in entries:
            try:
                record = self._check(decode_experience(entry.payload))
            except WireFormatError as exc:
                log.warning("rejecting experience entry %s to %s: %s", entry.entry_id, self.queue.dead_stream, exc)
                rejected.append(entry)
                reasons.append(str(exc))
                continue
            if record.record_id in self._trained_ids or record.record_id in buffered:
                # Already trained (a checkpoint covered it but its ack was lost) or a second copy of the same
                # record (a rollout worker died between pushing experience and acknowledging its prompt).
                duplicates.append(entry.entry_id)
                continue
            buffered.add(record.record_id)
            self._buffer.append((entry.entry_id, record, entry.payload))
        if rejected:
            # Dead-lettered (kept with the reason, acked): a malformed entry stays malformed, never retried.
            self.queue.dead_letter(rejected, reasons)
            incr_stats(self.client, self.keys, records_rejected=len(rejected))
        if duplicates:
            self.queue.ack(duplicates)
            self._duplicates_dropped += len(duplicates)
            incr_stats(self.client, self.keys, records_duplicate=len(duplicates))

    def _check(self, record: ExperienceRecord) -> ExperienceRecord:
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

    def _drop_stale(self) -> None:
        limit = self.cfg.learner.max_staleness
        fresh = [item for item in self._buffer if self.version - item[1].policy_version <= limit]
        stale = [eid for eid, r, _ in self._buffer if self.version - r.policy_version > limit]
        if stale:
            stale_prompts = {r.prompt_id for _, r, _ in self._buffer if self.version - r.policy_version > limit}
            self._buffer = fresh
            self.queue.ack(stale)
            incr_stats(self.client, self.keys, samples_dropped_stale=len(stale))
            self.client.sadd(self.keys.prompts_dropped_stale, *stale_prompts)  # final: kept for the accounting
            self._dropped_stale += len(stale)

    # ------------------------------------------------------------------ the rest

    def policy_version(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ checkpoints (learner/checkpoint.py)

    def checkpoint(self) -> str:
        """Write a checkpoint of this step, then acknowledge the entries it covers. Collective with several ranks."""
        if self.rank > 0:  # DeepSpeed's partition and RNG states of this rank; rank 0 writes the rest
            path = save_checkpoint(self.engine, self.checkpoint_root, self.version, None)
            self._checkpointed_version = self.version
            return str(path)
        state = {
            "world_size": self.world_size,
            "policy_version": self.version,
            "trained_record_ids": sorted(self._trained_ids),
            "trained_prompt_ids": sorted(self._trained_prompts),
            "records_trained": self._records_trained,
            "counters": {name: read_stats(self.client, self.keys).get(name, 0) for name in _LEARNER_COUNTERS},
        }
        if getattr(self, "log_sigma", None) is not None:  # SuperRL's uncertainty weights (their Adam moments restart)
            state["log_sigma"] = self.log_sigma.tolist()
        path = save_checkpoint(self.engine, self.checkpoint_root, self.version, state, keep=self.cfg.learner.checkpoint_keep)
        self._checkpointed_version = self.version
        self._ack_held()
        log.info("checkpoint of step %d in %s", self.version, path)
        return str(path)

    def finish(self) -> dict:
        """End of the run: a last checkpoint (when on and due), every trained entry acked; the accounting."""
        if self.cfg.learner.checkpoint_every and self._checkpointed_version != self.version:
            self.checkpoint()
        self._ack_held()
        return self.accounting()

    def accounting(self) -> dict:
        return {
            "trained_prompt_ids": sorted(self._trained_prompts),
            "records_trained": self._records_trained,
            "records_trained_unique": len(self._trained_ids),
            "duplicates_trained": self._records_trained - len(self._trained_ids),
            "duplicates_dropped": self._duplicates_dropped,
            "resumed_from_step": self.resumed_from,
        }

    def _ack_held(self) -> None:
        self.queue.ack(self._held)
        self._held = []

    def _resume(self) -> None:
        """Load the newest checkpoint (if any) and publish its weights so the actors generate with them."""
        path = latest_checkpoint(self.checkpoint_root)
        if self.world_size > 1:  # every rank loads the checkpoint rank 0 found
            step = torch.tensor([-1 if path is None else int(path.name.split("-")[1])], device=self.device)
            dist.broadcast(step, src=0)
            path = None if int(step) < 0 else checkpoint_dir(self.checkpoint_root, int(step))
        if path is None:
            log.warning("--resume: no checkpoint in %s; starting from the initial model", self.checkpoint_root)
            self.resumed_from = 0
            return
        state = load_checkpoint(self.engine, path)
        self.version = self._checkpointed_version = self.resumed_from = int(state["policy_version"])
        self._trained_ids = set(state["trained_record_ids"])
        self._trained_prompts = set(state["trained_prompt_ids"])
        self._records_trained = int(state["records_trained"])
        if "log_sigma" in state and getattr(self, "log_sigma", None) is not None:
            with torch.no_grad():
                self.log_sigma.copy_(torch.tensor(state["log_sigma"], device=self.log_sigma.device))
        # The learner's counters go back to the checkpoint: steps trained after it are trained again.
        if self.rank == 0:
            self.client.hset(self.keys.stats, mapping={k: v for k, v in state["counters"].items()})
        self._publish()
        log.warning("resumed from %s (step %d)", path, self.version)

    def close(self) -> None:
        """Release the engine and the Redis connection. Unacked records stay pending in Redis for a restart.

        The process group is left up: it belongs to the process (other Learners in it share it) and ends with it.
        """
        self.engine = None
        self.reference = None
        self._buffer = []
        self.client.close()
