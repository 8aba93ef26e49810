"""The engine interface every rollout engine (vLLM, HF transformers) implements.

An engine turns prompt token ids into sampled completions and reports, for every sampled token, its
log-probability under the *sampling* distribution (logits / temperature, no top-p/top-k truncation):
the learner recomputes the same quantity for the importance ratio pi_theta / pi_behaviour.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    token_ids: list[int]  # response tokens only (no prompt, no padding)
    logprobs: list[float]  # behaviour log-prob of each token in token_ids, same length
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (hit max_new_tokens)
    extra: dict = field(default_factory=dict)


class Engine(ABC):
    name: str
    # True when one call computes each distinct prompt once however many samples it draws from it (vLLM prefix
    # caching, the HF engine's shared prompt cache); False when every sample re-encodes its prompt. The rollout
    # context counts the prefill compute (tokens_prefill) from it.
    shares_prompt_prefill: bool = False

    @abstractmethod
    def generate(
        self,
        prompts_token_ids: list[list[int]],
        n: int,
        sampling: SamplingSettings,
        budgets: list[int] | None = None,
    ) -> list[list[Completion]]:
        """Sample n completions for every prompt; result[i][j] is the j-th sample of prompt i.

        budgets[i] (optional) caps prompt i's completions at that many tokens, below sampling.max_new_tokens; a
        completion cut by its budget ends with finish_reason "length", and a budget of 0 gives empty completions.
        """

    @abstractmethod
    def load_weights(self, weights_dir: str) -> None:
        """Replace the model's weights with the safetensors files in weights_dir (same architecture)."""

    # The nccl weight channel (resetrl/weights/): the engine is a rank of the learner's broadcast group.
    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> None:
        """Become `rank` of the weight broadcast group whose store the learner hosts at host:port."""
        raise NotImplementedError(
            f"the {self.name} engine cannot receive broadcast weights: set learner.weight_channel to shared_folder "
            "or ray_object_store"
        )

    def receive_weights(self, buckets: list[list[dict]]) -> None:
        """Receive one update, bucket by bucket as planned (weight_buckets.TensorSpec JSON), into the model."""
        raise NotImplementedError(
            f"the {self.name} engine cannot receive broadcast weights: set learner.weight_channel to shared_folder "
            "or ray_object_store"
        )

    def close(self) -> None:
        """Release the engine's resources (processes, memory)."""


def request_budgets(
    prompts_token_ids: list[list[int]], n: int, sampling: SamplingSettings, budgets: list[int] | None
) -> list[int]:
    """Checks a generate request and returns each prompt's token budget: min(budgets[i], sampling.max_new_tokens)."""
    if n < 1:
        raise ValueError(f"n = {n}: ask for at least one sample per prompt")
    for i, prompt in enumerate(prompts_token_ids):
        if not prompt:
            raise ValueError(f"prompt {i} has no tokens: every prompt needs at least one token")
    if budgets is None:
        return [sampling.max_new_tokens] * len(prompts_token_ids)
    if len(budgets) != len(prompts_token_ids):
        raise ValueError(f"{len(budgets)} budgets for {len(prompts_token_ids)} prompts: give one budget per prompt")
    negative = [(i, b) for i, b in enumerate(budgets) if b < 0]
    if negative:
        raise ValueError(
            f"budgets[{negative[0][0]}] = {negative[0][1]}: a budget is the number of tokens a prompt may still "
            "generate, at least 0 (clamp the caller's remainder with max(0, ...))"
        )
    return [min(int(b), sampling.max_new_tokens) for b in budgets]


def empty_completion() -> Completion:
    """What a prompt whose budget is already spent gets: nothing generated, cut by length."""
    return Completion(token_ids=[], logprobs=[], text="", finish_reason="length")
