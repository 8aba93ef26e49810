# Over 400 lines: one rank's step, publishing, checkpoint and resume; intake, objective, packing, LoRA, distributed are modules of their own.
"""The learner: reads experience from the Redis stream, takes DeepSpeed optimizer steps, publishes weights.

A plain class; the driver runs it as Ray actors through resetrl/launch/learner_group.py. One step reads top to bottom
(docs/design.md): collect records -> micro-batches -> loss -> backward -> optimizer step -> publish weights -> ack.

Several ranks (learner.world_size > 1): one torch.distributed group, DeepSpeed data parallelism (ZeRO 0-3). Rank 0
alone speaks to the experience stream: it reads, dedupes, drops stale records, acks, and keeps the Redis-side
bookkeeping and counters. Each step it broadcasts the batch's wire-format payloads, the msgpack bytes exactly as
read from the stream, as a uint8 tensor plus a lengths tensor (no pickling: docs/design.md), and every other rank
decodes them with decode_experience. So every rank holds the whole batch and trains on its share of whole prompts
(learner/packing.py: a prompt's records never straddle ranks). The loss is normalised by the whole batch's token
(or sequence) counts, which every rank computes from the whole batch, and scaled by world_size, because DeepSpeed
averages the ranks' gradients: the applied gradient is then the one-rank gradient of the same batch. Rank 0 alone
publishes weights (with ZeRO-3 every rank joins the parameter gather) and writes the learner's own checkpoint
files; DeepSpeed's checkpoint is written and read by every rank.

Reliability (docs/design.md): an experience entry is acknowledged only after the optimizer step that used it and the
publication of the resulting weights, so a learner that dies mid-step replays its entries on restart (it first
re-reads the entries it holds pending). Records more than `max_staleness` policy versions old are dropped and
counted; the rest are importance-corrected by the PPO ratio against their behaviour log-probs.
"""

from __future__ import annotations

import copy
import logging
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from resetrl.algorithms.losses import aggregation_count
from resetrl.algorithms.objective import LossSettings, Shares, micro_batch_loss
from resetrl.config import RunConfig
from resetrl.hub import local_snapshot
from resetrl.learner.batching import trained_tokens
from resetrl.learner.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from resetrl.learner.distributed import broadcast_payloads, init_distributed
from resetrl.learner.intake import ExperienceIntake
from resetrl.learner.lora import LoraAdapter, adapter_shape, check_resumable
from resetrl.learner.packing import (
    Budget, PackedMicroBatch, attention_cost, attention_mask, idle_micro_batch, packed_logprobs, plan_micro_batches,
)
from resetrl.queue import connect
from resetrl.record import ExperienceRecord, decode_experience
from resetrl.run_state import RunKeys, incr_stats, ledger_trained_twice, read_stats, restore_stats
from resetrl.thread_budget import ThreadBudget, host_cores
from resetrl.weights import make_weight_channel

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Counters only the learner writes for trained steps: a resume sets them back to the checkpoint's values.
_LEARNER_COUNTERS = ("samples_trained", "learner_steps", "tokens_trained", "records_trained_suffix_only",
                     "steps_skipped_nonfinite")
# Metrics each rank sums over its shard; their sum over the ranks is the whole step's value.
_SUMMED_METRICS = ("loss", "pg_loss", "sft_loss", "kl", "clip_fraction", "dual_clip_fraction", "ratio_mean",
                   "approx_kl", "logp_mismatch_mean", "is_weight_mean", "is_truncated_fraction", "is_masked_fraction")
# Metrics whose step value is the maximum over micro-batches and ranks (resetrl/algorithms/correction.py).
_MAX_METRICS = ("logp_mismatch_max",)


def _restarted_by_ray() -> bool:
    """True in an actor process that Ray started again after the previous one died (max_restarts)."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not inside a Ray actor
        return False


class Learner:
    def __init__(self, cfg: RunConfig, model_path: str, redis_url: str, weights_root: str | None = None,
                 resume: bool = False, rank: int = 0, master_addr: str | None = None, master_port: int | None = None):
        model_path = str(local_snapshot(model_path))  # the driver's hub snapshot, found again on this node
        self.cfg = cfg
        self.keys = RunKeys(cfg.run_name)
        self.client = connect(redis_url)  # used by rank 0 only (it connects lazily: other ranks never do)
        self.records_per_step = cfg.records_per_step
        self.version = 0  # policy version = optimizer steps taken
        self.rank, self.world_size = rank, cfg.learner.world_size

        init_distributed(rank, self.world_size, master_addr, master_port)
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

        # A step's micro-batches are packed by tokens (learner/packing.py), so their number is known only once the
        # step's records are: _optimize marks the accumulation boundary itself (the last micro-batch) and scales the
        # losses itself. DeepSpeed's own batch arithmetic (micro-batch x accumulation x ranks) is then unused.
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.learner.grad_clip,
            "zero_optimization": {"stage": cfg.learner.zero_stage},
            "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
            "fp16": {"enabled": cfg.model.dtype == "float16"},
            # torch.optim.AdamW is a "client optimizer" that DeepSpeed has not certified with ZeRO; it works.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        # learner.lora: the adapter is injected into `model` (after the KL reference was copied: that stays the base
        # model) and only its parameters train (learner/lora.py).
        self.lora = None
        if cfg.learner.lora is not None:
            self.lora = LoraAdapter(cfg.learner.lora, model, model_path, cfg.model.gradient_checkpointing)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self._forward_settings(model, cfg)
        # Parameters of the loss itself that the method trains beside the model (SuperRL's uncertainty weights
        # [s_pg, s_sft]); never published.
        self.method = cfg.algorithm.method
        self.loss_parameters = self.method.learnable_loss_parameters(cfg, self.device)
        if self.loss_parameters is not None:
            lr = getattr(self.method.options(cfg), "uncertainty_lr", cfg.learner.lr)
            self.loss_parameters_optimizer = torch.optim.Adam([self.loss_parameters], lr=lr)
        self.loss_settings = LossSettings(
            policy_loss=cfg.algorithm.policy_loss, clip_eps_low=cfg.algorithm.clip_eps_low,
            clip_eps_high=cfg.algorithm.clip_eps_high, dual_clip=cfg.algorithm.dual_clip,
            aggregation=cfg.algorithm.loss_aggregation, norm_length=cfg.rollout.max_new_tokens,
            kl_coef=cfg.algorithm.kl_coef, is_correction=cfg.algorithm.is_correction,
            is_level=cfg.algorithm.is_level, is_cap=cfg.algorithm.is_cap,
        )

        self.channel = make_weight_channel(cfg, "learner", self.client, self.keys, weights_root)
        # Rank 0 alone speaks to the experience stream (learner/intake.py).
        self.intake = None
        if self.rank == 0:
            self.intake = ExperienceIntake(self.client, self.keys, self.records_per_step, self.vocab_size,
                                           cfg.learner.max_staleness, cfg.learner.read_block_ms)
        # With checkpoints on, trained entries are held unacked until a checkpoint covers them, so a learner killed
        # between checkpoints replays them on --resume (learner/checkpoint.py).
        self.checkpoint_root = cfg.run_path / "checkpoints"
        self._checkpointed_version = 0
        self.resumed_from: int | None = None
        # Ray restarts a learner killed inside the run (learner.max_restarts): the new process resumes as --resume
        # does, from the newest checkpoint, and the run goes on (docs/design.md, "What a crash replays").
        self.restarted = _restarted_by_ray()
        if resume or self.restarted:
            self._resume()
        if self.intake is not None:
            self.intake.take_back_pending()

    # ------------------------------------------------------------------ the step

    def train_step(self, timeout_s: float | None = None) -> dict | None:
        """Train on the next records-per-step fresh records; None if the run stops or timeout_s passes first.

        With several ranks every rank calls it (the step is collective); timeout_s matters on rank 0 only."""
        batch = self._next_batch(timeout_s)
        if batch is None:
            return None
        entry_ids, records = batch

        # How many policy versions behind the learner the batch was generated (0 = on-policy).
        version_lag = self.version - float(np.mean([r.policy_version for r in records]))
        started = time.perf_counter()
        metrics = self._optimize(records)  # loss -> backward -> optimizer step
        train_seconds = time.perf_counter() - started

        publish_seconds = 0.0
        if not metrics["skipped"]:
            self.version += 1
            started = time.perf_counter()
            self._publish()
            publish_seconds = time.perf_counter() - started
        metrics["checkpoint_seconds"] = self._account(entry_ids, records, metrics)

        metrics.update(
            step=self.version,
            policy_version=self.version,
            reward_mean=float(np.mean([r.reward for r in records])),
            response_len_mean=float(np.mean([r.num_response_tokens for r in records])),
            samples_trained=0 if metrics["skipped"] else len(records),
            samples_dropped_stale=self.intake.take_dropped_stale() if self.intake is not None else 0,
            train_seconds=train_seconds,
            publish_seconds=publish_seconds,
            version_lag=version_lag,
        )
        return metrics

    def _account(self, entry_ids: list[str], records: list[ExperienceRecord], metrics: dict) -> float:
        """Counters, the trained-record history, and the acks (after the step and, when checkpoints are on, only
        once a checkpoint covers it). Returns the seconds spent writing a checkpoint."""
        if self.rank == 0:
            if metrics["skipped"]:
                incr_stats(self.client, self.keys, steps_skipped_nonfinite=1)
                # Nothing trained: the records go to the dead letters with the reason, for a person to inspect.
                self.intake.skipped("the optimizer step on this record's batch had a non-finite loss and was skipped")
            else:
                # Records whose first response tokens are masked out: reset continuations (G2), suffix only.
                suffix_only = sum(1 for r in records if r.num_response_tokens and not r.loss_mask[r.prompt_length]
                                  and r.target_token_ids is None)
                incr_stats(self.client, self.keys, samples_trained=len(records), learner_steps=1,
                           tokens_trained=metrics["loss_tokens"], records_trained_suffix_only=suffix_only)
                self.intake.trained(records)
                self.intake.hold(entry_ids, records)
        every = self.cfg.learner.checkpoint_every
        if not every:
            if self.intake is not None:
                self.intake.ack_held()
            return 0.0
        if metrics["skipped"] or self.version % every:
            return 0.0
        started = time.perf_counter()
        self.checkpoint()
        return time.perf_counter() - started

    def _next_batch(self, timeout_s: float | None) -> tuple[list[str], list[ExperienceRecord]] | None:
        """(entry ids, records) of the next step: the same records on every rank, the entry ids on rank 0 only."""
        batch = self.intake.next_batch(self.version, timeout_s) if self.rank == 0 else None
        if self.world_size > 1:
            payloads = broadcast_payloads(None if batch is None else [payload for _, _, payload in batch], self.rank, self.device)
            if payloads is None:
                return None
            if self.rank > 0:  # rank 0 checked these records as it read them (intake.accept), so they decode cleanly
                return [], [decode_experience(payload) for payload in payloads]
        if batch is None:
            return None
        return [entry_id for entry_id, _, _ in batch], [record for _, record, _ in batch]

    def _forward_settings(self, model, cfg: RunConfig) -> None:
        """What the packed forward needs to know about the model, and the CPU thread budget."""
        import inspect

        self.attention = model.config._attn_implementation
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"the learner's packed micro-batches need an attention implementation that takes a 4D "
                             f"mask (sdpa or eager); the model loaded with '{self.attention}'")
        self.mask_dtype = _DTYPES[cfg.model.dtype]
        # Hugging Face causal LMs take logits_to_keep (the LM head at those positions only); others get sliced after.
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        learner = cfg.learner
        config = model.config
        width = config.num_attention_heads * (getattr(config, "head_dim", None)
                                              or config.hidden_size // config.num_attention_heads)
        embeddings = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None}
        # ds_numel: a parameter's full size when ZeRO-3 has partitioned it away
        size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
        body = sum(size(p) for p in model.parameters()) - sum(size(p) for p in embeddings.values())
        self.budget = Budget(max_tokens=learner.max_tokens_per_micro_batch,
                             max_records=None if learner.max_tokens_per_micro_batch else learner.micro_batch_size,
                             attention_cost=attention_cost(width, config.num_hidden_layers, body))
        self.threads = None  # GPU hosts: torch threads as Ray set them
        if not torch.cuda.is_available():
            fixed = learner.torch_threads or (max(1, int(learner.cpus)) if self.world_size > 1 else None)
            cores = min(host_cores(), cfg.ray.num_cpus or host_cores())
            self.threads = ThreadBudget(self.client, self.keys, f"learner-{self.rank}", cores=cores, fixed=fixed)
            self.threads.refresh_in_layers(model)

    def _optimize(self, records: list[ExperienceRecord]) -> dict:
        """Forward/backward every micro-batch of this rank's shard, then one optimizer step (DeepSpeed takes it on
        the last one, averaging the ranks' gradients).

        The shard is whole prompts' records, packed into micro-batches by tokens (learner/packing.py). The step's
        loss is one aggregate over the whole batch (all ranks): each micro-batch loss is weighted by its share of the
        batch's normaliser (trained tokens for token_mean, sequences for seq_mean_token_sum), counted over the whole
        batch, which every rank holds. The loss passed to backward is scaled by world_size, because DeepSpeed
        averages the ranks' gradients: the sum of all micro-batch losses of all ranks is the step loss. Ranks with
        fewer micro-batches than another run idle ones (a zero loss through the model): ZeRO's collectives run in
        every forward and backward, so every rank takes the same number of micro-steps, the last the boundary.
        """
        batches = plan_micro_batches(records, shared_prefix=self.cfg.learner.shared_prefix, budget=self.budget,
                                     world_size=self.world_size, rank=self.rank, pad_token_id=self.pad_token_id)
        micro_steps, gas = self._micro_steps(len(batches))
        # Supervised records (expert or repaired targets, batching.py) are normalised apart from the policy-gradient
        # ones (resetrl/algorithms/objective.py).
        pg_tokens, sft_tokens = trained_tokens(records)
        # What the policy loss's aggregation divides by, over the whole batch (every rank holds it): trained tokens,
        # policy-gradient sequences, or those with a trained token. Supervised rows add 0 to a sequence sum.
        aggregation = self.loss_settings.aggregation
        pg_count = {"token_mean": pg_tokens,
                    "seq_mean_token_sum": sum(1 for r in records if r.target_token_ids is None),
                    "seq_mean_token_mean": sum(1 for r in records if r.target_token_ids is None and r.loss_mask.any()),
                    }[aggregation]
        skipped_before = self.engine.skipped_steps
        nonfinite = False
        totals = dict.fromkeys(_SUMMED_METRICS + _MAX_METRICS, 0.0)
        weights = self.method.loss_weights(records, self.cfg, self.loss_parameters)
        forward_tokens = 0

        self.engine.train()
        for index in range(micro_steps):
            real = index < len(batches)
            mb = (batches[index] if real else idle_micro_batch()).to(self.device)
            forward_tokens += mb.num_tokens if real else 0
            self.engine.set_gradient_accumulation_boundary(index == micro_steps - 1)
            if self.threads is not None:
                self.threads.refresh(force=True)  # and within the micro-batch, every REFRESH_S at layer boundaries
            lm = mb.loss
            token_share = lm.num_pg_tokens / max(pg_tokens, 1)
            shares = Shares(
                pg=aggregation_count(lm.loss_mask, aggregation) / max(pg_count, 1),
                pg_tokens=token_share, sft=lm.num_sft_tokens / max(sft_tokens, 1), micro_batches=gas,
            )
            # Per micro-batch: learnable weights must be in this micro-batch's graph.
            weights = self.method.loss_weights(records, self.cfg, self.loss_parameters)

            old_logprobs = self._old_logprobs(mb)  # first: no other forward between the training one and backward
            logprobs, anchor = self._logprobs(self.engine, mb)
            if real:
                loss, parts = micro_batch_loss(self.loss_settings, shares, logprobs, lm.behaviour_logprobs,
                                               lm.advantages, lm.loss_mask, lm.sft_mask, self._reference_logprobs(mb),
                                               weights, old_logprobs=old_logprobs)
                loss = loss + anchor
            else:
                loss, parts = anchor, {}
            nonfinite = nonfinite or not bool(torch.isfinite(loss))
            if nonfinite:
                # Make every gradient NaN, so the optimizer's overflow check (ZeRO 1-3) discards the whole step
                # instead of applying the finite part of it; stage 0 is handled before its step below.
                loss = loss * float("nan")
            self.engine.backward(loss * self.world_size)
            if self.cfg.learner.zero_stage == 0 and index == micro_steps - 1:
                self._step_stage0(nonfinite)
            else:
                self.engine.step()
            for name, value in parts.items():
                if name in _MAX_METRICS:
                    totals[name] = max(totals[name], value)
                else:
                    totals[name] += float(loss.detach()) if name == "loss" else value

        skipped = nonfinite or self.engine.skipped_steps > skipped_before
        if self.world_size > 1:
            # One NaN rank has poisoned every rank's averaged gradients; agree on the skip and sum the metrics.
            summed = torch.tensor([totals[name] for name in _SUMMED_METRICS] + [float(skipped)], dtype=torch.float64,
                                  device=self.device)
            dist.all_reduce(summed)
            *values, skipped_ranks = summed.tolist()
            totals.update(zip(_SUMMED_METRICS, values))
            skipped = skipped_ranks > 0
            maxima = torch.tensor([totals[name] for name in _MAX_METRICS], dtype=torch.float64, device=self.device)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            totals.update(zip(_MAX_METRICS, maxima.tolist()))
        grad_norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None and not skipped else None
        totals["skipped"] = skipped
        totals["loss_tokens"] = pg_tokens + sft_tokens
        # This rank's forward: micro-batches, tokens run (padding included), and the torch threads it ran with.
        totals["micro_batches"], totals["forward_tokens"] = len(batches), forward_tokens
        used = self.threads.take_used() if self.threads is not None else [torch.get_num_threads()]
        totals["learner_threads_min"], totals["learner_threads_max"] = min(used), max(used)
        totals["pg_weight"], totals["sft_weight"] = (float(torch.as_tensor(w).detach()) for w in weights[:2])
        if self.loss_parameters is not None:
            params = self.loss_parameters
            if self.world_size > 1 and params.grad is not None:
                # Not a DeepSpeed parameter, so not averaged by it: each rank holds world_size x its shard's part.
                dist.all_reduce(params.grad)
                params.grad /= self.world_size
            if not skipped:
                self.loss_parameters_optimizer.step()
            self.loss_parameters_optimizer.zero_grad()
            totals["log_sigma_pg"], totals["log_sigma_sft"] = params.tolist()
        return totals

    def _micro_steps(self, count: int) -> tuple[int, int]:
        """(micro-steps every rank takes: the most micro-batches any rank has, micro-batches of all ranks)."""
        if self.world_size == 1:
            return count, count
        counts = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([count], dtype=torch.int64, device=self.device))
        counts = [int(c) for c in counts]
        return max(counts), sum(counts)

    def _logprobs(self, model, mb: PackedMicroBatch) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Log-probs of mb's trained tokens in the loss layout [records, T-1], from one packed forward of `model`
        with logits at the trained positions only (learner/packing.py); and a zero that keeps every parameter in
        the graph when the micro-batch trains no token (an idle micro-batch still has a backward)."""
        mask = attention_mask(mb.visible, self.mask_dtype, self.attention)
        inputs = {"input_ids": mb.input_ids, "attention_mask": mask, "position_ids": mb.position_ids}
        if self.keeps_logits:
            logits = model(**inputs, logits_to_keep=mb.keep).logits
        else:
            logits = model(**inputs).logits[:, mb.keep]
        anchor = logits.sum() * 0.0 if mb.pair_row.numel() == 0 else 0.0
        return packed_logprobs(logits, mb), anchor

    def _old_logprobs(self, mb: PackedMicroBatch) -> torch.Tensor | None:
        """pi_old from the learner's own weights before the step (learner.recompute_old_logprobs: one extra no-grad
        forward); None without, and the loss takes the training forward's own log-probs, detached."""
        if not self.cfg.learner.recompute_old_logprobs:
            return None
        with torch.no_grad():
            return self._logprobs(self.engine, mb)[0]

    def _reference_logprobs(self, mb: PackedMicroBatch) -> torch.Tensor | None:
        """Log-probs of the initial model for the KL term (algorithm.kl_coef > 0); None without one."""
        if self.reference is None:
            return None
        with torch.no_grad():
            return self._logprobs(self.reference, mb)[0]

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
        if self.lora is not None:  # the adapter only (or, merge_for_sync, the merged weights): learner/lora.py
            self.lora.publish(self.channel, self.engine.module, self.version, self.cfg.learner.zero_stage,
                              send=self.rank == 0)
            return
        self.channel.publish_module(self.engine.module, self.version, self.cfg.learner.zero_stage, send=self.rank == 0)

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
            "lora": adapter_shape(self.cfg.learner.lora),  # resumed only with the same adapter
            **self.intake.state(),  # the processings under way and the entries this checkpoint covers: bounded
            "counters": {name: read_stats(self.client, self.keys).get(name, 0) for name in _LEARNER_COUNTERS},
        }
        if self.loss_parameters is not None:  # e.g. SuperRL's uncertainty weights (their Adam moments restart)
            state["log_sigma"] = self.loss_parameters.tolist()
        path = save_checkpoint(self.engine, self.checkpoint_root, self.version, state, keep=self.cfg.learner.checkpoint_keep)
        self._checkpointed_version = self.version
        self.intake.ack_held()
        log.info("checkpoint of step %d in %s", self.version, path)
        return str(path)

    def finish(self) -> dict:
        """End of the run: a last checkpoint (when on and due), every trained entry acked; the accounting."""
        if self.cfg.learner.checkpoint_every and self._checkpointed_version != self.version:
            self.checkpoint()
        if self.intake is not None:
            self.intake.ack_held()
        return self.accounting()

    def accounting(self) -> dict:
        """This learner process's counts, and trained_twice from the ledger (not from the dedupe)."""
        counts = self.intake.accounting() if self.intake is not None else {}
        trained_twice = ledger_trained_twice(self.client, self.keys) if self.rank == 0 else 0
        return {**counts, "trained_twice": trained_twice, "duplicates_trained": trained_twice,
                "resumed_from_step": self.resumed_from}

    def export_weights(self) -> bytes | None:
        """The current weights as one safetensors file's bytes (rank 0; None on the others), whatever the weight
        channel: the driver writes them into RUN_DIR/final. Collective under ZeRO-3. With learner.lora: merged."""
        if self.lora is not None:
            return self.lora.export_merged(self.version, self.cfg.learner.zero_stage, send=self.rank == 0)
        return self.channel.export_module(self.engine.module, self.version, self.cfg.learner.zero_stage,
                                          send=self.rank == 0)

    def export_adapter(self) -> dict[str, bytes] | None:
        """learner.lora: the adapter as a peft folder's files {name: bytes} (rank 0), for RUN_DIR/final/adapter;
        None without LoRA and on the other ranks. Collective under ZeRO-3."""
        if self.lora is None:
            return None
        return self.lora.export_adapter(self.cfg.learner.zero_stage, send=self.rank == 0)

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
            if self.restarted:  # the rollout holds newer weights of the dead learner: it goes back to these
                if self.intake is not None:
                    restore_stats(self.client, self.keys, dict.fromkeys(_LEARNER_COUNTERS, 0))
                self._publish()
            return
        check_resumable(path, self.cfg.learner.lora)
        state = load_checkpoint(self.engine, path)
        self.version = self._checkpointed_version = self.resumed_from = int(state["policy_version"])
        if "log_sigma" in state and self.loss_parameters is not None:
            with torch.no_grad():
                self.loss_parameters.copy_(torch.tensor(state["log_sigma"], device=self.loss_parameters.device))
        if self.intake is not None:
            self.intake.restore(state)
            # The learner's counters go back to the checkpoint: steps trained after it are trained again.
            restore_stats(self.client, self.keys, state["counters"])
        self._publish()
        log.warning("resumed from %s (step %d)", path, self.version)

    def close(self) -> None:
        """Release the engine and the Redis connection. Unacked records stay pending in Redis for a restart.

        The process group is left up: it belongs to the process (other Learners in it share it) and ends with it.
        """
        self.engine = None
        self.reference = None
        self.intake = None
        if self.threads is not None:
            self.threads.restore()  # a learner sharing its process (tests, benches) hands the threads back
        self.client.close()

    def __repr__(self) -> str:
        # The Ray dashboard's Repr column and log prefixes (taken once, when the actor has started).
        return (f"Learner(learner-rank{getattr(self, 'rank', 0)} of {getattr(self, 'world_size', 1)}, DeepSpeed "
                f"ZeRO-{self.cfg.learner.zero_stage}, policy v{getattr(self, 'version', 0)})")
