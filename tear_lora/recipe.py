"""Recipes: one YAML file fully describes a run.

A recipe maps one to one onto the dataclasses below (recipe_yaml.py does the mapping, with FILE:LINE errors and
closest-key suggestions); here are the sections, the values that are impossible together, the hash that says
whether two recipes train the same thing, and the credentials that never leave the process. The `training`
section is passed through to TRL's `SFTConfig` under its own field names, so every HF training knob is available
without us re-declaring it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tear_lora.data.rawdata import DATA_FIELD_ROLES
from tear_lora.recipe_yaml import RecipeError, Where, apply_override, build, read_yaml, suggest, yaml_quirks
from tear_lora.recipe_yaml import to_dict as plain_dict
from tear_lora.rundir import check_run_name, child_dir, unsafe_root_reason


def _choices(*values):
    return {"choices": values}


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen3-1.7B-Base"  # hub id or local dir
    revision: str | None = None  # hub branch/tag/commit; recorded in the adapter metadata
    load_in_4bit: bool = True  # QLoRA: frozen base in 4-bit, adapters in higher precision
    quant_type: str = field(default="nf4", metadata=_choices("nf4", "fp4"))
    double_quant: bool = True  # quantize the quantization constants too: ~0.4 bit/param saved
    compute_dtype: str = field(default="bfloat16", metadata=_choices("bfloat16", "float16", "float32"))
    dtype: str = field(default="bfloat16", metadata=_choices("bfloat16", "float16", "float32"))  # unquantized weights
    attn_implementation: str | None = field(default="sdpa", metadata=_choices(None, "sdpa", "eager", "flash_attention_2"))
    # PEFT's prepare_model_for_kbit_training upcasts every unquantized weight (the whole embedding too) to fp32.
    upcast_to_fp32: bool = False
    trust_remote_code: bool = False


@dataclass
class TokensConfig:
    # How the rows of newly added structural tokens start: the mean embedding of descriptive words (see
    # tokens.py), the mean of all embedding rows, or left as the model has them.
    init: str = field(default="mean_of_words", metadata=_choices("mean_of_words", "mean", "none"))


@dataclass
class LoraSettings:
    r: int = 16  # rank: higher increases capacity and memory
    alpha: int = 32  # scale = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"  # "all-linear" or a list of module names
    use_rslora: bool = False
    use_dora: bool = False  # better quality per rank; ~2x slower on 4-bit bases
    bias: str = field(default="none", metadata=_choices("none", "all", "lora_only"))




@dataclass
class DataConfig:
    train_file: str = "data/raw/consequences.jsonl"
    eval_file: str | None = "data/raw/eval.jsonl"
    max_seq_len: int = 1024
    # trim_input_left: drop the oldest input tokens until the row fits (response and witness are never cut);
    # reject: any row over max_seq_len is rejected with its reason.
    truncation: str = field(default="trim_input_left", metadata=_choices("trim_input_left", "reject"))
    min_input_tokens: int = 8  # a row whose input would shrink below this is rejected instead of trimmed
    skip_invalid: bool = False  # keep going past bad rows (listed, with an excerpt, in a rejects file)
    processed_dir: str = "data/processed"
    # Your column names for our roles, e.g. {input: prompt, response: answer, witness: outcome}; a role not
    # listed uses its own name. Roles: input, response, witness, id, meta.
    fields: dict[str, str] = field(default_factory=dict)
    # Columns no role uses are ignored with one notice per column; true keeps them in each row's meta.
    keep_extra_fields: bool = False
    # Padding-free training: pack whole triples (never split) into rows of up to max_seq_len tokens, each triple
    # attending only to itself (position ids restart at every triple), so no compute goes to padding. The
    # per_device_train_batch_size then counts packed rows. Evaluation stays one triple per row.
    packing: bool = False


@dataclass
class ObjectiveConfig:
    lambda_: float = field(default=1.0, metadata={"key": "lambda"})  # weight of the witness (consequence) loss
    lambda_warmup_steps: int = 0  # lambda ramps linearly from 0 over this many optimizer steps
    # target tokens per logits chunk: about chunk * vocab * 6 bytes alive (fp32 logits + compute-dtype copy). 256
    # was as fast as 1024 on an H200 (Qwen3-1.7B, 2048 tokens) and 0.6 GB smaller (docs/performance.md)
    loss_chunk_size: int = 256
    # Per-row weight of the response loss, keyed by the row's meta.valence, e.g. {harmful: 0.0, mixed: 0.5}: the
    # response term becomes sum_rows w * NLL / sum_rows w * tokens over the optimizer step, so a 0 row is still
    # learned from through its witness but its response is not imitated. Rows whose valence is not listed (or that
    # have none) weigh 1. Empty: every row 1, exactly the unweighted loss. Evaluation NLL is never weighted.
    response_weight: dict[str, float] = field(default_factory=dict)


@dataclass
class OutputConfig:
    run_name: str = "run"
    dir: str = "adapters"
    overwrite: bool = False  # replace an existing adapters/<run_name>/


@dataclass
class DistributedConfig:
    # Several processes (torchrun / accelerate launch) run plain DDP by default: each holds the whole 4-bit base.
    # fsdp: true shards it instead (FSDP2 per decoder layer + the root: embeddings, output layer, tag rows), for a
    # base that does not fit one card; the 4-bit weights are then stored in model.dtype (bnb_4bit_quant_storage),
    # which FSDP needs to shard them. Ignored in a single process. Sharding changes memory, not what is trained.
    fsdp: bool = False


@dataclass
class HardwareConfig:
    gpu_memory_gb: float = 16.0  # the card this recipe is meant for; `tear-lora plan` checks against it


# Training keys tear_lora derives itself; setting them in the recipe would be silently ignored otherwise.
# Fields added after runs were already hashed: left out of Recipe.hash while at their default (no response
# weights, padded rows), so sweeps still recognise those runs.
HASH_NEUTRAL_DEFAULTS = (("objective", "response_weight"), ("data", "packing"))

RESERVED_TRAINING_KEYS = {
    "output_dir": "set output.dir and output.run_name instead",
    "remove_unused_columns": "tear_lora needs its span-role column and sets this itself",
    "dataset_kwargs": "tear_lora tokenizes the data itself",
    "max_length": "set data.max_seq_len instead",
    "packing": "set data.packing instead (TRL's own packing drops the span roles and our collator)",
    "padding_free": "set data.packing instead (TRL's own packing drops the span roles and our collator)",
    "completion_only_loss": "the loss is defined by objective.lambda",
    "assistant_only_loss": "the loss is defined by objective.lambda",
}


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: dict[str, Any] = field(default_factory=dict,  # any SFTConfig / TrainingArguments field
                                     metadata={"check": lambda raw, where: check_training(raw, where)})
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    source: str | None = field(default=None, metadata={"internal": True})  # file it was read from

    @property
    def lambda_(self) -> float:
        return self.objective.lambda_

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, secrets masked: this is what gets written next to an adapter."""
        return yaml.safe_dump(mask_secrets(self.to_dict()), sort_keys=False)

    def trained_dict(self) -> dict[str, Any]:
        """What the recipe trains, as a dict (secrets masked): every section but `output`, which only says where
        the result goes and whether to replace it, `distributed` (sharded training computes the same adapter) and
        `hardware` (the card `plan` checks against). Resume compares these key by key to name what changed."""
        trained = {k: v for k, v in mask_secrets(self.to_dict()).items() if k not in ("output", "distributed")}
        trained["hardware"] = plain_dict(HardwareConfig())  # at its default whatever it is: older hashes still match
        for section, key in HASH_NEUTRAL_DEFAULTS:  # at their (falsy) defaults, older runs' hashes still match
            if not trained[section].get(key):
                trained[section] = {k: v for k, v in trained[section].items() if k != key}
        return trained

    def hash(self) -> str:
        """Content hash of `trained_dict()` (not of the file's formatting)."""
        return hashlib.sha256(json.dumps(self.trained_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def run_dir(self) -> Path:
        """`output.dir/output.run_name`, refused (RunDirError) if it would land anywhere else."""
        return child_dir(self.output.dir, self.output.run_name)


# ---- loading -------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None, saved: bool = False,
                text: str | None = None) -> Recipe:
    """Read a YAML recipe, apply `key.path=value` overrides, and validate it into a Recipe. `saved`: the recipe.yaml
    next to an adapter, whose credentials are masked on read instead of refused (older adapters may hold one).
    `text`: the file's contents, already read by the caller."""
    path = Path(path)
    raw, lines = read_yaml(path, text)
    for item in overrides or []:
        apply_override(raw, item)
    if saved:
        raw = mask_secrets(raw)
    recipe = build(Recipe, raw, "", Where(str(path), lines))
    recipe.source = str(path)
    _validate_values(recipe, Where(str(path), lines))
    return recipe


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    recipe = build(Recipe, raw, "", Where(source, {}))
    _validate_values(recipe, Where(source, {}))
    return recipe


def check_training(raw: Any, where: Where) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where('training')}: 'training' must be a mapping of SFTConfig fields")
    from trl import SFTConfig  # deferred: importing TRL takes seconds and most verbs never need it

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    for key in raw:
        if key in RESERVED_TRAINING_KEYS:
            raise RecipeError(f"{where('training.' + key)}: 'training.{key}' is not allowed: {RESERVED_TRAINING_KEYS[key]}")
        if key not in known:
            raise RecipeError(
                f"{where('training.' + key)}: unknown key 'training.{key}' (not an SFTConfig field){suggest(key, known)}"
            )
    secret = _secret_key_path(raw, "training")
    if secret:
        raise RecipeError(f"{where(secret)}: '{secret}' holds a credential; recipes are copied next to every "
                          "adapter and HF pickles training arguments into pushed checkpoints, so tokens are not "
                          "taken from them: log in with `hf auth login` (or set HF_TOKEN) and remove the key")
    return {key: yaml_quirks(key, value) for key, value in raw.items()}


def _validate_values(recipe: Recipe, where: Where) -> None:
    """Impossible values, each named by its key path."""
    checks = [
        ("lora.r", recipe.lora.r > 0, "must be > 0"),
        ("lora.alpha", recipe.lora.alpha > 0, "must be > 0"),
        ("lora.dropout", 0.0 <= recipe.lora.dropout < 1.0, "must be in [0, 1)"),
        ("data.max_seq_len", recipe.data.max_seq_len >= 16, "must be >= 16"),
        ("data.min_input_tokens", recipe.data.min_input_tokens >= 0, "must be >= 0"),
        ("objective.lambda", recipe.objective.lambda_ >= 0.0, "must be >= 0"),
        ("objective.lambda_warmup_steps", recipe.objective.lambda_warmup_steps >= 0, "must be >= 0"),
        ("objective.loss_chunk_size", recipe.objective.loss_chunk_size > 0, "must be > 0"),
        ("output.run_name", check_run_name(recipe.output.run_name) is None, check_run_name(recipe.output.run_name)),
        ("output.dir", unsafe_root_reason(recipe.output.dir) is None,
         f"{unsafe_root_reason(recipe.output.dir)}; runs are created and replaced inside it"),
        ("hardware.gpu_memory_gb", recipe.hardware.gpu_memory_gb > 0, "must be > 0"),
        ("model.name_or_path", bool(recipe.model.name_or_path), "must be non-empty"),
    ]
    for key_path, ok, message in checks:
        if not ok:
            raise RecipeError(f"{where(key_path)}: '{key_path}' {message}")
    for valence, weight in recipe.objective.response_weight.items():  # keys: any meta.valence string
        key_path = f"objective.response_weight.{valence}"
        if not isinstance(valence, str):
            raise RecipeError(f"{where(key_path)}: '{key_path}': keys are meta.valence strings, got "
                              f"{type(valence).__name__} {valence!r} (quote it)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise RecipeError(f"{where(key_path)}: '{key_path}' must be a number >= 0, got {weight!r}")
    # ints widen to floats, as `check_type` does for float fields: `0` and `0.0` are one recipe (one hash)
    recipe.objective.response_weight = {k: float(v) for k, v in recipe.objective.response_weight.items()}
    columns: dict[str, str] = {}  # data.fields: known roles, non-empty names, no column serving two roles
    for role, column in recipe.data.fields.items():
        key_path = f"data.fields.{role}"
        if role not in DATA_FIELD_ROLES:
            raise RecipeError(f"{where(key_path)}: unknown role '{key_path}'{suggest(str(role), DATA_FIELD_ROLES)}")
        if not isinstance(column, str) or not column.strip():
            raise RecipeError(f"{where(key_path)}: '{key_path}' must be a non-empty column name, got {column!r}")
    for role in DATA_FIELD_ROLES:
        column = recipe.data.fields.get(role, role)
        if column in columns:
            other = role if role in recipe.data.fields else columns[column]
            raise RecipeError(f"{where('data.fields.' + other)}: column {column!r} would serve both roles "
                              f"'{columns[column]}' and '{role}'; map one of them to another column")
        columns[column] = role
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = recipe.training.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise RecipeError(f"{where('training.' + key)}: 'training.{key}' must be an integer >= 1, got {value!r}")


# Keys whose values are credentials. Not every "*_token" is one: eos_token / pad_token are SFTConfig settings.
SECRET_KEY_PATTERN = re.compile(r"^(token|hub_token|hf_token|push_to_hub_token|access_token|auth_token)$"
                                r"|(^|_)(password|passwd|secret|api_key|apikey|credentials?)$", re.IGNORECASE)
MASK = "<masked>"


def mask_secrets(value: Any) -> Any:
    """`value` with every secret-looking key's value (hub_token, api_key, ...) replaced by a mask, recursively.

    Recipes may carry `training.hub_token`; what we write to disk (recipe.yaml, metadata, model cards) is
    shared with adapters, so the value itself never leaves the process.
    """
    if isinstance(value, dict):
        return {k: MASK if SECRET_KEY_PATTERN.search(str(k)) and v not in (None, "") else mask_secrets(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def _secret_key_path(value: Any, prefix: str) -> str | None:
    """The key path of the first non-empty secret-looking key at any depth of `value`, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}"
            if SECRET_KEY_PATTERN.search(str(key)) and item not in (None, "", MASK):
                return path
            found = _secret_key_path(item, path)
            if found:
                return found
    elif isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _secret_key_path(v, f"{prefix}.{i}"))), None)
    return None
