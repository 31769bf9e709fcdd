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
        "quantization": {"load_in_4bit": cfg.load_in_4bit, "quant_type": cfg.quant_type,
                         "double_quant": cfg.double_quant, "compute_dtype": cfg.compute_dtype},
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
