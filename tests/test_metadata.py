"""tear_lora.json: what a run records about itself (versions, code commit, vocabulary) is what is true, and the
base's content hash is computed once per process per unchanged file."""

import importlib.metadata
import os
import subprocess

import pytest

from tear_lora import metadata
from tear_lora.data.tokens import structural_token_ids, tokenizer_hash
from tear_lora.recipe import load_recipe
from tear_lora.train.model import load_tokenizer_for

from .conftest import REPO
from .release_helpers import trained_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    return trained_pair(tmp_path_factory, tiny_model_dir)


def test_recorded_versions_commit_and_tokenizer_are_the_real_ones(pair):
    meta = metadata.read_metadata(pair["a"])
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        assert meta["versions"][package] == importlib.metadata.version(package), package
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    if not head:  # not a git checkout: nothing to record
        assert meta["git_commit"] is None
    else:  # the commit checked out when the fixture trained: HEAD then, so HEAD now or an ancestor of it
        assert meta["git_commit"] and len(meta["git_commit"]) == 40
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", meta["git_commit"], "HEAD"], cwd=REPO)
        assert ancestor.returncode == 0, meta["git_commit"]
    tokenizer = load_tokenizer_for(load_recipe(pair["a"] / "recipe.yaml"))
    assert meta["tokenizer"] == {"hash": tokenizer_hash(tokenizer), "size": len(tokenizer)}
    assert meta["structural_tokens"] == structural_token_ids(tokenizer)
    assert meta["recipe_sha256"] == load_recipe(pair["a"] / "recipe.yaml").hash()


def test_tokenizer_hash_changes_with_the_vocabulary(tokenizer):
    before = tokenizer_hash(tokenizer)
    tokenizer.add_tokens(["<|an-extra-token|>"])
    assert tokenizer_hash(tokenizer) != before


def test_content_hash_is_remembered_per_unchanged_file(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = metadata._sha256([weights])
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size; put the old mtime back: the remembered digest is used
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    assert metadata._sha256([weights]) == first and reads == []
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: read again, new bytes seen
    assert metadata._sha256([weights]) != first and reads == [weights]
