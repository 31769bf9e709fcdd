"""A verb reads its inputs once (issue 30): each adapter's recipe.yaml and tear_lora.json, the tokenizer and the
base identity are read once per verb, and --verify reuses what the merge or bundle loaded; the base weights are
loaded as often as the verb needs a model of them (docs/architecture.md has the table, before and after)."""

import io
import sys
from collections import Counter
from pathlib import Path

import pytest
import transformers

import tear_lora.adapters
import tear_lora.data.tokens
import tear_lora.metadata
import tear_lora.recipe
from tear_lora.cli import main

from .release_helpers import trained_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    return trained_pair(tmp_path_factory, tiny_model_dir)


def _wrap_everywhere(monkeypatch, owner, name, wrapper):
    """Replace `owner.name` and every tear_lora module's binding of the same function (imported by name)."""
    original = getattr(owner, name)
    wrapped = wrapper(original)
    for module in [m for key, m in sys.modules.items() if key.startswith("tear_lora") and m is not None]:
        if getattr(module, name, None) is original:
            monkeypatch.setattr(module, name, wrapped)


@pytest.fixture()
def reads(monkeypatch, pair, tiny_model_dir):
    """Counts, per verb call: files opened under the adapters, readers called, base weights loaded."""
    counts = Counter()
    adapters = {pair["a"].resolve(): "a", pair["b"].resolve(): "b"}
    base = Path(tiny_model_dir).resolve()

    def where(path) -> str | None:
        path = Path(path).resolve()
        return adapters.get(path) or adapters.get(path.parent)

    real_open = io.open

    def counted_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and where(file):
            counts[f"open {where(file)}/{Path(file).name}"] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counted_open)

    def counting(label, key=lambda *a, **k: ""):
        def wrapper(original):
            def wrapped(*args, **kwargs):
                counts[f"{label}{key(*args, **kwargs)}"] += 1
                return original(*args, **kwargs)
            return wrapped
        return wrapper

    _wrap_everywhere(monkeypatch, tear_lora.recipe, "load_recipe", counting("load_recipe"))
    _wrap_everywhere(monkeypatch, tear_lora.metadata, "read_metadata",
                     counting("read_metadata ", lambda d, *a, **k: where(Path(d) / "x") or "other"))
    _wrap_everywhere(monkeypatch, tear_lora.data.tokens, "load_tokenizer", counting("load_tokenizer"))
    _wrap_everywhere(monkeypatch, tear_lora.adapters, "given_base", counting("given_base"))
    real_load = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        counts["base weights loaded" if Path(str(path)).resolve() == base else "other model loaded"] += 1
        return real_load(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    return counts


def test_merge_verify_reads_the_adapter_once(pair, reads, tmp_path):
    assert main(["merge", str(pair["a"]), "--out", str(tmp_path / "m"), "--dtype", "fp32", "--verify",
                 "--rows", "1"]) == 0
    assert reads["open a/recipe.yaml"] == 1 and reads["load_recipe"] == 1
    assert reads["open a/tear_lora.json"] == 1 and reads["read_metadata a"] == 1
    assert reads["load_tokenizer"] == 1 and reads["given_base"] == 1
    # the merge's base (dequantized) and the reference (4-bit + adapter); the noise floor reuses the merge's
    assert reads["base weights loaded"] == 2 and reads["other model loaded"] == 1  # the output, loaded back


def test_bundle_verify_reads_each_adapter_once(pair, reads, tmp_path):
    assert main(["bundle", str(pair["a"]), str(pair["b"]), "--out", str(tmp_path / "b"), "--dtype", "fp32",
                 "--verify", "--rows", "1"]) == 0
    for adapter in "ab":
        assert reads[f"open {adapter}/tear_lora.json"] == 1 and reads[f"read_metadata {adapter}"] == 1
    assert reads["open a/recipe.yaml"] == 1 and reads["open b/recipe.yaml"] == 0 and reads["load_recipe"] == 1
    assert reads["load_tokenizer"] == 1 and reads["given_base"] == 1
    # the serving base (dequantized) and the reference (4-bit, both adapters), not one merge per adapter
    assert reads["base weights loaded"] == 2 and reads["other model loaded"] == 1  # the serving base, loaded back


def test_compare_reads_each_adapter_once(pair, reads):
    assert main(["compare", str(pair["a"]), str(pair["b"]), "--data", str(pair["eval"])]) == 0
    for adapter in "ab":
        assert reads[f"open {adapter}/tear_lora.json"] == 1 and reads[f"read_metadata {adapter}"] == 1
    assert reads["load_recipe"] == 1 and reads["load_tokenizer"] == 1 and reads["given_base"] == 1
    assert reads["base weights loaded"] == 1
