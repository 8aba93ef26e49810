"""The GPU presets (configs/gpu-*.yaml) cannot run here; what can be checked without GPUs is checked: every field is
valid, the prompt template fills, and the GPU bundles the run asks Ray for fit the GPUs its header says it needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from resetrl.config import RunConfig, load_config
from resetrl.record import PromptRecord

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("gpu-*.yaml"))


def header_number(path: Path, name: str) -> int | None:
    """`# name: N` from the preset's header comment (gpus, nodes)."""
    match = re.search(rf"^# {name}: (\d+)$", path.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def gpus_asked(cfg: RunConfig) -> float:
    """What the run's Ray actors reserve: rollout workers, learner ranks, and the evaluator when there is one."""
    rollout = cfg.rollout.num_workers * cfg.rollout.gpus_per_worker
    learner = cfg.learner.world_size * cfg.learner.gpus
    evaluator = cfg.eval.gpus if cfg.eval.holdout else 0.0
    return rollout + learner + evaluator


def test_the_three_presets_are_there():
    assert [p.name for p in PRESETS] == [
        "gpu-1x-grpo-qwen0.5b-gsm8k.yaml", "gpu-8x-srpo-qwen1.5b-math.yaml",
        "gpu-multinode-srpo-qwen7b-math.yaml",
    ]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_a_gpu_preset_is_valid_and_its_gpu_bundles_add_up(path):
    cfg = load_config(path)  # every field known and valid
    gpus = header_number(path, "gpus")
    assert gpus, f"{path.name}: the header must say '# gpus: N', the GPUs the preset needs"
    asked = gpus_asked(cfg)
    assert asked <= gpus + 1e-9, f"{path.name}: its actors reserve {asked} GPUs, the header says {gpus}"
    assert asked >= gpus - 1e-9, f"{path.name}: {gpus - asked} of its {gpus} GPUs would idle"
    # every role is on a GPU: vLLM engines, a bf16 learner
    assert cfg.rollout.engine == "vllm" and cfg.rollout.gpus_per_worker > 0 and cfg.learner.gpus > 0
    assert cfg.model.dtype == "bfloat16"
    if cfg.eval.holdout:
        assert cfg.eval.gpus > 0
    # NCCL refuses two ranks on one GPU: learner ranks and engines in an NCCL group each hold whole GPUs
    if cfg.learner.world_size > 1 or cfg.learner.weight_channel == "nccl":
        assert cfg.learner.gpus == 1
    if cfg.learner.weight_channel == "nccl":
        assert cfg.rollout.gpus_per_worker == 1
    # a fractional share means roles colocated on one GPU: their vLLM engines must leave the learner >= 40% of its
    # memory (bf16 weights, Adam states, activations and a float32 log-softmax over the vocabulary)
    if cfg.rollout.gpus_per_worker < 1:
        engines = 1 + (cfg.eval.holdout > 0)  # the rollout engine and the evaluator's, each at the same share
        assert engines * cfg.rollout.vllm_gpu_memory_utilization <= 0.6 + 1e-9


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_a_gpu_preset_reads_a_hub_model_and_a_hub_dataset(path):
    cfg = load_config(path)
    assert re.fullmatch(r"Qwen/Qwen2\.5-[0-9.]+B-Instruct", cfg.model.name)
    assert cfg.data.source == "hf" and "/" in cfg.data.path and cfg.data.split == "train"
    assert cfg.data.answer_format in ("gsm8k", "math_boxed")


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_a_gpu_presets_prompt_template_fills(path):
    from transformers import AutoTokenizer

    from resetrl.config import ModelConfig
    from resetrl.data import render_prompt
    from resetrl.models import resolve_model

    cfg = load_config(path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(ModelConfig(name="tiny-llama")))  # any chat tokenizer
    prompt = PromptRecord(prompt_id="p", question="What is 2 + 3?", answer="5", task="hf")
    text = tokenizer.decode(render_prompt(tokenizer, cfg.data, prompt))
    assert "What is 2 + 3?" in text and "{" not in text.replace("\\boxed{}", "")


def test_the_multi_node_preset_spans_its_nodes():
    path = ROOT / "configs" / "gpu-multinode-srpo-qwen7b-math.yaml"
    cfg = load_config(path)
    nodes, gpus = header_number(path, "nodes"), header_number(path, "gpus")
    assert nodes == 2 and gpus == 16
    assert cfg.ray.address == "auto"  # joins the cluster; the README command gives queue.redis_url
    assert cfg.learner.zero_stage == 3  # 7B of weights, gradients and Adam states partitioned over the ranks


def test_the_readme_gives_each_preset_a_command():
    readme = (ROOT / "README.md").read_text()
    for path in PRESETS:
        assert f"--config configs/{path.name}" in readme, f"README: no command for {path.name}"
