"""Loading adapters: one 4-bit base, many adapters (one per λ) switched in place; merged dirs alike.

Every loader goes through metadata.read_metadata first (a damaged or unknown-format adapter is refused before
anything loads), and `trust_remote_code` is never read from an adapter's or merged dir's own files: only the
caller decides it (the --trust-remote-code flag).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tear_lora.metadata import (
    METADATA_FILE,
    AdapterError,
    base_identity,
    quantization_identity,
    read_metadata,
    same_base,
)
from tear_lora.rundir import incomplete_reason

# ---- opening an adapter, once per verb ------------------------------------------------------------------------


@dataclass
class Adapter:
    """An adapter dir opened once: everything a verb needs from its files, checked, passed down instead of re-read.

    `recipe` is the adapter's own recipe.yaml pointed at `base` when given (`recipe_text`: the file as read, which a
    merge copies); `base` is the identity of the base that recipe points at (for a local dir, a hash of its weights). An adapter opened `like` another of the same base
    shares that one's recipe, tokenizer and base identity: one base is loaded for all of them, with the first's
    recipe, and the follower's own recipe.yaml is not read.
    """

    dir: Path
    recipe: Any
    metadata: dict[str, Any]
    tokenizer: Any
    base: dict[str, Any]
    recipe_text: str | None = None

    @property
    def name(self) -> str:
        return self.metadata.get("run_name") or self.dir.name


def open_adapter(adapter_dir: str | Path, base: str | None = None, trust_remote_code: bool = False,
                 like: Adapter | None = None, metadata: dict[str, Any] | None = None) -> Adapter:
    """Read an adapter dir once (tear_lora.json with the file hashes, recipe, tokenizer, base identity) and refuse
    it when the base or tokenizer about to be used is not the one it was trained on (check_base). `metadata`: its
    tear_lora.json when the caller has already read it (read_metadata)."""
    adapter_dir = Path(adapter_dir)
    metadata = metadata if metadata is not None else _adapter_metadata(adapter_dir)
    if like is not None:
        check_base(adapter_dir, like.recipe, like.tokenizer, like.base, metadata)
        return Adapter(adapter_dir, like.recipe, metadata, like.tokenizer, like.base)
    from tear_lora.train.model import load_tokenizer_for

    text = _recipe_text(adapter_dir)
    recipe = _saved_recipe(adapter_dir, base, trust_remote_code, text)
    tokenizer = load_tokenizer_for(recipe)
    given = given_base(recipe)
    check_base(adapter_dir, recipe, tokenizer, given, metadata)
    return Adapter(adapter_dir, recipe, metadata, tokenizer, given, text)


def open_adapters(adapter_dirs, base: str | None = None, trust_remote_code: bool = False,
                  metadata: list[dict[str, Any]] | None = None) -> list[Adapter]:
    """Adapters of one base: the first opened in full, the others `like` it (refused if their base differs)."""
    adapter_dirs = [Path(a) for a in adapter_dirs]
    metadata = metadata or [None] * len(adapter_dirs)
    first = open_adapter(adapter_dirs[0], base, trust_remote_code, metadata=metadata[0])
    return [first, *(open_adapter(a, like=first, metadata=m) for a, m in zip(adapter_dirs[1:], metadata[1:]))]


def _adapter_metadata(adapter_dir: Path) -> dict[str, Any]:
    """tear_lora.json of an adapter dir, read and checked once (a damaged adapter is refused before anything loads)."""
    if not (adapter_dir / "adapter_config.json").exists() or not (adapter_dir / METADATA_FILE).exists():
        raise AdapterError(f"{adapter_dir}: not a tear_lora adapter dir (needs adapter_config.json and {METADATA_FILE})")
    return read_metadata(adapter_dir)


def _recipe_text(adapter_dir: Path) -> str | None:
    """recipe.yaml as written, or None where it cannot be read as text (load_recipe then names the problem)."""
    try:
        return (adapter_dir / "recipe.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _saved_recipe(adapter_dir: Path, base: str | None, trust_remote_code: bool, text: str | None = None):
    from tear_lora.recipe import load_recipe

    recipe = load_recipe(adapter_dir / "recipe.yaml", saved=True, text=text)
    recipe.model.trust_remote_code = trust_remote_code
    if base is not None:
        recipe.model.name_or_path = str(base)
        recipe.model.revision = None
    return recipe


def adapter_recipe(adapter_dir: str | Path, base: str | None = None, trust_remote_code: bool = False):
    """The recipe an adapter was trained with, pointed at `base` (a local copy of the base) when given.

    `trust_remote_code` is the caller's (the --trust-remote-code flag), never the adapter's recipe.yaml: a
    shared adapter must not be able to make us run Python shipped with whatever base it names.
    """
    adapter_dir = Path(adapter_dir)
    _adapter_metadata(adapter_dir)
    return _saved_recipe(adapter_dir, base, trust_remote_code)


def given_base(recipe) -> dict[str, Any]:
    """The identity of the base a recipe points at (for a local dir this reads every weight file once)."""
    from transformers import AutoConfig

    from tear_lora.train.model import ModelLoadError

    cfg = recipe.model
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"cannot read the base '{cfg.name_or_path}' (pass --base PATH to a local copy): {e}") from None
    return base_identity(cfg.name_or_path, cfg.revision, config)


def check_base(adapter_dir: str | Path, recipe, tokenizer, given: dict[str, Any] | None = None,
               metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuse an adapter whose recorded base or vocabulary differs from the ones about to be used.

    LoRA deltas and token rows are only meaningful on the exact weights they were trained against; on another
    base they load without error and silently produce a different model. Returns the adapter's metadata.
    """
    from tear_lora.data.tokens import tokenizer_hash

    metadata = metadata if metadata is not None else read_metadata(adapter_dir)
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
    record the same base and vocabulary as the first; any other is refused. Adapters come as dirs or as
    `Adapter`s a verb already opened (open_adapter), which are not read again.
    """

    def __init__(self, first_adapter: str | Path | Adapter, base: str | None = None, trust_remote_code: bool = False):
        import time

        from tear_lora.train.model import load_base

        first = first_adapter if isinstance(first_adapter, Adapter) else open_adapter(first_adapter, base,
                                                                                     trust_remote_code)
        self.first = first
        self.recipe, self.tokenizer, self._base_identity = first.recipe, first.tokenizer, first.base
        self.metadata: dict[str, dict[str, Any]] = {}
        self.dirs: dict[str, Path] = {}
        self.opened: dict[str, Adapter] = {}
        self.adapter_load_s: dict[str, float] = {}
        self._check_quantization(first)  # refuse before the slow part
        started = time.perf_counter()
        self._base = load_base(self.recipe, self.tokenizer)
        self.base_load_s = time.perf_counter() - started
        self.model = None
        self.add(first)

    def _check_quantization(self, adapter: Adapter) -> None:
        loaded = quantization_identity(self.recipe.model)
        if adapter.metadata.get("quantization", loaded) != loaded:
            raise AdapterError(f"{adapter.dir}: trained on the base quantized as {adapter.metadata['quantization']}, "
                               f"but the loaded base is {loaded}; compare it in a separate run")

    def add(self, adapter: str | Path | Adapter) -> str:
        """Load one more adapter (not activated); returns its name (the run name, made unique)."""
        import time

        from peft import PeftModel

        started = time.perf_counter()
        if not isinstance(adapter, Adapter):
            adapter = open_adapter(adapter, like=self.first)
        self._check_quantization(adapter)
        name = label = adapter.name
        n = 2
        while peft_name(label) in {peft_name(k) for k in self.metadata}:
            label, n = f"{name}-{n}", n + 1
        if self.model is None:
            self.model = PeftModel.from_pretrained(self._base, str(adapter.dir), adapter_name=peft_name(label))
        else:
            self.model.load_adapter(str(adapter.dir), adapter_name=peft_name(label))
        self.model.eval()
        self.metadata[label], self.dirs[label], self.opened[label] = adapter.metadata, adapter.dir, adapter
        self.adapter_load_s[label] = time.perf_counter() - started
        return label

    def use(self, label: str) -> None:
        self.model.set_adapter(peft_name(label), inference_mode=True)

    @property
    def labels(self) -> list[str]:
        return list(self.metadata)


class MergedModel:
    """A `tear-lora merge` output (or any HF model dir with the tags), with AdapterSet's interface.

    A dir with tear_lora.json must also be complete (rundir's marker, every file at its written size); a plain
    HF dir without it loads as it is. trust_remote_code is the caller's, never the dir's config.json.
    """

    def __init__(self, path: str | Path, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        from tear_lora.recipe import load_recipe, recipe_from_dict
        from tear_lora.train.model import ModelLoadError, device_map, guard_bnb_cpu

        path = Path(path)
        meta = {}
        if (path / METADATA_FILE).exists():
            problem = incomplete_reason(path)
            if problem:
                raise AdapterError(f"{path}: an incomplete merge output ({problem}): a killed merge, a partial "
                                   "copy, or a merge by an older tear_lora; merge again into a new --out")
            meta = read_metadata(path)
        self.tokenizer = self.load_tokenizer(path, trust_remote_code)
        self.metadata = {path.name: meta}
        self.recipe = load_recipe(path / "recipe.yaml", saved=True) if (path / "recipe.yaml").exists() else recipe_from_dict({})
        self.recipe.model.trust_remote_code = trust_remote_code
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device_map(),
                                                              trust_remote_code=trust_remote_code).eval()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
        guard_bnb_cpu(self.model)

    @staticmethod
    def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
        """The saved tokenizer, which must hold the six tags as single tokens."""
        from transformers import AutoTokenizer

        from tear_lora.data.tokens import structural_token_ids

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
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


def open_source(path: str | Path, base: str | None = None, trust_remote_code: bool = False):
    """An adapter dir (4-bit base + adapter, as trained) or a merged model dir, by what the directory holds."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        return AdapterSet(path, base, trust_remote_code)
    if (path / "config.json").exists() or (path / METADATA_FILE).exists():
        return MergedModel(path, trust_remote_code)
    raise AdapterError(f"{path}: neither an adapter dir (adapter_config.json) nor a model dir (config.json)")
