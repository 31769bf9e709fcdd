"""The adapter directory format, and loading adapters (one base, many lambda) for comparison.

`adapters/<run>/` holds:
  adapter_config.json, adapter_model.safetensors   PEFT adapter: LoRA + the six structural token rows
  tokenizer.json, tokenizer_config.json            the base tokenizer with the structural tokens
  recipe.yaml                                      the resolved recipe (re-run it to reproduce)
  tear_lora.json                                   what to compare runs by (schema below)
  checkpoints/                                     Trainer checkpoints (for --resume)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

METADATA_FILE = "tear_lora.json"
METADATA_VERSION = 1


def base_identity(name_or_path: str, revision: str | None = None, config=None) -> dict[str, Any]:
    """How we recognise a base model: hub id + revision + commit, or a content hash of a local dir's weights."""
    identity = {"name_or_path": name_or_path, "revision": revision,
                "commit_hash": getattr(config, "_commit_hash", None) if config is not None else None,
                "content_sha256": None}
    path = Path(name_or_path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json")):
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        identity["content_sha256"] = digest.hexdigest()
    return identity


def same_base(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Content hashes decide when both have one; otherwise hub id, revision and commit must agree."""
    if a.get("content_sha256") and b.get("content_sha256"):
        return a["content_sha256"] == b["content_sha256"]

    def agree(key: str) -> bool:
        return a.get(key) is None or b.get(key) is None or a[key] == b[key]

    return a.get("name_or_path") == b.get("name_or_path") and agree("revision") and agree("commit_hash")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("tear_lora", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _manifest_summary(manifest: dict | None) -> dict | None:
    if manifest is None:
        return None
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return {"source": manifest["source"], "source_sha256": manifest["source_sha256"], "manifest_sha256": digest,
            "rows": manifest["rows_kept"], "rows_rejected": manifest["rows_rejected"],
            "tokens": {k: v["sum"] for k, v in manifest["tokens"].items()}}


def quantization_identity(cfg) -> dict[str, Any]:
    """How the base was quantized (a recipe's ModelConfig): the same weights quantized otherwise are another base."""
    return {"load_in_4bit": cfg.load_in_4bit, "quant_type": cfg.quant_type, "double_quant": cfg.double_quant,
            "compute_dtype": cfg.compute_dtype}


def write_run_metadata(run_dir: Path, recipe, tokenizer, train_manifest: dict, eval_manifest: dict | None,
                       metrics: dict, trainable: dict, log_history: list | None = None) -> dict:
    from transformers import AutoConfig

    from .data import tokenizer_hash
    from .tokens import structural_token_ids

    cfg = recipe.model
    config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    metadata = {
        "format_version": METADATA_VERSION,
        "run_name": recipe.output.run_name,
        "lambda": recipe.objective.lambda_,
        "lambda_warmup_steps": recipe.objective.lambda_warmup_steps,
        "base": base_identity(cfg.name_or_path, cfg.revision, config),
        "quantization": quantization_identity(cfg),
        "tokenizer": {"hash": tokenizer_hash(tokenizer), "size": len(tokenizer)},
        "structural_tokens": structural_token_ids(tokenizer),
        "data": {"train": _manifest_summary(train_manifest), "eval": _manifest_summary(eval_manifest)},
        "recipe_sha256": recipe.hash(),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None},
        "trainable_parameters": trainable,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (run_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    if log_history is not None:
        (run_dir / "log_history.json").write_text(json.dumps(log_history, indent=1))
    return metadata


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir}: not a tear_lora adapter dir (no {METADATA_FILE})")
    return json.loads(path.read_text())


# ---- loading adapters onto one base ----------------------------------------------------------------------------


class AdapterError(ValueError):
    """An adapter that cannot be used as asked (wrong base, wrong tokenizer, not an adapter dir); exit status 2."""


def adapter_recipe(adapter_dir: str | Path, base: str | None = None):
    """The recipe an adapter was trained with, pointed at `base` (a local copy of the base) when given."""
    from .recipe import load_recipe

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists() or not (adapter_dir / METADATA_FILE).exists():
        raise AdapterError(f"{adapter_dir}: not a tear_lora adapter dir (needs adapter_config.json and {METADATA_FILE})")
    recipe = load_recipe(adapter_dir / "recipe.yaml")
    if base is not None:
        recipe.model.name_or_path = str(base)
        recipe.model.revision = None
    return recipe


def given_base(recipe) -> dict[str, Any]:
    """The identity of the base a recipe points at (for a local dir this reads every weight file once)."""
    from transformers import AutoConfig

    from .model import ModelLoadError

    cfg = recipe.model
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"cannot read the base '{cfg.name_or_path}' (pass --base PATH to a local copy): {e}") from None
    return base_identity(cfg.name_or_path, cfg.revision, config)


def check_base(adapter_dir: str | Path, recipe, tokenizer, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuse an adapter whose recorded base or vocabulary differs from the ones about to be used.

    LoRA deltas and token rows are only meaningful on the exact weights they were trained against; on another
    base they load without error and silently produce a different model. Returns the adapter's metadata.
    """
    from .data import tokenizer_hash

    metadata = read_metadata(adapter_dir)
    cfg = recipe.model
    given, recorded = given or given_base(recipe), metadata["base"]
    # a hub base given as its local cache snapshot (.../snapshots/<commit>) is the same base
    snapshot = recorded.get("commit_hash") and Path(cfg.name_or_path).name == recorded["commit_hash"]
    if not (same_base(recorded, given) or snapshot):
        raise AdapterError(f"{adapter_dir}: trained on base {_describe(recorded)}, but the base given is "
                           f"{_describe(given)}; pass --base PATH pointing at a copy of the base it was trained on")
    if tokenizer_hash(tokenizer) != metadata["tokenizer"]["hash"]:
        raise AdapterError(f"{adapter_dir}: the tokenizer of base '{cfg.name_or_path}' (with the structural tokens) "
                           f"has hash {tokenizer_hash(tokenizer)}, the adapter was trained with {metadata['tokenizer']['hash']}")
    return metadata


def _describe(identity: dict[str, Any]) -> str:
    extra = [f"{k} {identity[k][:12]}" for k in ("revision", "commit_hash", "content_sha256") if identity.get(k)]
    return f"'{identity['name_or_path']}'" + (f" ({', '.join(extra)})" if extra else "")


def peft_name(label: str) -> str:
    """PEFT keeps adapters in ParameterDicts, whose keys may not contain '.', e.g. in 'run-lambda0.5'."""
    return label.replace(".", "_")


class AdapterSet:
    """One 4-bit base in memory, several adapters on it, switched with `use(name)`.

    Loading the base once and switching adapters (`set_adapter`: LoRA layers and token rows swap together)
    costs milliseconds, where reloading the base per adapter costs seconds to minutes. Every adapter must
    record the same base and vocabulary as the first; any other is refused.
    """

    def __init__(self, first_adapter: str | Path, base: str | None = None):
        import time

        from .model import load_base, load_tokenizer_for

        self.recipe = adapter_recipe(first_adapter, base)
        self.tokenizer = load_tokenizer_for(self.recipe)
        self.metadata: dict[str, dict[str, Any]] = {}
        self.dirs: dict[str, Path] = {}
        self.adapter_load_s: dict[str, float] = {}
        self._base_identity = given_base(self.recipe)
        first = self._check(first_adapter)  # refuse before the slow part
        started = time.perf_counter()
        self._base = load_base(self.recipe, self.tokenizer)
        self.base_load_s = time.perf_counter() - started
        self.model = None
        self.add(first_adapter, first)

    def _check(self, adapter_dir: str | Path) -> dict[str, Any]:
        metadata = check_base(adapter_dir, self.recipe, self.tokenizer, self._base_identity)
        loaded = quantization_identity(self.recipe.model)
        if metadata.get("quantization", loaded) != loaded:
            raise AdapterError(f"{adapter_dir}: trained on the base quantized as {metadata['quantization']}, "
                               f"but the loaded base is {loaded}; compare it in a separate run")
        return metadata

    def add(self, adapter_dir: str | Path, _checked: dict[str, Any] | None = None) -> str:
        """Load one more adapter (not activated); returns its name (the run name, made unique)."""
        import time

        from peft import PeftModel

        started = time.perf_counter()
        metadata = _checked or self._check(adapter_dir)
        name = label = metadata.get("run_name") or Path(adapter_dir).name
        n = 2
        while peft_name(label) in {peft_name(k) for k in self.metadata}:
            label, n = f"{name}-{n}", n + 1
        if self.model is None:
            self.model = PeftModel.from_pretrained(self._base, str(adapter_dir), adapter_name=peft_name(label))
        else:
            self.model.load_adapter(str(adapter_dir), adapter_name=peft_name(label))
        self.model.eval()
        self.metadata[label], self.dirs[label] = metadata, Path(adapter_dir)
        self.adapter_load_s[label] = time.perf_counter() - started
        return label

    def use(self, label: str) -> None:
        self.model.set_adapter(peft_name(label), inference_mode=True)

    @property
    def labels(self) -> list[str]:
        return list(self.metadata)


class MergedModel:
    """A `tear-lora merge` output (or any HF model dir with the tags), with AdapterSet's interface."""

    def __init__(self, path: str | Path):
        import torch
        from transformers import AutoModelForCausalLM

        from .model import guard_bnb_cpu
        from .recipe import load_recipe, recipe_from_dict

        path = Path(path)
        self.tokenizer = self.load_tokenizer(path)
        meta_file, recipe_file = path / METADATA_FILE, path / "recipe.yaml"
        self.metadata = {path.name: json.loads(meta_file.read_text()) if meta_file.exists() else {}}
        self.recipe = load_recipe(recipe_file) if recipe_file.exists() else recipe_from_dict({})
        device_map = "cuda" if torch.cuda.is_available() else None
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device_map).eval()
        guard_bnb_cpu(self.model)

    @staticmethod
    def load_tokenizer(path: str | Path):
        """The saved tokenizer, which must hold the six tags as single tokens."""
        from transformers import AutoTokenizer

        from .tokens import structural_token_ids

        tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            structural_token_ids(tokenizer)
        except ValueError as e:
            raise AdapterError(f"{path}: not a tear_lora model ({e})") from None
        return tokenizer

    @property
    def labels(self) -> list[str]:
        return list(self.metadata)

    def use(self, label: str) -> None:
        """One model, nothing to switch."""


def open_source(path: str | Path, base: str | None = None):
    """An adapter dir (4-bit base + adapter, as trained) or a merged model dir, by what the directory holds."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        return AdapterSet(path, base)
    if (path / "config.json").exists():
        return MergedModel(path)
    raise AdapterError(f"{path}: neither an adapter dir (adapter_config.json) nor a model dir (config.json)")
