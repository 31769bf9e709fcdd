"""tear_lora.json: what an adapter (or merged) directory records about itself, written and read in one place.

`adapters/<run>/` holds:
  adapter_config.json, adapter_model.safetensors   PEFT adapter: LoRA + the six structural token rows
  tokenizer.json, tokenizer_config.json            the base tokenizer with the structural tokens
  recipe.yaml                                      the resolved recipe, secrets masked (re-run it to reproduce)
  tear_lora.json                                   what to compare runs by, and the sha256 of the two adapter files
  checkpoints/                                     Trainer checkpoints (for --resume)

Adapters get shared, so nothing in the directory is trusted blindly: every verb that loads one first checks
tear_lora.json (readable, a format_version we know) and that both adapter files still have the sha256 recorded
at training, and refuses otherwise (AdapterError, exit 2). That guards against truncated copies and flipped
bits, not against tampering (whoever can edit the weights can edit the hash too).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tear_lora.rundir import atomic_write_json, check_run_name, load_json, read_json

METADATA_FILE = "tear_lora.json"
# 2: adds "files" (sha256 + size of HASHED_FILES). 1 is still read: those adapters predate the hashes, and
# retraining them would cost hours for a check that guards against corruption only; they get a warning and
# a safetensors-header truncation test instead.
METADATA_VERSION = 2
DEFAULT_SEED = 42  # transformers' TrainingArguments.seed, when a recipe leaves training.seed out
HASHED_FILES = ("adapter_model.safetensors", "adapter_config.json")
_warned_unhashed: set[str] = set()


class AdapterError(ValueError):
    """An adapter that cannot be used as asked (wrong base, wrong tokenizer, damaged files); exit status 2."""


_DIGESTS: dict[tuple, str] = {}  # (paths, sizes, mtimes) -> digest, for this process


def _sha256(paths) -> str:
    """One digest over the files' bytes in order. Remembered for this process by (path, size, mtime) of each
    file: `merge --verify` identifies the base twice (merge, then verify), and hashing reads every weight byte
    (docs/reliability.md has the measured cost)."""
    paths = [Path(p) for p in paths]
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def base_identity(name_or_path: str, revision: str | None = None, config=None) -> dict[str, Any]:
    """How we recognise a base model: hub id + revision + commit, or a content hash of a local dir's weights."""
    identity = {"name_or_path": name_or_path, "revision": revision,
                "commit_hash": getattr(config, "_commit_hash", None) if config is not None else None,
                "content_sha256": None}
    path = Path(name_or_path)
    if path.is_dir():
        identity["content_sha256"] = _sha256(sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json")))
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


def public_name(name_or_path: str) -> str:
    """How a published card names a base: a hub id as it is, a local directory by its name only (cards must not
    carry the user's absolute paths)."""
    path = Path(name_or_path).expanduser()
    local = path.exists() or name_or_path.startswith(("/", "./", "../", "~")) or path.is_absolute()
    return path.name if local else name_or_path


def quantization_identity(cfg) -> dict[str, Any]:
    """How the base was quantized (a recipe's ModelConfig): the same weights quantized otherwise are another base."""
    return {"load_in_4bit": cfg.load_in_4bit, "quant_type": cfg.quant_type, "double_quant": cfg.double_quant,
            "compute_dtype": cfg.compute_dtype}


def write_run_metadata(run_dir: Path, recipe, tokenizer, train_manifest: dict, eval_manifest: dict | None,
                       metrics: dict, trainable: dict, log_history: list | None = None, world_size: int = 1) -> dict:
    """tear_lora.json (and log_history.json), written atomically with NaN/Inf as null, after the adapter files:
    it records their sha256, so it must come last."""
    from transformers import AutoConfig

    from tear_lora.data.tokens import structural_token_ids, tokenizer_hash

    run_dir = Path(run_dir)
    missing = [name for name in HASHED_FILES if not (run_dir / name).is_file()]
    if missing:
        raise AdapterError(f"{run_dir}: {', '.join(missing)} not there; save the adapter before its metadata")
    cfg = recipe.model
    config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    metadata = {
        "format_version": METADATA_VERSION,
        "run_name": recipe.output.run_name,
        "lambda": recipe.objective.lambda_,
        "lambda_warmup_steps": recipe.objective.lambda_warmup_steps,
        "seed": recipe.training.get("seed", DEFAULT_SEED),  # with λ, base and data: what tells two runs apart
        "base": base_identity(cfg.name_or_path, cfg.revision, config),
        "quantization": quantization_identity(cfg),
        "tokenizer": {"hash": tokenizer_hash(tokenizer), "size": len(tokenizer)},
        "structural_tokens": structural_token_ids(tokenizer),
        "data": {"train": _manifest_summary(train_manifest), "eval": _manifest_summary(eval_manifest)},
        "recipe_sha256": recipe.hash(),
        # processes that trained it: the effective batch is micro-batch x accumulation x world_size
        "world_size": world_size,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None},
        "trainable_parameters": trainable,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {name: file_record(run_dir / name) for name in HASHED_FILES},
    }
    atomic_write_json(run_dir / METADATA_FILE, metadata)
    if log_history is not None:
        atomic_write_json(run_dir / "log_history.json", log_history, indent=1)
    return metadata


# ---- reading it back, checked ---------------------------------------------------------------------------------


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": _sha256([path]), "bytes": path.stat().st_size}


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """tear_lora.json of an adapter or merged dir, refused (AdapterError) when it is unreadable, of a
    format_version this tear_lora does not know, or when the adapter files differ from the recorded ones."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not path.is_file():
        raise AdapterError(f"{directory}: not a tear_lora dir (no {METADATA_FILE})")
    try:
        metadata = read_json(path)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: unreadable, truncated or corrupt ({e}); copy the directory again") from None
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if type(version) is not int or version < 1:
        raise AdapterError(f"{path}: no valid format_version (got {version!r}); not written by tear_lora, or damaged")
    if version > METADATA_VERSION:
        raise AdapterError(f"{path}: format_version {version} was written by a newer tear_lora; this one reads "
                           f"versions 1-{METADATA_VERSION}: upgrade tear_lora to use it")
    problem = field_problem(metadata)
    if problem:
        raise AdapterError(f"{path}: {problem}; not written by tear_lora, or edited: use the adapter its trainer "
                           "shared, or retrain it")
    if "files" in metadata or (directory / "adapter_config.json").exists():
        check_adapter_files(directory, metadata)
    return metadata


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def field_problem(metadata: dict[str, Any]) -> str | None:
    """Why a field of tear_lora.json cannot be used as it is (None when every one can). Its values end up in
    file names (the run name names GGUF files), Modelfiles and model cards, so a shared adapter must not be
    able to steer them: the run name passes the same check as a recipe's, no string holds a control character,
    and the fields the verbs compute with have their types."""
    problem = check_run_name(metadata.get("run_name"))
    if problem:
        return f"run_name {metadata.get('run_name')!r} {problem}"
    for key_path, value in strings(metadata, ""):
        if CONTROL_CHARACTERS.search(value):
            return f"{key_path} holds a control character ({value[:40]!r})"
    lam = metadata.get("lambda")
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))):
        return f"lambda must be a number, got {lam!r}"
    seed = metadata.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        return f"seed must be an integer, got {seed!r}"
    base = metadata.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("name_or_path"), str):
        return "base.name_or_path is missing or not a string"
    tags = metadata.get("structural_tokens", {})
    if not isinstance(tags, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in tags.values()):
        return "structural_tokens must map each tag to an integer id"
    return None


def strings(value: Any, prefix: str):
    """(key path, string) for every string value, and every key, at any depth."""
    if isinstance(value, str):
        yield prefix or "(top level)", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield f"{prefix}.{key}".lstrip(".") + " (key)", str(key)
            yield from strings(item, f"{prefix}.{key}".lstrip("."))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from strings(item, f"{prefix}[{i}]")


def check_adapter_files(adapter_dir: Path, metadata: dict[str, Any]) -> None:
    """Each of HASHED_FILES has the size and sha256 recorded at training (format 1: a truncation test only)."""
    files = metadata.get("files")
    if files is None and metadata["format_version"] == 1:
        if str(adapter_dir) not in _warned_unhashed:
            _warned_unhashed.add(str(adapter_dir))
            print(f"warning: {adapter_dir}: format_version 1 records no file hashes; only truncation is checked",
                  file=sys.stderr)
        problem = safetensors_problem(adapter_dir / HASHED_FILES[0])
        if problem:
            raise AdapterError(f"{adapter_dir / HASHED_FILES[0]}: {problem}; copy the adapter again")
        return
    for name in HASHED_FILES:
        recorded, path = files.get(name) if isinstance(files, dict) else None, adapter_dir / name
        if not isinstance(recorded, dict):
            raise AdapterError(f"{adapter_dir / METADATA_FILE}: no recorded hash of {name}; the metadata is damaged")
        if not path.is_file():
            raise AdapterError(f"{path} is missing; copy the adapter again")
        if path.stat().st_size != recorded.get("bytes"):
            raise AdapterError(f"{path} has {path.stat().st_size} bytes, {recorded.get('bytes')} were written at "
                               "training (truncated or replaced); copy the adapter again")
        if _sha256([path]) != recorded.get("sha256"):
            raise AdapterError(f"{path}: sha256 differs from the one recorded at training (corrupt or changed "
                               "since); copy the adapter again or retrain it")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (None when header and size agree); reads only the header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                return f"{size} bytes, shorter than its header (truncated)"
            header = load_json(f.read(length).decode("utf-8"), path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"unreadable safetensors header ({e})"
    return None if 8 + length + end == size else f"{size} bytes, its header describes {8 + length + end} (truncated)"
