"""The canary test (issue 20): every verb that writes a directory, aimed at a directory full of a user's files, at
a symlinked lock, with a crafted tear_lora.json or a nested token: exit 2, one line naming the path, no traceback,
and every canary byte-identical. Plus the pieces that rule is built from (rundir.check_replaceable)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tear_lora import rundir
from tear_lora.cli import main
from tear_lora.rundir import (
    COMPLETE_MARKER,
    RunDirError,
    check_replaceable,
    exclusive_lock,
    swap_in,
    write_complete_marker,
)
from tear_lora.train import runner

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


# ---- the canary table: every verb and script that writes, at a user's directory, a symlink, a file added during
# the run and a sibling with our prefix -------------------------------------------------------------------------
#
# One row per writer (docs/reliability.md links here; tests/test_layout.py fails when a CLI verb is neither a row
# here nor in READ_ONLY_VERBS, or a script under scripts/ that runs `rm` has no row). Every row went red with the
# primitive disabled (rundir.check_replaceable returning at once, swap_in without its re-check, temp_sibling
# removing a taken name, the build script without its marker): see the commit that made this table.


@dataclass
class Writer:
    """How to aim one writer at `target` (a directory under the test's tmp_path)."""

    target: str                      # relative to tmp_path
    build: str                       # the kind of its temp siblings: .<name>.<build>-<pid>
    run: Callable                    # (ctx, target) -> exit status
    refusal: str = ""                # words its refusal of a user's directory names
    needs: tuple = ()                # importable modules, else skipped
    lookalike: bool = True           # plant a tear_lora.json of the user's own (sweep reads it and refuses first)


def _cli(*args):
    def run(ctx, target):
        return main([a.format(target=target, **ctx) for a in args])
    return run


def _build_script(ctx, target, **env):
    done = subprocess.run(["bash", str(REPO / "scripts/build_llama_server.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TEAR_LORA_LLAMA_DIR": str(target), "CONVERTER_ONLY": "1",
                                            "PYTHON": str(ctx["fake_pip"]), **env})
    sys.stderr.write(done.stderr)
    return done.returncode


def _demo_model_script(ctx, target):
    """scripts/make_demo_model.py in this process (its main), so the swap can be watched as the verbs' are."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_model", REPO / "scripts/make_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(target)])


WRITERS = {
    "train": Writer("D/qwen3-base", "tmp", _cli("train", "{recipe}", "--set", "output.overwrite=true"),
                    "not a finished tear_lora adapter"),
    "sweep": Writer("D/qwen3-base-lambda0", "tmp", _cli("sweep", "{recipe}", "--lambdas", "0", "--set",
                                                        "output.overwrite=true"), "not a finished tear_lora adapter",
                    lookalike=False),
    "data prepare": Writer("prepared", "build", _cli("data", "prepare", "{eval}", "--recipe", "{recipe}", "--out",
                                                     "{target}", "--overwrite"), "not a finished tear_lora processed data"),
    "merge": Writer("models/m", "merge", _cli("merge", "{a}", "--out", "{target}", "--overwrite"),
                    "not a finished tear_lora merge output"),
    "merge --gguf": Writer("models/g", "merge", _cli("merge", "{a}", "--out", "{target}", "--overwrite", "--gguf",
                                                     "f16"), "not a finished tear_lora merge output", ("conversion",)),
    "bundle": Writer("served", "bundle", _cli("bundle", "{a}", "{b}", "--out", "{target}", "--overwrite"),
                     "not a finished tear_lora bundle"),
    "analyze --report": Writer("report", "report", _cli("analyze", "{a}", "--data", "{contrast}", "--bootstrap", "10",
                                                        "--draws", "10", "--folds", "2", "--report", "{target}", "--overwrite"),
                               "not a finished tear_lora analyze report"),
    "split-domains": Writer("split", "split", _cli("split-domains", "{eval}", "--hold-out", "code", "--out",
                                                   "{target}", "--overwrite"), "not a finished tear_lora domain split"),
    "scripts/build_llama_server.sh": Writer("llama", "dl", _build_script, "has no .tear_lora_llama_cache"),
    "scripts/make_demo_model.py": Writer("models/smollm2", "build", _demo_model_script,
                                         "not a finished tear_lora demo model"),
}
SLOW_RUNS = {"scripts/make_demo_model.py": "a real GGUF conversion of SmolLM2-135M, ~23 s: in the slow pass"}
FILE_WRITERS = {  # verbs that write one file you name (a plot): rundir.atomic_write_bytes, test_plot_file_…
    "compare": "--plot", "analyze": "--plot", "report": "--plot (default <adapter>/training_curves.png)",
    "sweep": "--plot, besides its run dirs (a row above)",
}
READ_ONLY_VERBS = {"recipe validate": "prints", "recipe show": "prints", "plan": "prints", "generate": "prints",
                   "eval": "prints", "serve": "runs llama-server on a bundle; writes only the page into a fresh mkdtemp dir, removed on exit"}

FAKE_PIP = """#!/usr/bin/env bash
# `python -m pip download` for the build script, offline: a tiny llama-cpp-python sdist; $DURING: a file the user
# saves while the download runs
set -e
while [ $# -gt 0 ]; do case "$1" in --dest) dest="$2"; shift 2;; llama-cpp-python==*) v="${1#*==}"; shift;; *) shift;; esac; done
w=$(mktemp -d); mkdir -p "$w/llama_cpp_python-$v/vendor/llama.cpp"
echo "# converter" > "$w/llama_cpp_python-$v/vendor/llama.cpp/convert_lora_to_gguf.py"
tar -czf "$dest/llama_cpp_python-$v.tar.gz" -C "$w" "llama_cpp_python-$v"; rm -rf "$w"
if [ -n "${DURING:-}" ]; then mkdir -p "$(dirname "$DURING")"; echo "saved during the run" > "$DURING"; fi
"""


@pytest.fixture()
def ctx(request, tmp_path, recipe_file):
    fake_pip = tmp_path / "fake-python"
    fake_pip.write_text(FAKE_PIP)
    fake_pip.chmod(0o755)
    contrast = tmp_path / "contrast16.jsonl"  # 8 pairs: the row proves where the report is written, not the study
    contrast.write_text("".join((REPO / "data/raw/contrast.jsonl").read_text().splitlines(keepends=True)[:16]))
    found = {"recipe": str(recipe_file), "eval": str(REPO / "data/raw/eval.jsonl"), "fake_pip": fake_pip,
             "contrast": str(contrast)}
    if any(n in request.node.name for n in ("merge", "bundle", "analyze")):
        trained = request.getfixturevalue("pair")
        found.update(a=str(trained["a"]), b=str(trained["b"]))
    return found


def _row(name: str, tmp_path: Path) -> tuple[Writer, Path]:
    writer = WRITERS[name]
    for module in writer.needs:
        pytest.importorskip(module)
    return writer, tmp_path / writer.target


@pytest.mark.parametrize("name", WRITERS)
def test_at_a_users_directory(name, ctx, tmp_path, capsys):
    """Aimed (with overwrite) at a directory of the user's: a local base's config, notes, a nested file, and a
    tear_lora.json / manifest.json of their own. Exit 2, one line naming it, every byte as it was."""
    writer, target = _row(name, tmp_path)
    plant_canaries(target, manifest=True)
    if writer.lookalike:
        (target / "tear_lora.json").write_text('{"format_version": 2, "merged": {}}')  # even one that looks like ours
    before = snapshot(target)
    assert writer.run(ctx, target) == 2
    one_line_error(capsys, target, writer.refusal)
    assert snapshot(target) == before


@pytest.mark.parametrize("name", WRITERS)
def test_at_a_symlink(name, ctx, tmp_path, capsys):
    """Aimed at a symlink to the user's directory: refused, the link and what it points at untouched."""
    writer, target = _row(name, tmp_path)
    mine = tmp_path / "mine"
    before = plant_canaries(mine)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(mine, target)
    assert writer.run(ctx, target) == 2
    one_line_error(capsys, target, "symlink")
    assert target.is_symlink() and snapshot(mine) == before


def _plant_siblings(writer: Writer, target: Path) -> dict:
    """Directories named like a writer's own temp dirs (its kind, our pid, `.old-<pid>`, a backup of the user's),
    each holding the user's files. The build script's temp dirs live inside its cache, beside bin/llama-server."""
    if writer.build == "dl":
        where, names = target, [".dl.mybackup", ".dl.XXXXXX", ".build.mine", "bin/mytool"]
    else:
        where = target.parent
        names = [f".{target.name}.{writer.build}-mybackup", f".{target.name}.{writer.build}-{os.getpid()}",
                 f".{target.name}.old-{os.getpid()}", f".{target.name}.{writer.build}-1"]
    return {where / name: plant_canaries(where / name) for name in names}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_RUNS else name
                                  for name in WRITERS])
def test_a_file_added_during_the_run_and_siblings_with_our_prefix_are_kept(name, ctx, tmp_path, monkeypatch, capsys):
    """Two columns of the table, one run each (a run costs seconds, not milliseconds):
    - issue 28 case 3: the check and the swap are minutes apart. A NOTES.txt the user saves into the output while
      it is built (here: just before the swap) stops the swap: exit 2, one line, NOTES.txt kept;
    - issue 28 case 2: `.<out>.bundle-*` siblings were deleted (a user's `.b2.bundle-mybackup/precious.txt`). A
      writer touches only what it made in this process: names it would give, taken already, are left alone."""
    writer, target = _row(name, tmp_path)
    notes = target / "NOTES.txt"
    if writer.build == "dl":  # the script's swap is of src/: a cache of another version first
        assert writer.run(ctx, target) == 0
        siblings = _plant_siblings(writer, target)
        before = snapshot(target / "src")
        assert _build_script(ctx, target, DURING=str(target / "src" / "NOTES.txt"), LLAMA_CPP_PYTHON_VERSION="9.9") == 2
        one_line_error(capsys, target / "src", "changed while")
        assert snapshot(target / "src") == {**before, "NOTES.txt": snapshot(target / "src")["NOTES.txt"]}
    else:
        siblings = _plant_siblings(writer, target)

        def save_notes_then_swap(built, final, checked):
            if Path(final) == target:  # not the data cache train builds first
                final.mkdir(parents=True, exist_ok=True)
                notes.write_text("saved while it was being built")
            return swap_in(built, final, checked)

        monkeypatch.setattr(rundir, "swap_in", save_notes_then_swap)
        monkeypatch.setattr(runner, "swap_in", save_notes_then_swap)
        assert writer.run(ctx, target) == 2
        one_line_error(capsys, target, "changed while", "NOTES.txt was added")
        assert snapshot(target) == {"NOTES.txt": hashlib.sha256(b"saved while it was being built").hexdigest()}
    for path, before in siblings.items():
        assert snapshot(path) == before, path


@pytest.mark.parametrize("aim", ["directory", "symlink"])
def test_a_plot_file_is_never_written_through_a_users_directory_or_link(pair, tmp_path, aim, capsys):
    """FILE_WRITERS: the one file a verb writes where you name it is replaced atomically when it is a file, and
    refused when a directory or a symlink is there (atomic_write_bytes; os.replace would drop your link)."""
    mine = tmp_path / "mine"
    before = plant_canaries(mine)
    plot = mine if aim == "directory" else tmp_path / "curves.png"
    if aim == "symlink":
        os.symlink(mine / "notes.txt", plot)
    assert main(["report", str(pair["a"]), "--plot", str(plot)]) == 2
    one_line_error(capsys, plot, aim)
    assert snapshot(mine) == before and (aim == "directory" or plot.is_symlink())


# ---- the rule's finer points ----------------------------------------------------------------------------------


def test_train_cli_process_exits_2_in_one_line(recipe_file, tmp_path):
    target = tmp_path / "D" / "qwen3-base"
    before = plant_canaries(target)
    result = subprocess.run([sys.executable, "-m", "tear_lora.cli", "train", str(recipe_file), "--set",
                             "output.overwrite=true"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")][0].count(str(target)) == 1
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


@pytest.mark.parametrize("verb", [["generate", "{a}", "--input", "hi"], ["merge", "{a}", "--out", "{out}"],
                                  ["bundle", "{a}", "--out", "{out}"], ["eval", "{a}", "--data", "{eval}"],
                                  ["report", "{a}"]], ids=lambda v: v[0])
def test_a_deeply_nested_tear_lora_json_is_one_line_in_every_verb_that_reads_one(pair, tmp_path, verb, capsys):
    """Issue 28 case 8: 100,000 levels of nesting was a RecursionError traceback in every verb reading it."""
    adapter = Path(shutil.copytree(pair["a"], tmp_path / "adapter", ignore=shutil.ignore_patterns("checkpoints")))
    (adapter / "tear_lora.json").write_text('{"format_version": 2, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    out = tmp_path / "out"
    args = [a.format(a=adapter, out=out, eval=REPO / "data/raw/eval.jsonl") for a in verb]
    assert main(args) == 2
    one_line_error(capsys, "tear_lora.json", "nested deeper than 64 levels")
    assert not out.exists()


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
