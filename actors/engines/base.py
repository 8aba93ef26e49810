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

    @abstractmethod
    def generate(
        self, prompts_token_ids: list[list[int]], n: int, sampling: SamplingSettings
    ) -> list[list[Completion]]:
        """Sample n completions for every prompt; result[i][j] is the j-th sample of prompt i."""

    @abstractmethod
    def load_weights(self, weights_dir: str) -> None:
        """Replace the model's weights with the safetensors files in weights_dir (same architecture)."""

    # The nccl weight channel (resetrl/weights.py): the engine is a rank of the learner's broadcast group.
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
