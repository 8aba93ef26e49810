"""Rollout engine on plain Hugging Face transformers: the fallback when vLLM is not installed.

Sampling is `model.generate` on left-padded batches. The behaviour log-prob of a sampled token is
log_softmax(logits / temperature) at that token, over the whole vocabulary: top-p decides which tokens can be
drawn but is not renormalised into the reported number (base.py). With top_p = 1 this is exactly the
distribution sampled from; with top_p < 1 the reported value is lower by log(kept probability mass).
Greedy decoding (temperature 0) reports log_softmax(logits), as vLLM does.

Shared prompt cache: the n samples of a prompt start from the same keys and values, so each distinct prompt of a
batch is encoded once and its cache copied to its n rows (all but the prompt's last token, which generate encodes
per row); the samples are those the per-row encoding gives (tests/test_engines.py checks it).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.logits_process import TopPLogitsWarper

from resetrl.actors.engines.base import Completion, Engine, SamplingSettings, empty_completion, request_budgets
from resetrl.actors.engines.lora import HFAdapter, adapter_tensors
from resetrl.weight_buckets import TensorSpec, open_group, open_store, receive_buckets


class HFEngine(Engine):
    name = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        device: str | None = None,
        max_batch_sequences: int = 64,
        share_prompt_cache: bool = True,
        lora=None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{model_path}: neither generation_config.json nor the tokenizer names an EOS token")
        self.eos_token_ids = {eos} if isinstance(eos, int) else set(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids)
        # Only what base.SamplingSettings asks for may shape the distribution: a model's own generation defaults
        # (top_k=50, repetition_penalty, ...) would make the sampled distribution differ from the reported one.
        self.model.generation_config = GenerationConfig(
            eos_token_id=sorted(self.eos_token_ids), pad_token_id=self.pad_token_id
        )
        self.max_batch_sequences = max_batch_sequences
        self.shares_prompt_prefill = share_prompt_cache  # False: every row encodes its prompt (the old path)
        self._call_seeds = random.Random(seed)
        # learner.lora: each version is a LoRA adapter applied by peft layers in the model (actors/engines/lora.py).
        self.adapter = HFAdapter(self.model, lora) if lora is not None else None

    @torch.no_grad()
    def generate(
        self,
        prompts_token_ids: list[list[int]],
        n: int,
        sampling: SamplingSettings,
        budgets: list[int] | None = None,
    ) -> list[list[Completion]]:
        limits = request_budgets(prompts_token_ids, n, sampling, budgets)
        if not prompts_token_ids:
            return []
        seed = sampling.seed if sampling.seed is not None else self._call_seeds.randrange(2**31)
        # Prompt-major rows, n per prompt; a prompt whose budget is spent gets no row.
        rows = [i for i, limit in enumerate(limits) for _ in range(n) if limit > 0]
        completions: list[Completion] = []
        # A private RNG stream: seeding here must not reseed the caller's (e.g. the learner's) global generator.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(rows), self.max_batch_sequences):
                chunk = rows[start : start + self.max_batch_sequences]
                completions += self._generate_batch(
                    [prompts_token_ids[i] for i in chunk], [limits[i] for i in chunk], sampling
                )
        result: list[list[Completion]] = [[] for _ in prompts_token_ids]
        for i, completion in zip(rows, completions):
            result[i].append(completion)
        return [samples or [empty_completion() for _ in range(n)] for samples in result]

    def _generate_batch(
        self, prompts: list[list[int]], limits: list[int], sampling: SamplingSettings
    ) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        greedy = sampling.temperature == 0
        recorder = _SampledLogprobs(1.0 if greedy else sampling.temperature)
        processors = LogitsProcessorList([recorder])
        if not greedy and sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        # Temperature and top-p are applied by the processors above (temperature=1, top_p=1, top_k=0 here), so the
        # recorder sees the raw logits and generate adds no warpers of its own.
        sampling_flags = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
        if greedy:
            sampling_flags = {"do_sample": False}
        config = GenerationConfig(
            **sampling_flags,
            max_new_tokens=max(limits),
            eos_token_id=sorted(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            stop_strings=list(sampling.stop) or None,
            return_dict_in_generate=True,
        )
        shared = self._shared_prompt_cache(prompts, input_ids, attention_mask) if self.shares_prompt_prefill else None
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=processors,
            tokenizer=self.tokenizer if sampling.stop else None,
            # A row whose budget is below the batch's largest is finished there (then padded, cut in _completion).
            stopping_criteria=StoppingCriteriaList([_RowBudgets(width, limits, input_ids.device)]),
            **({"past_key_values": shared} if shared is not None else {}),
        )
        new_tokens = out.sequences[:, width:].cpu()
        logprobs = recorder.finish(out.sequences[:, -1]).cpu()
        return [
            self._completion(new_tokens[row].tolist(), logprobs[row].tolist(), sampling, limits[row])
            for row in range(len(prompts))
        ]

    def _shared_prompt_cache(self, prompts: list[list[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Keys and values of the batch's prompts, each distinct prompt encoded once and copied to its rows; None
        when no prompt repeats (nothing to share). The last column is left for generate, which needs one new token
        per row to start from."""
        distinct: dict[tuple[int, ...], int] = {}
        prompt_of_row = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        if len(distinct) == len(prompts) or input_ids.shape[1] < 2:
            return None
        first_rows = [prompt_of_row.index(k) for k in range(len(distinct))]
        ids, mask = input_ids[first_rows, :-1], attention_mask[first_rows, :-1]
        # The positions and mask generate would use for these columns (generation/utils.py: cumsum of the mask,
        # padding at 0; an all-ones mask dropped), so every row sees the keys and values its own encoding gives.
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = self.model(
            input_ids=ids,
            attention_mask=None if bool((attention_mask == 1).all()) else mask,
            position_ids=position_ids,
            use_cache=True,
        ).past_key_values
        cache.reorder_cache(torch.tensor(prompt_of_row, device=input_ids.device))
        return cache

    def _completion(
        self, tokens: list[int], logprobs: list[float], sampling: SamplingSettings, limit: int
    ) -> Completion:
        # After a sequence finishes, generate fills its row with pad tokens, and pad is often the EOS itself:
        # the first EOS ends the response (kept, as vLLM keeps it), a stop string ends it just before that.
        end = next((t + 1 for t, token in enumerate(tokens) if token in self.eos_token_ids), None)
        finish = "stop" if end is not None else "length"
        end = end if end is not None else len(tokens)
        stop_end = self._stop_string_end(tokens[: end - 1] if finish == "stop" else tokens, sampling.stop)
        if stop_end is not None:
            end, finish = stop_end, "stop"
        if end > limit:  # finished by its budget: the pad after it may be the EOS
            end, finish = limit, "length"
        tokens, logprobs = tokens[:end], logprobs[:end]
        return Completion(
            token_ids=tokens,
            logprobs=logprobs,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=finish,
        )

    def _stop_string_end(self, tokens: list[int], stops: tuple[str, ...]) -> int | None:
        """Number of tokens up to and including the one that completes the first stop string, if any."""
        if not stops:
            return None
        text = self.tokenizer.decode(tokens)
        hits = [text.find(stop) + len(stop) for stop in stops if stop in text]
        if not hits:
            return None
        first_end = min(hits)
        low, high = 1, len(tokens)  # smallest prefix whose text reaches the end of the stop string
        while low < high:
            mid = (low + high) // 2
            if len(self.tokenizer.decode(tokens[:mid])) >= first_end:
                high = mid
            else:
                low = mid + 1
        return low

    def load_weights(self, weights_dir: str) -> None:
        """Copy `weights_dir/*.safetensors` (names as in model.state_dict()) into the live model, in place."""
        if self.adapter is not None:  # learner.lora: the folder holds the adapter's tensors
            self.adapter.load(adapter_tensors(weights_dir))
            return
        files = sorted(Path(weights_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {weights_dir}: expected model.safetensors")
        state = {}
        for file in files:
            state.update(load_file(file))
        params = self.model.state_dict()
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"{weights_dir} holds tensors this model does not have: {unknown[:5]}")
        # With tied embeddings lm_head.weight *is* embed_tokens.weight, so a checkpoint may leave it out.
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        missing = sorted(set(params) - set(state) - tied)
        if missing:
            raise KeyError(f"{weights_dir} lacks tensors of this model: {missing[:5]} ({len(missing)} in all)")
        for name, tensor in state.items():  # check everything before copying anything: no half-loaded model
            if params[name].shape != tensor.shape:
                expected = tuple(params[name].shape)
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} in {weights_dir}, the model's is {expected}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> None:
        store = open_store(host, port, rank, world_size, timeout_s)
        self._weight_group = open_group(store, rank, world_size, backend, timeout_s)

    def receive_weights(self, buckets: list[list[dict]]) -> None:
        plan = [[TensorSpec.from_json(raw) for raw in bucket] for bucket in buckets]
        if self.adapter is not None:  # learner.lora: the buckets hold the adapter (copied out of the reused buffer)
            received = [(name, t.clone()) for named in receive_buckets(self._weight_group, plan, self.device)
                        for name, t in named]
            self.adapter.load(dict(received))
            return
        params = self.model.state_dict()
        # Checked before receiving, but every bucket is still received: the learner's broadcast needs every rank.
        problems = [f"{s.name}: not in this model" for b in plan for s in b if s.name not in params]
        problems += [f"{s.name}: shape {s.shape}, the model's is {tuple(params[s.name].shape)}"
                     for b in plan for s in b if s.name in params and tuple(params[s.name].shape) != s.shape]
        with torch.no_grad():
            for named in receive_buckets(self._weight_group, plan, self.device):
                if not problems:
                    for name, tensor in named:
                        params[name].copy_(tensor)
        if problems:
            raise ValueError(f"broadcast weights do not fit this model ({len(problems)} tensors): {problems[:5]}")

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _RowBudgets(StoppingCriteria):
    """Finishes each row once it has generated its own budget of tokens (per-prompt budgets within one batch)."""

    def __init__(self, prompt_width: int, limits: list[int], device: torch.device) -> None:
        self.prompt_width = prompt_width
        self.limits = torch.tensor(limits, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.limits


class _SampledLogprobs(LogitsProcessor):
    """Records log_softmax(logits / T) of each sampled token without keeping a (batch, steps, vocab) tensor.

    generate calls processors before sampling step t; the token sampled at step t shows up as the last column of
    input_ids at step t + 1, so each call gathers the previous step's log-probs. `finish` gathers the last step.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.gathered: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self._gather(input_ids[:, -1])
        scaled = scores / self.temperature
        self.previous = torch.log_softmax(scaled.float(), dim=-1)
        return scaled

    def _gather(self, tokens: torch.Tensor) -> None:
        self.gathered.append(self.previous.gather(1, tokens[:, None]).squeeze(1))

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._gather(last_tokens)
        return torch.stack(self.gathered, dim=1)

