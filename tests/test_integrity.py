"""Issue 9 for the release verbs: a damaged adapter is refused in one line, trust_remote_code comes only from the
caller, a merge output appears whole or not at all (and never lands on a dir it did not write), no secret is
written, and a sweep never reuses a run trained from another recipe."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tear_lora.release.merge as export
from tear_lora.adapters import adapter_recipe, open_source
from tear_lora.cli import main
from tear_lora.metadata import (
    HASHED_FILES,
    AdapterError,
    base_identity,
    read_metadata,
    safetensors_problem,
    write_run_metadata,
)
from tear_lora.rundir import COMPLETE_MARKER, PROJECT_ROOT, RunDirError, incomplete_reason, lock_path_for

from .conftest import REPO, make_recipe
from .release_helpers import trained_pair

SECRET = "hf_integrityTestSecret0123456789"
NO_CHECKPOINTS = shutil.ignore_patterns("checkpoints")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    return trained_pair(tmp_path_factory, tiny_model_dir)


@pytest.fixture()
def adapter(pair, tmp_path):
    """A private copy of the λ=0 adapter, free to damage."""
    return Path(shutil.copytree(pair["a"], tmp_path / "adapter", ignore=NO_CHECKPOINTS))


@pytest.fixture(scope="module")
def merged(pair, tmp_path_factory):
    """One complete merge output (fp32), of an adapter whose recipe.yaml still holds a hub token, as adapters
    written before recipes were masked do. Tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("integrity")
    source = Path(shutil.copytree(pair["a"], root / "leaky-adapter", ignore=NO_CHECKPOINTS))
    raw = yaml.safe_load((source / "recipe.yaml").read_text())
    raw["training"]["hub_token"] = SECRET
    raw["training"]["model_init_kwargs"] = {"hooks": [{"api_key": SECRET + "-in-a-list"}]}  # issue 28, break (c)
    (source / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return {"adapter": source, "out": export.merge(source, root / "models" / "merged", dtype="fp32")}


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _copy(directory: Path, to: Path) -> Path:
    return Path(shutil.copytree(directory, to))


def _edit_metadata(adapter: Path, **changes) -> None:
    meta = json.loads((adapter / "tear_lora.json").read_text())
    meta.update(changes)
    (adapter / "tear_lora.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def _strict_json(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in written JSON"))


# ---- damaged adapters --------------------------------------------------------------------------------------------


def test_flipped_byte_refused_by_eval_in_one_line(adapter, pair):
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor: the file still parses, only its hash can tell
    weights.write_bytes(bytes(data))
    assert safetensors_problem(weights) is None
    result = subprocess.run([sys.executable, "-m", "tear_lora.cli", "eval", str(adapter), "--data", str(pair["eval"])],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    assert "adapter_model.safetensors: sha256 differs" in errors[0]


def test_truncated_safetensors_refused(adapter, pair, capsys):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["eval", str(adapter), "--data", str(pair["eval"])]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors has" in err and "truncated or replaced" in err


def test_edited_adapter_config_refused(adapter, capsys):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = config["r"] * 2  # loads fine in PEFT, then fails on tensor shapes with a traceback
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", str(adapter), "--input", "hi"]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and ("sha256 differs" in err or "bytes" in err)


def test_truncated_metadata_refused(adapter, capsys):
    text = (adapter / "tear_lora.json").read_text()
    (adapter / "tear_lora.json").write_text(text[: len(text) // 2])
    assert main(["generate", str(adapter), "--input", "hi"]) == 2
    err = capsys.readouterr().err
    assert "tear_lora.json: unreadable" in err and err.count("\n") == 1


def test_newer_format_version_refused(adapter, capsys):
    _edit_metadata(adapter, format_version=99)
    assert main(["report", str(adapter)]) == 2
    assert "format_version 99 was written by a newer tear_lora" in capsys.readouterr().err
    _edit_metadata(adapter, format_version="2")
    with pytest.raises(AdapterError, match="no valid format_version"):
        read_metadata(adapter)


def test_format_1_without_hashes_is_read_with_a_truncation_check(adapter, capsys):
    _edit_metadata(adapter, format_version=1, files=None)
    assert read_metadata(adapter)["format_version"] == 1
    assert "format_version 1 records no file hashes" in capsys.readouterr().err
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AdapterError, match="truncated"):
        adapter_recipe(adapter)


def test_metadata_is_strict_json_with_hashes_and_no_secret(adapter, pair, tiny_model_dir, tmp_path):
    from tear_lora.data.prepare import prepare
    from tear_lora.train.model import load_tokenizer_for

    recipe = make_recipe(tiny_model_dir, tmp_path)
    recipe.training["hub_token"] = SECRET  # recipes refuse credentials when loaded; the writer masks them anyway
    tokenizer = load_tokenizer_for(recipe)
    manifest = prepare(pair["eval"], tokenizer, recipe, save=False).manifest
    metrics = {"train_loss": float("nan"), "eval_loss": float("inf"), "global_step": 2}
    write_run_metadata(adapter, recipe, tokenizer, manifest, None, metrics, {"trainable": 1},
                       log_history=[{"loss": float("nan"), "step": 1}])
    text = (adapter / "tear_lora.json").read_text()
    meta = _strict_json(text)
    assert meta["format_version"] == 2 and meta["recipe_sha256"] == recipe.hash()
    assert meta["metrics"] == {"train_loss": None, "eval_loss": None, "global_step": 2}
    assert _strict_json((adapter / "log_history.json").read_text()) == [{"loss": None, "step": 1}]
    for name in HASHED_FILES:
        assert meta["files"][name]["sha256"] == hashlib.sha256((adapter / name).read_bytes()).hexdigest()
    assert SECRET not in text and SECRET not in (adapter / "log_history.json").read_text()
    assert read_metadata(adapter) == meta
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="save the adapter before its metadata"):
        write_run_metadata(adapter, recipe, tokenizer, manifest, None, metrics, {"trainable": 1})


def test_nan_is_written_as_null_and_read_back(adapter, tmp_path, capsys):
    """Metrics that were NaN/Inf come back as null: --json output stays strict JSON, and report prints nan."""
    from tear_lora.cli import _emit

    _emit({"witness_ppl": float("inf"), "rows": [float("nan")]}, True, None)
    assert _strict_json(capsys.readouterr().out) == {"witness_ppl": None, "rows": [None]}
    meta = json.loads((adapter / "tear_lora.json").read_text())
    _edit_metadata(adapter, metrics={**meta["metrics"], "train_loss": None})
    rows = tmp_path / "eval.json"
    rows.write_text(json.dumps([{"name": "x", "kind": "adapter", "rows": 1, "response_nll": 1.0, "witness_nll": 800.0,
                                 "witness_ppl": None}]))
    assert main(["report", str(adapter), "--eval-json", str(rows), "--plot", str(tmp_path / "curves.png")]) == 0
    out = capsys.readouterr().out
    assert "final train loss nan" in out and "800.0000          nan" in out
    rows.write_text("[{")
    assert main(["report", str(adapter), "--eval-json", str(rows)]) == 2
    assert "--eval-json" in capsys.readouterr().err


# ---- trust_remote_code ---------------------------------------------------------------------------------------------

EVIL_MODULE = """
import pathlib
pathlib.Path({sentinel!r}).write_text("code from the base ran")
from transformers import Qwen3Config, Qwen3ForCausalLM
class EvilConfig(Qwen3Config):
    pass
class EvilModel(Qwen3ForCausalLM):
    config_class = EvilConfig
"""


def test_trust_remote_code_is_never_taken_from_the_adapter(adapter, tiny_model_dir, tmp_path, monkeypatch):
    """An adapter whose recipe.yaml says trust_remote_code: true, on a base that ships code: no code runs
    unless --trust-remote-code is given. Without the flag the CLI runs in this process (were the code run, it
    would write the sentinel here too); with it, in a process of its own, so that the code runs outside the suite."""
    base, sentinel = Path(shutil.copytree(tiny_model_dir, tmp_path / "base-with-code")), tmp_path / "ran"
    (base / "evil.py").write_text(EVIL_MODULE.format(sentinel=str(sentinel)))
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    raw = yaml.safe_load((adapter / "recipe.yaml").read_text())
    raw["model"].update(name_or_path=str(base), trust_remote_code=True)
    (adapter / "recipe.yaml").write_text(yaml.safe_dump(raw))
    _edit_metadata(adapter, base=base_identity(str(base)))  # recorded as trained on this base

    assert adapter_recipe(adapter).model.trust_remote_code is False
    assert adapter_recipe(adapter, trust_remote_code=True).model.trust_remote_code is True
    argv = ["generate", str(adapter), "--input", "hi", "--max-new-tokens", "1"]
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    assert main(argv) == 0
    assert not sentinel.exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-m", "tear_lora.cli", *argv, "--trust-remote-code"], capture_output=True,
                   timeout=300, cwd=REPO, env=env)
    assert sentinel.exists()  # the flag, and only the flag, lets it run


# ---- merge output ------------------------------------------------------------------------------------------------


@pytest.fixture()
def no_loading(monkeypatch):
    monkeypatch.setattr(export, "open_adapter", lambda *a, **k: pytest.fail("merge loaded the adapter"))


@pytest.mark.parametrize("out", ["/", Path.home(), PROJECT_ROOT, PROJECT_ROOT.parent], ids=str)
def test_merge_out_on_protected_dirs_refused_before_loading(out, adapter, no_loading, capsys):
    assert main(["merge", str(adapter), "--out", str(out)]) == 2
    assert "ancestor of it" in capsys.readouterr().err
    assert not lock_path_for(out).exists()


def test_merge_out_on_a_foreign_dir_refused_and_untouched(adapter, tmp_path, no_loading, capsys):
    foreign = tmp_path / "mine"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    (foreign / "sub" / "model.safetensors").write_bytes(b"not ours")
    before = _snapshot(foreign)
    for overwrite in ([], ["--overwrite"]):
        assert main(["merge", str(adapter), "--out", str(foreign), *overwrite]) == 2
        assert "is not a finished tear_lora merge output" in capsys.readouterr().err
    assert _snapshot(foreign) == before


def test_merge_replaces_only_its_own_complete_output(merged, tmp_path, capsys):
    out = _copy(merged["out"], tmp_path / "models" / "m")
    (out / "notes.txt").write_text("added by hand")
    assert main(["merge", str(merged["adapter"]), "--out", str(out), "--dtype", "fp32", "--overwrite"]) == 2
    assert "it holds notes.txt, which tear_lora did not write" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert main(["merge", str(merged["adapter"]), "--out", str(out), "--dtype", "fp32"]) == 2  # no --overwrite
    assert "already holds a finished tear_lora merge output; pass --overwrite" in capsys.readouterr().err
    killed_build = out.parent / ".m.merge-999999"  # a build left by a killed merge
    killed_build.mkdir()
    (killed_build / "model.safetensors").write_bytes(b"half")
    before = _snapshot(out)
    assert main(["merge", str(merged["adapter"]), "--out", str(out), "--dtype", "fp32", "--overwrite"]) == 0
    after = _snapshot(out)
    assert after.keys() == before.keys() and incomplete_reason(out) is None
    assert after["model.safetensors"][1] != before["model.safetensors"][1]  # really rewritten
    # issue 28: another process made it (and a user may keep files there): named, never deleted
    assert sorted(p.name for p in out.parent.iterdir()) == [".m.lock", ".m.merge-999999", "m"]
    assert f"note: {killed_build} is left from an earlier merge output" in capsys.readouterr().err


def test_merge_never_replaces_an_output_without_a_marker(merged, tmp_path, capsys):
    """Without its completion marker a dir cannot be told from a user's copy of a model: refused, untouched."""
    legacy = _copy(merged["out"], tmp_path / "models" / "old")
    (legacy / COMPLETE_MARKER).unlink()
    before = _snapshot(legacy)
    assert main(["merge", str(merged["adapter"]), "--out", str(legacy), "--dtype", "fp32", "--overwrite"]) == 2
    assert f"no readable {COMPLETE_MARKER} marker" in capsys.readouterr().err and _snapshot(legacy) == before


def test_killed_merge_leaves_no_dir_and_the_previous_output(merged, tmp_path, monkeypatch):
    out = _copy(merged["out"], tmp_path / "models" / "m")
    before = _snapshot(out)

    def killed(directory, info=None, kind=None):
        raise RuntimeError("killed before the completion marker")

    monkeypatch.setattr(export, "write_complete_marker", killed)
    with pytest.raises(RuntimeError, match="killed"):
        export.merge(merged["adapter"], out, dtype="fp32", overwrite=True)
    assert _snapshot(out) == before
    with pytest.raises(RuntimeError, match="killed"):
        export.merge(merged["adapter"], tmp_path / "models" / "fresh", dtype="fp32")
    assert sorted(p.name for p in out.parent.iterdir()) == [".fresh.lock", ".m.lock", "m"]


def test_incomplete_merge_output_refused_plain_dir_loads(merged, tmp_path, capsys):
    unmarked = _copy(merged["out"], tmp_path / "unmarked")
    (unmarked / COMPLETE_MARKER).unlink()
    with pytest.raises(AdapterError, match=f"incomplete merge output .no {COMPLETE_MARKER} marker"):
        open_source(unmarked)
    truncated = _copy(merged["out"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["generate", str(truncated), "--input", "hi"]) == 2
    assert "model.safetensors has 1000 bytes" in capsys.readouterr().err
    plain = _copy(merged["out"], tmp_path / "plain")  # an HF model dir that tear_lora did not write
    (plain / COMPLETE_MARKER).unlink()
    (plain / "tear_lora.json").unlink()
    assert open_source(plain).metadata == {"plain": {}}


def test_merge_output_holds_no_secret(merged):
    assert SECRET in (merged["adapter"] / "recipe.yaml").read_text()
    for path in merged["out"].rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    written = yaml.safe_load((merged["out"] / "recipe.yaml").read_text())["training"]
    assert written["hub_token"] == "<masked>" and written["model_init_kwargs"]["hooks"] == [{"api_key": "<masked>"}]


def test_merge_output_has_the_usual_modes(merged):
    """Issue 28, break (b): safetensors writes 0600; without merge's usual_permissions the published weights
    would be unreadable to the group and others (checked by dropping that call: this went red)."""
    from tear_lora.rundir import UMASK

    usual = 0o666 & ~UMASK
    for path in merged["out"].rglob("*"):
        if path.is_file() and path.name != ".tear_lora_complete":
            assert path.stat().st_mode & 0o777 == usual, (path, oct(path.stat().st_mode))


def test_verify_keeps_a_complete_output_complete(merged, pair, tmp_path):
    out = _copy(merged["out"], tmp_path / "models" / "v")
    result = export.verify(merged["adapter"], out, pair["eval"], rows=1)
    assert result["passed"] and _strict_json((out / "verify.json").read_text()) == result
    assert "passed on 1 rows" in (out / "README.md").read_text()
    assert incomplete_reason(out) is None


# ---- sweep ---------------------------------------------------------------------------------------------------------


def test_sweep_reuses_a_run_only_for_the_same_recipe(pair, tmp_path, capsys):
    from tear_lora.study.compare import sweep_recipes, train_sweep

    here = [f"output.dir={tmp_path / 'adapters'}"]
    [recipe] = sweep_recipes(pair["recipe"], [0.0], here)
    run_dir = Path(shutil.copytree(pair["a"], recipe.run_dir(), ignore=NO_CHECKPOINTS))
    _edit_metadata(run_dir, recipe_sha256=recipe.hash())  # as if trained right here
    weights = run_dir / "adapter_model.safetensors"
    trained_at = weights.stat().st_mtime_ns
    assert train_sweep([recipe]) == [run_dir] and weights.stat().st_mtime_ns == trained_at
    assert "is complete, skipping" in capsys.readouterr().err
    # the card a recipe is sized for changes nothing that is trained: still the same run
    [bigger_card] = sweep_recipes(pair["recipe"], [0.0], [*here, "hardware.gpu_memory_gb=80"])
    assert train_sweep([bigger_card]) == [run_dir] and weights.stat().st_mtime_ns == trained_at
    assert "is complete, skipping" in capsys.readouterr().err

    changed = [*here, "training.learning_rate=0.02"]
    [other] = sweep_recipes(pair["recipe"], [0.0], changed)
    with pytest.raises(RunDirError) as refused:
        train_sweep([other])
    for needed in (str(run_dir), recipe.hash(), other.hash(), "--set output.overwrite=true"):
        assert needed in str(refused.value), needed
    assert main(["sweep", str(pair["recipe"]), "--lambdas", "0", *(f"--set={o}" for o in changed)]) == 2
    assert weights.stat().st_mtime_ns == trained_at

    [retrained] = train_sweep(sweep_recipes(pair["recipe"], [0.0], [*changed, "output.overwrite=true"]))
    assert "retraining it (output.overwrite is true)" in capsys.readouterr().err
    assert retrained == run_dir and read_metadata(run_dir)["recipe_sha256"] != recipe.hash()
    trained_at = weights.stat().st_mtime_ns
    assert train_sweep([other]) == [run_dir] and weights.stat().st_mtime_ns == trained_at  # now it is reused
