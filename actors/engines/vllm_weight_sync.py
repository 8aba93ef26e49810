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
        self.refresh_tied_lm_head()
        return received

    def refresh_tied_lm_head(self) -> bool:
        """Re-run the LM head's post-load processing when it is tied to the embedding; True if it was.

        A reload skips a tied lm_head (vLLM logs "ParallelLMHead: Failed to load weights"): the shared tensor gets
        the new values, but on CPU vLLM computes logits from a packed copy of the head made at first load
        (dispatch_cpu_unquantized_gemm), so without this the engine samples from the initial head forever.
        (RotaryEmbedding's "Failed to load weights" is harmless: its cos/sin cache comes from the config.)
        """
        model = self.model_runner.get_model() if hasattr(self.model_runner, "get_model") else self.model_runner.model
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
            return False
        head.quant_method.process_weights_after_loading(head)
        return True

    def receive_weights_to_file(self, buckets: list[list[dict]], path: str) -> int:
        """Receive every planned bucket into one safetensors file at `path` instead of the model (learner.lora: the
        buckets hold an adapter, which the engine then serves as a LoRA adapter); returns the bytes received."""
        from safetensors.torch import save_file

        plan = [[TensorSpec.from_json(raw) for raw in bucket] for bucket in buckets]
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        tensors = {}
        for named in receive_buckets(self._resetrl_weight_group, plan, device):
            tensors.update((name, t.to("cpu", copy=True)) for name, t in named)  # views into a reused buffer
        save_file(tensors, path)
        return sum(t.numel() * t.element_size() for t in tensors.values())
