"""The canary test (issue 20): every verb that writes a directory, aimed at a directory full of a user's files, at
a symlinked lock, with a crafted tear_lora.json or a nested token: exit 2, one line naming the path, no traceback,
and every canary byte-identical. Plus the pieces that rule is built from (rundir.check_replaceable)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tear_lora.cli import main
from tear_lora.rundir import COMPLETE_MARKER, RunDirError, check_replaceable, exclusive_lock, write_complete_marker

from .conftest import REPO
from .release_helpers import trained_pair


def plant_canaries(directory: Path, manifest: bool = False) -> dict:
    """A user's directory: a local base's config, notes, a nested file (and, when asked, a manifest.json or a
    tear_lora.json of the user's own). Returns the snapshot to compare with."""
    (directory / "sub").mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "mine"}')
    (directory / "notes.txt").write_text("do not lose me")
    (directory / "sub" / "weights.bin").write_bytes(os.urandom(64))
    if manifest:
        (directory / "manifest.json").write_text('{"mine": true}')
    return snapshot(directory)


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line_error(capsys, *needles) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    return trained_pair(tmp_path_factory, tiny_model_dir)


@pytest.fixture()
def recipe_file(tmp_path, tiny_model_dir):
    raw = yaml.safe_load((REPO / "recipes/tiny-cpu.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["data"].update(train_file=str(REPO / "data/raw/eval.jsonl"), eval_file=str(REPO / "data/raw/eval.jsonl"),
                       processed_dir=str(tmp_path / "processed"))
    raw["output"].update(dir=str(tmp_path / "D"), run_name="qwen3-base")
    raw["training"].update(max_steps=1, save_strategy="no")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- every writing verb at a user's directory ---------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--set", "output.overwrite=true"]], ids=["plain", "overwrite"])
def test_train_at_a_users_directory(recipe_file, tmp_path, overwrite, capsys):
    target = tmp_path / "D" / "qwen3-base"
    before = plant_canaries(target)
    assert main(["train", str(recipe_file), *overwrite]) == 2
    one_line_error(capsys, target, "not a finished tear_lora adapter")
    assert snapshot(target) == before and not (tmp_path / "D" / ".qwen3-base.lock").exists()


def test_train_cli_process_exits_2_in_one_line(recipe_file, tmp_path):
    target = tmp_path / "D" / "qwen3-base"
    before = plant_canaries(target)
    result = subprocess.run([sys.executable, "-m", "tear_lora.cli", "train", str(recipe_file), "--set",
                             "output.overwrite=true"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")][0].count(str(target)) == 1
    assert snapshot(target) == before


def test_sweep_at_a_users_directory(recipe_file, tmp_path, capsys):
    target = tmp_path / "D" / "qwen3-base-lambda0"
    before = plant_canaries(target)
    assert main(["sweep", str(recipe_file), "--lambdas", "0", "--set", "output.overwrite=true"]) == 2
    one_line_error(capsys, target)
    assert snapshot(target) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_data_prepare_at_a_users_directory_with_a_manifest(recipe_file, tmp_path, overwrite, capsys):
    target = tmp_path / "mine"
    before = plant_canaries(target, manifest=True)
    assert main(["data", "prepare", str(REPO / "data/raw/eval.jsonl"), "--recipe", str(recipe_file), "--out",
                 str(target), *overwrite]) == 2
    one_line_error(capsys, target, "not a finished tear_lora processed data")
    assert snapshot(target) == before


def test_data_prepare_replaces_its_own_output_only_with_overwrite(recipe_file, tmp_path, capsys):
    out = tmp_path / "prepared"
    args = ["data", "prepare", str(REPO / "data/raw/eval.jsonl"), "--recipe", str(recipe_file), "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    other = [*args, "--set", "data.max_seq_len=200"]  # another cache key: the dir would be replaced
    assert main(other) == 2
    one_line_error(capsys, out, "--overwrite")
    assert main([*other, "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["max_seq_len"] == 200


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_split_domains_at_a_users_directory(tmp_path, overwrite, capsys):
    target = tmp_path / "mine"
    before = plant_canaries(target)
    (target / "eval.in.jsonl").write_text("my own notes, named like a split file\n")
    before = snapshot(target)
    assert main(["split-domains", str(REPO / "data/raw/eval.jsonl"), "--hold-out", "code", "--out", str(target),
                 *overwrite]) == 2
    one_line_error(capsys, target, "not a finished tear_lora domain split")
    assert snapshot(target) == before


def test_split_domains_replaces_its_own_split_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "split"
    args = ["split-domains", str(REPO / "data/raw/eval.jsonl"), "--out", str(out)]
    assert main([*args, "--hold-out", "code"]) == 0
    assert main([*args, "--hold-out", "health"]) == 2
    one_line_error(capsys, out, "--overwrite")
    assert json.loads((out / "split.json").read_text())["held_out"] == ["code"]
    assert main([*args, "--hold-out", "health", "--overwrite"]) == 0
    recorded = json.loads((out / "split.json").read_text())
    assert recorded["held_out"] == ["health"]
    assert recorded["files"][0]["source_sha256"] == hashlib.sha256((REPO / "data/raw/eval.jsonl").read_bytes()).hexdigest()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_analyze_report_at_a_users_directory(pair, tmp_path, overwrite, capsys):
    target = tmp_path / "mine"
    plant_canaries(target)
    (target / "analyze.json").write_text('{"mine": true}')  # even one named like ours
    before = snapshot(target)
    assert main(["analyze", str(pair["a"]), "--data", str(REPO / "data/raw/contrast.jsonl"), "--report", str(target),
                 *overwrite]) == 2
    one_line_error(capsys, target, "not a finished tear_lora analyze report")
    assert snapshot(target) == before


@pytest.mark.parametrize("gguf", [[], ["--gguf", "f16"]], ids=["merge", "merge-gguf"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_merge_at_a_users_directory(pair, tmp_path, gguf, overwrite, capsys):
    target = tmp_path / "models" / "qwen3"
    before = plant_canaries(target)
    (target / "tear_lora.json").write_text('{"format_version": 2, "merged": {}}')  # even one that looks like ours
    before = snapshot(target)
    if gguf:
        pytest.importorskip("conversion")
    assert main(["merge", str(pair["a"]), "--out", str(target), *gguf, *overwrite]) == 2
    one_line_error(capsys, target, "not a finished tear_lora merge output")
    assert snapshot(target) == before


# ---- links, crafted metadata, nested tokens -----------------------------------------------------------------------


def test_a_symlinked_lock_is_refused_and_its_target_untouched(recipe_file, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "D").mkdir()
    os.symlink(victim, tmp_path / "D" / ".qwen3-base.lock")
    assert main(["train", str(recipe_file)]) == 2
    one_line_error(capsys, ".qwen3-base.lock", "symlink")
    assert victim.read_text() == "precious"
    with pytest.raises(RunDirError, match="symlink"):
        with exclusive_lock(tmp_path / "D" / ".qwen3-base.lock", "x"):
            pass
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("run_name", ["../../escaped", "/tmp/abs", "ok\nFROM evil"], ids=["dotdot", "abs", "newline"])
def test_crafted_run_name_in_tear_lora_json_is_refused(pair, tmp_path, run_name, capsys):
    adapter = Path(shutil.copytree(pair["a"], tmp_path / "adapter", ignore=shutil.ignore_patterns("checkpoints")))
    meta = json.loads((adapter / "tear_lora.json").read_text())
    meta["run_name"] = run_name
    (adapter / "tear_lora.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert main(["merge", str(adapter), "--out", str(out), "--gguf", "f16"]) == 2
    one_line_error(capsys, "run_name")
    assert not out.exists() and not list(tmp_path.parent.glob("escaped*"))


def test_control_characters_in_any_metadata_field_are_refused(pair, tmp_path, capsys):
    adapter = Path(shutil.copytree(pair["a"], tmp_path / "adapter", ignore=shutil.ignore_patterns("checkpoints")))
    meta = json.loads((adapter / "tear_lora.json").read_text())
    meta["base"]["name_or_path"] += "\nPARAMETER evil"
    (adapter / "tear_lora.json").write_text(json.dumps(meta))
    assert main(["generate", str(adapter), "--input", "hi"]) == 2
    one_line_error(capsys, "base.name_or_path", "control character")


@pytest.mark.parametrize("key", ["training.model_init_kwargs.token", "training.hub_token"])
def test_credentials_in_a_recipe_are_refused_at_any_depth(recipe_file, tmp_path, key, capsys):
    secret = "hf_canaryCanaryCanary0123456789"
    raw = yaml.safe_load(recipe_file.read_text())
    section, *path = key.split(".")
    node = raw[section]
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = secret
    recipe_file.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe_file)]) == 2
    one_line_error(capsys, key, "hf auth login")
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != recipe_file]
    assert not any(secret.encode() in p.read_bytes() for p in written)
    assert not (tmp_path / "D").exists()


def test_resume_copy_refuses_a_checkpoint_holding_a_symlink(pair, tmp_path, capsys):
    checkpoint = next((pair["a"] / "checkpoints").glob("checkpoint-*"))
    crafted = Path(shutil.copytree(checkpoint, tmp_path / "ckpt" / "checkpoint-2"))
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the checkpoint")
    os.symlink(secret, crafted / "extra.txt")
    assert main(["train", str(_resume_recipe(pair, tmp_path)), "--resume", str(crafted)]) == 2
    one_line_error(capsys, "extra.txt", "symlink")
    assert not list((tmp_path / "adapters").glob(".copied.tmp-*"))  # the half copy is gone


def _resume_recipe(pair, tmp_path: Path) -> Path:
    recipe = yaml.safe_load((pair["a"] / "recipe.yaml").read_text())
    recipe["output"].update(dir=str(tmp_path / "adapters"), run_name="copied")
    path = tmp_path / "copied.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_resume_from_a_checkpoint_with_other_adapter_keys_is_one_line_exit_2(pair, tmp_path, capsys):
    """Issue 21: a checkpoint whose adapter lacks a trainable tensor was a RuntimeError traceback."""
    from safetensors.torch import load_file, save_file

    from tear_lora.rundir import read_marker

    checkpoint = next((pair["a"] / "checkpoints").glob("checkpoint-*"))
    crafted = Path(shutil.copytree(checkpoint, tmp_path / "ckpt" / checkpoint.name))
    weights = load_file(crafted / "adapter_model.safetensors")
    weights.pop(next(k for k in sorted(weights) if "lora_A" in k))
    save_file(weights, crafted / "adapter_model.safetensors", metadata={"format": "pt"})
    marker = read_marker(checkpoint)
    write_complete_marker(crafted, {k: v for k, v in marker.items() if k not in ("files", "kind")}, kind="checkpoint")
    assert main(["train", str(_resume_recipe(pair, tmp_path)), "--resume", str(crafted)]) == 2
    one_line_error(capsys, "does not match this model", "missing trainable keys")


# ---- the rule itself ----------------------------------------------------------------------------------------------


def test_check_replaceable_needs_our_marker_of_the_same_kind_and_overwrite(tmp_path):
    out = tmp_path / "out"
    check_replaceable(out, "merge output", "tear_lora.json", False, "pass --overwrite")  # absent: fine
    out.mkdir()
    check_replaceable(out, "merge output", "tear_lora.json", False, "pass --overwrite")  # empty: fine
    (out / "tear_lora.json").write_text("{}")
    with pytest.raises(RunDirError, match="no readable"):
        check_replaceable(out, "merge output", "tear_lora.json", True, "pass --overwrite")
    write_complete_marker(out, kind="adapter")
    with pytest.raises(RunDirError, match="says adapter, not merge output"):
        check_replaceable(out, "merge output", "tear_lora.json", True, "pass --overwrite")
    write_complete_marker(out, kind="merge output")
    with pytest.raises(RunDirError, match="pass --overwrite"):
        check_replaceable(out, "merge output", "tear_lora.json", False, "pass --overwrite")
    check_replaceable(out, "merge output", "tear_lora.json", True, "pass --overwrite")
    (out / "late.txt").write_text("user's")
    with pytest.raises(RunDirError, match="late.txt, which tear_lora did not write"):
        check_replaceable(out, "merge output", "tear_lora.json", True, "pass --overwrite")
    (out / "late.txt").unlink()
    os.symlink(tmp_path, out / "link")
    with pytest.raises(RunDirError, match="link is a symlink"):
        check_replaceable(out, "merge output", "tear_lora.json", True, "pass --overwrite")
    (out / "link").unlink()
    (out / COMPLETE_MARKER).unlink()
    write_complete_marker(out)  # a marker from before kinds: only where the caller accepts them
    with pytest.raises(RunDirError, match="no kind"):
        check_replaceable(out, "merge output", "tear_lora.json", True, "pass --overwrite")
    check_replaceable(out, "merge output", "tear_lora.json", True, "pass --overwrite", legacy=True)


def test_cards_name_the_base_without_the_users_path(pair, tiny_model_dir, tmp_path):
    from tear_lora.metadata import public_name
    from tear_lora.release.model_card import write_model_card

    assert public_name(str(tiny_model_dir)) == tiny_model_dir.name and public_name("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"
    card = (pair["a"] / "README.md").read_text()
    assert str(tiny_model_dir) not in card and str(tiny_model_dir.parent) not in card
    merged = tmp_path / "m"
    merged.mkdir()
    meta = json.loads((pair["a"] / "tear_lora.json").read_text())
    meta.pop("files")
    meta["merged"] = {"base_weights": "dequantized", "dtype": "fp32", "adapter": str(pair["a"])}
    (merged / "tear_lora.json").write_text(json.dumps(meta))
    text = write_model_card(merged, "m").read_text()
    assert f"base_model: {tiny_model_dir.name}" in text and str(tiny_model_dir.parent) not in text


def test_gguf_refuses_a_converter_that_would_run_the_models_code(tmp_path):
    conversion = pytest.importorskip("conversion")
    from tear_lora.release.gguf import GGUFError, check_remote_code, remote_code_method

    qwen3 = conversion.get_model_class("Qwen3ForCausalLM", mmproj=False)
    assert remote_code_method(qwen3)  # its converter can reach a trust_remote_code=True tokenizer load
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}')
    check_remote_code(tmp_path, qwen3, trust_remote_code=False)  # no code of its own: nothing would run
    (tmp_path / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["tok.MyTok", null]}}')
    with pytest.raises(GGUFError, match="pass --trust-remote-code"):
        check_remote_code(tmp_path, qwen3, trust_remote_code=False)
    check_remote_code(tmp_path, qwen3, trust_remote_code=True)
