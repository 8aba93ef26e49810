"""What a training method is: one module under resetrl/methods/ that declares everything about it.

A method (GRPO, RRPO, SRPO, VinePPO, ...) says, in one place:
- `name`: what `algorithm.name` selects; it appears in no other module.
- `options_key` / `Options`: its typed option section, `algorithm.<options_key>` (a pydantic model). Methods that
  share machinery may share a section (rrpo, srpo and oracle all read `algorithm.reset`).
- `algorithm_defaults`: AlgorithmConfig fields whose default differs for this method (e.g. dual_clip=3 for the
  reset methods), applied unless the user set the field.
- `records_per_prompt(cfg)` and `records_per_prompt_text`: the trained records one prompt yields, for flow control
  and for the config's error messages.
- `validate(cfg)`: method-specific config checks; raise ValueError with the field and the fix.
- `rollout(ctx, prompts, group_ids, prompt_ids)`: how a batch of prompts becomes experience records, in the
  rollout actor (every stage batched over the whole batch of prompts).
- learner hooks: `learnable_loss_parameters(cfg, device)` and `loss_weights(records, cfg, learnable)`: how the
  policy-gradient and supervised parts of a step's loss are weighted (SuperRL's gate, IOP's repair coefficient).
- `derived_metrics`: rates computed from the run's counters, reported as rollout/<name>.

Adding a method touches its module, its tests and the docs: the registry (METHODS) makes it selectable, and its
options become a config section, validated like every other.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

from resetrl.registry import Registry

if TYPE_CHECKING:  # imported for annotations only: methods load before the config does
    import torch

    from resetrl.actors.trajectories import RolloutContext
    from resetrl.config import RunConfig
    from resetrl.record import ExperienceRecord, PromptRecord


class OptionsSection(BaseModel):
    """Base of a method's option section: unknown keys are errors, as in every config section."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def entry_rng(ctx: "RolloutContext", group_id: str) -> random.Random:
    """A method's random draws for one prompt entry (SRL's instances, RRPO's reset steps), seeded by the run's seed
    and the entry's group id: a prompt entry processed twice draws the same, whichever worker processes it."""
    digest = hashlib.sha256(f"{ctx.cfg.seed}:{group_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class Method:
    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line, shown in `algorithm.name`'s help and the docs
    options_key: ClassVar[str | None] = None
    Options: ClassVar[type[BaseModel] | None] = None
    algorithm_defaults: ClassVar[dict[str, Any]] = {}
    records_per_prompt_text: ClassVar[str] = "rollout.group_size"
    # Std of the group z-score: 1 = sample std (GRPO, as TRL and verl), 0 = population std (algorithm.std_ddof wins).
    advantage_ddof: ClassVar[int] = 1
    # name -> (help text, function of the run's counters -> value or None)
    derived_metrics: ClassVar[dict[str, tuple[str, Callable[[dict], float | None]]]] = {}

    # ---- config ----------------------------------------------------------------------------------------------
    def options(self, cfg: "RunConfig") -> BaseModel:
        return getattr(cfg.algorithm, self.options_key)

    def records_per_prompt(self, cfg: "RunConfig") -> int:
        return cfg.rollout.group_size

    def validate(self, cfg: "RunConfig") -> None:
        """Raise ValueError naming the field and the fix when this method cannot run with cfg."""

    # ---- rollout ---------------------------------------------------------------------------------------------
    def rollout(self, ctx: "RolloutContext", prompts: list["PromptRecord"], group_ids: list[str],
                prompt_ids: list[list[int]]) -> list["ExperienceRecord"]:
        raise NotImplementedError

    # ---- learner ---------------------------------------------------------------------------------------------
    def learnable_loss_parameters(self, cfg: "RunConfig", device) -> "torch.Tensor | None":
        """Extra parameters of the loss itself (not the model), trained beside it; None for most methods."""
        return None

    def loss_weights(self, records: list["ExperienceRecord"], cfg: "RunConfig", learnable) -> tuple:
        """(w_pg, w_sft, regulariser) of the step loss w_pg (L_PG + kl) + w_sft L_SFT + regulariser."""
        has_supervised = any(r.target_token_ids is not None for r in records)
        return 1.0, 1.0 if has_supervised else 0.0, 0.0


METHODS: Registry[Method] = Registry("method", "algorithm.name")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable as `algorithm.name: <cls.name>`."""
    METHODS.register(cls.name, cls())
    return cls
