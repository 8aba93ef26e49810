"""learner.lora: the learner trains a LoRA adapter (peft) on the frozen model and hands the engines the adapter only.

LoRA (Hu et al. 2021, arXiv 2106.09685): a target linear layer computes W x + (alpha / r) B A x with W frozen and
A (r x in), B (out x r) trained; B starts at zero, so version 0 is the initial model.

- The adapter is injected into the loaded model in place (peft.get_peft_model): the module DeepSpeed wraps is still
  the causal LM with its own forward (logits_to_keep, packed masks), and its DeepSpeed checkpoint holds the adapter
  and its optimizer state beside the frozen weights; a checkpoint resumes only with the same adapter shape
  (check_resumable).
- publish: the adapter's tensors, named as in peft's adapter_model.safetensors (`base_model.model.<module>.lora_A.
  weight`, `lora_B`) and cast to the model's dtype, go through the weight channel like any state dict: the bytes are
  the adapter's. Engines know rank and alpha from the run config and the modules from the names
  (actors/engines/lora.py). `merge_for_sync`: the merged weights W + (alpha / r) B A under the model's own names
  instead, a full sync, for an engine that cannot hot-load an adapter.
- export: the merged weights for RUN_DIR/final (a plain HF folder) and the adapter as a peft folder (final/adapter).
Under ZeRO-3 the parameters are gathered first, a collective every learner rank joins; only `send` serialises.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from resetrl.config import LoraConfig
from resetrl.weights.base import cpu_tensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the names peft's PeftModel.from_pretrained reads
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # peft's name of a model's single adapter


class LoraAdapter:
    """The adapter of one learner rank's model: built once in Learner.__init__, before DeepSpeed wraps the model."""

    def __init__(self, settings: LoraConfig, model: torch.nn.Module, base_model: str, gradient_checkpointing: bool):
        import peft

        self.settings = settings
        self.base_model = base_model  # recorded in the exported adapter's config
        # peft keeps a bf16/fp16 model's adapter in float32 for training; the engines compute in the model's dtype,
        # so versions travel in it (half the bytes).
        self.wire_dtype = next(model.parameters()).dtype
        config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                 target_modules=settings.target_modules, bias="none", task_type="CAUSAL_LM")
        try:
            # Wraps `model` and injects the LoRA layers into it in place; the wrapper is kept for peft's own helpers.
            self.peft_model = peft.get_peft_model(model, config)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"learner.lora.target_modules={settings.target_modules!r} matches no layer of the model "
                             f"({exc}); its linear layers are named {linear}: use some of those, or 'all-linear'"
                             ) from None
        self.model = model
        if gradient_checkpointing:
            # The frozen embeddings give checkpointed blocks inputs without grad: make them carry one, or the
            # adapter's gradients inside the blocks would be lost (peft's own advice for checkpointing).
            model.enable_input_require_grads()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's parameters: the only ones the optimizer gets."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's file names (what adapter_model.safetensors holds)."""
        from peft import get_peft_model_state_dict

        return {name: t.detach() for name, t in get_peft_model_state_dict(self.peft_model).items()}

    def merged_state(self) -> dict[str, torch.Tensor]:
        """Every weight of the model under its own (HF) names, each adapted layer's W + (alpha / r) B A; tied
        weights stay the same tensor (the channels write them once)."""
        from peft.tuners.lora import LoraLayer

        deltas = {}
        with torch.no_grad():
            for name, module in self.model.named_modules():
                if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
                    deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(ADAPTER_NAME)
            merged = {}
            for name, tensor in self.model.state_dict().items():
                if ".lora_" in name:
                    continue
                if name in deltas:
                    tensor = tensor + deltas[name].to(tensor.dtype)
                merged[name.replace(".base_layer.", ".")] = tensor
        return merged

    def adapter_config(self) -> dict:
        """peft's adapter_config.json of this adapter, as peft's save_pretrained writes it."""
        config = self.peft_model.peft_config[ADAPTER_NAME].to_dict()
        config.update(base_model_name_or_path=self.base_model, inference_mode=True)
        return config

    # ------------------------------------------------------------------ what the learner calls

    def publish(self, channel, module: torch.nn.Module, version: int, zero_stage: int, send: bool) -> None:
        """Publish version `version`: the adapter, or with merge_for_sync the merged weights (module is DeepSpeed's
        engine.module: the same layers as self.model). Collective under ZeRO-3."""
        if self.settings.merge_for_sync:
            with _gathered(module.parameters(), zero_stage):
                if send:
                    channel.publish(self.merged_state(), version)
            return
        with _gathered(self.trainable_parameters(), zero_stage):
            if send:
                channel.publish({name: t.to(self.wire_dtype) for name, t in self.adapter_state().items()}, version)

    def export_merged(self, version: int, zero_stage: int, send: bool) -> bytes | None:
        """The merged weights as one safetensors file's bytes (RUN_DIR/final/model.safetensors)."""
        from safetensors.torch import save

        with _gathered(self.model.parameters(), zero_stage):
            if not send:
                return None
            return save(cpu_tensors(self.merged_state()), metadata={"format": "pt", "version": str(version)})

    def export_adapter(self, zero_stage: int, send: bool) -> dict[str, bytes] | None:
        """The adapter as a peft folder's files ({file name: bytes}): PeftModel.from_pretrained(base, folder)
        loads it, vLLM serves it as a LoRA adapter."""
        from safetensors.torch import save

        with _gathered(self.trainable_parameters(), zero_stage):
            if not send:
                return None
            weights = save(cpu_tensors(self.adapter_state()), metadata={"format": "pt"})
        config = json.dumps(self.adapter_config(), indent=2, sort_keys=True, default=sorted)  # sets as lists
        return {ADAPTER_WEIGHTS: weights, ADAPTER_CONFIG: config.encode()}


def _gathered(parameters, zero_stage: int):
    """ZeRO-3: the full values of `parameters` inside the context (a collective of every learner rank)."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=None)


def adapter_shape(settings: LoraConfig | None) -> dict | None:
    """What a checkpoint must agree on to be resumed (learner_state.json's "lora"): the adapter's tensors and scale.
    Dropout and merge_for_sync may change between runs."""
    if settings is None:
        return None
    return {"rank": settings.rank, "alpha": settings.alpha, "target_modules": settings.target_modules}


def check_resumable(checkpoint: Path, settings: LoraConfig | None) -> None:
    """Refuse, before DeepSpeed reads it, a checkpoint written with another learner.lora (or none)."""
    state = json.loads((checkpoint / "learner_state.json").read_text())
    saved, wanted = state.get("lora"), adapter_shape(settings)
    if saved != wanted:
        def describe(shape):
            return "full fine-tuning (learner.lora=null)" if shape is None else f"learner.lora={shape}"

        raise ValueError(f"the checkpoint in {checkpoint} was written with {describe(saved)}; this run has "
                         f"{describe(wanted)}: resume with the checkpoint's setting")
