"""The vLLM side of the nccl weight channel: a worker extension, mixed into every vLLM worker by
`worker_extension_cls`, that makes the worker a rank of the learner's broadcast group and loads received buckets.

vLLM calls these through `llm.collective_rpc(name, kwargs=...)` on every worker (VLLMEngine.join_weight_group /
receive_weights); `self` is then the worker, so `self.model_runner.model` is the live model. Received tensors go
through the model's own `load_weights` (HF names; it fuses q/k/v and gate/up and skips a tied lm_head), one bucket
at a time, so the extra GPU memory is one bucket. The synchronisation (learner blocks until every engine joins;
engines join between generation batches) is described in resetrl/weights/nccl.py.

One rank per engine: with tensor parallelism every worker would need a rank of its own (rank + its TP rank) and the
learner a bigger group; resetrl runs vLLM with tensor parallel size 1.
"""

from __future__ import annotations

import torch

from resetrl.weights.buckets import TensorSpec, open_group, open_store, receive_buckets

EXTENSION = f"{__name__}.WeightSyncWorkerExtension"


class WeightSyncWorkerExtension:
    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> None:
        store = open_store(host, port, rank, world_size, timeout_s)
        self._resetrl_weight_group = open_group(store, rank, world_size, backend, timeout_s)

    def receive_weights(self, buckets: list[list[dict]]) -> int:
        """Receive every planned bucket into the model; returns the bytes received."""
        plan = [[TensorSpec.from_json(raw) for raw in bucket] for bucket in buckets]
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        model = self.model_runner.model
        received = 0
        for named in receive_buckets(self._resetrl_weight_group, plan, device):
            model.load_weights(weights=named)
            received += sum(t.numel() * t.element_size() for _, t in named)
        return received
