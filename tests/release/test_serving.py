"""`tear-lora bundle`: every λ adapter rewritten as plain LoRA on one untied serving base is the same model as its
merge (weights to 1e-6, logits through --verify), with no trainable_tokens_delta left for an engine to reject;
adapters that cannot share a base are refused with the reason, and --out follows the merge's replacement rule.
The real llama-server check is tests/release/test_serving_server.py (slow)."""

import json
import shutil

import pytest
import torch

from tear_lora.cli import main
from tear_lora.release.bundle import BUNDLE_FILE, public_meta, untie, write_plain_lora
from tear_lora.rundir import foreign_reason

from ..release_helpers import trained_pair

TAG_IDS = list(range(151_669, 151_675))


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    return trained_pair(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def bundled(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "served"
    assert main(["bundle", str(pair["a"]), str(pair["b"]), "--out", str(out), "--dtype", "fp32", "--verify",
                 "--rows", "3"]) == 0
    return out


def _peft_adapter(tmp_path, tied: bool, r: int, alpha: int, rslora: bool):
    """A PEFT adapter with random LoRA and tag rows on the tiny model (tied or untied), its merged model and a
    fresh copy of the base: the rewrite's input and the model it must reproduce."""
    from peft import LoraConfig, get_peft_model

    from tear_lora.tiny import tiny_qwen3

    indices = TAG_IDS if tied else {"embed_tokens": TAG_IDS, "lm_head": TAG_IDS}
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                        trainable_token_indices=indices)
    model = get_peft_model(tiny_qwen3(seed=1, tie_word_embeddings=tied), config)
    torch.manual_seed(2)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model.merge_and_unload(), tiny_qwen3(seed=1, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied,r,alpha,rslora", [(True, 8, 16, False), (False, 4, 8, True)],
                         ids=["tied-r8-alpha16", "untied-r4-rslora"])
def test_rewrite_is_the_merged_model(tmp_path, tied, r, alpha, rslora):
    """Merged back, serving base + plain LoRA equals the adapter's merge in every weight (1e-6): tag rows of both
    matrices, every other row untouched, LoRA kept (r < 6 padded to 6 and rescaled, rsLoRA folded in)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter, merged, base = _peft_adapter(tmp_path, tied, r, alpha, rslora)
    untie(base)
    info = write_plain_lora(base, adapter, tmp_path / "plain", "base")
    assert info["r"] == max(r, 6)
    keys = load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()
    assert not [k for k in keys if "trainable_tokens" in k or "base_layer" in k]
    assert {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.lm_head.lora_A.weight"} <= set(keys)
    served = PeftModel.from_pretrained(base, tmp_path / "plain").merge_and_unload()
    want, got = merged.state_dict(), served.state_dict()
    assert want.keys() <= got.keys()
    # relative to each matrix's largest entry (at least 1): fp32 rounding of E + Δ against R, of B·A twice
    worst = max(float((want[k].float() - got[k].float()).abs().max() / want[k].abs().max().clamp(min=1)) for k in want)
    assert worst <= 1e-6, worst
    assert got["lm_head.weight"].data_ptr() != got["model.embed_tokens.weight"].data_ptr()


def test_bundle_layout_and_manifest(bundled, pair):
    manifest = json.loads((bundled / BUNDLE_FILE).read_text())
    assert manifest["kind"] == "tear_lora-bundle" and manifest["base"] == "base" and manifest["base_gguf"] is None
    assert [e["lambda"] for e in manifest["adapters"]] == [0.0, 2.0]
    for entry, source in zip(manifest["adapters"], (pair["a"], pair["b"])):
        assert entry["tear_lora"] == public_meta(json.loads((source / "tear_lora.json").read_text()))
        config = json.loads((bundled / entry["peft_dir"] / "adapter_config.json").read_text())
        assert config["trainable_token_indices"] is None and {"lm_head", "model.embed_tokens"} <= set(config["target_modules"])
    base_config = json.loads((bundled / "base" / "config.json").read_text())
    assert base_config["tie_word_embeddings"] is False
    stops = json.loads((bundled / "base" / "generation_config.json").read_text())["eos_token_id"]
    assert {151_672, 151_674} <= set(stops)  # <|/response|>, <|/witness|>
    card = (bundled / "README.md").read_text()
    assert "--enable-lora" in card and "pair-lambda2" in card and not_a_bundle(bundled) is None


def not_a_bundle(directory):
    return foreign_reason(directory, "bundle", BUNDLE_FILE, legacy=True)


def test_verify_figures(bundled):
    """fp32: each adapter's serving base + plain LoRA agrees with the adapter on its 4-bit base to float rounding,
    within bounds calibrated on the dtype's own noise (the serving base against the 4-bit base, same rows)."""
    from tear_lora.release.merge import TOLERANCES
    from tear_lora.release.verify import calibrated_tolerance

    r = json.loads((bundled / "verify.json").read_text())
    assert r["passed"] and r["rows"] == 3 and set(r["adapters"]) == {"pair-lambda0", "pair-lambda2"}
    assert "4-bit" in r["reference"] and r["floor"]["positions"] == r["adapters"]["pair-lambda0"]["positions"]
    assert r["tolerance"] == calibrated_tolerance(TOLERANCES["fp32"], r["floor"])
    for check in r["adapters"].values():
        assert check["mean_kl"] < 1e-9 and check["top1_agreement"] == 1.0 and check["positions"] > 100


def _break_rewrite(monkeypatch, how: str, victim: str):
    """Let `bundle` write `victim`'s plain LoRA, then damage it as a faulty rewrite would: a wrong row delta (the
    output rows' Δ doubled) or a dropped scaling (lora_alpha = r: the engine's alpha/r becomes 1)."""
    from safetensors.torch import load_file, save_file

    from tear_lora.release import bundle as bundle_module

    real = bundle_module.write_plain_lora

    def broken(model, adapter_dir, out_dir, base_path):
        info = real(model, adapter_dir, out_dir, base_path)
        if victim not in str(adapter_dir):
            return info
        if how == "row-delta":
            weights = load_file(out_dir / "adapter_model.safetensors")
            weights["base_model.model.lm_head.lora_A.weight"] *= 2
            save_file(weights, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
        else:
            config = json.loads((out_dir / "adapter_config.json").read_text())
            config["lora_alpha"] = config["r"]
            (out_dir / "adapter_config.json").write_text(json.dumps(config))
        return info

    monkeypatch.setattr(bundle_module, "write_plain_lora", broken)


@pytest.mark.parametrize("how", ["row-delta", "dropped-scaling"])
def test_verify_refuses_a_broken_rewrite(pair, tmp_path, monkeypatch, how):
    """--verify exits 3 with passed: false for the damaged adapter (and only it), and it compares the served
    model with the adapter on its 4-bit base (what was trained), never with a model built by the same rewrite."""
    from tear_lora.release import verify
    from tear_lora.release.merge import is_4bit

    _break_rewrite(monkeypatch, how, "lambda2")
    compared = []
    real_agreement = verify.agreement_over_rows

    def spy(reference, other, rows, device):
        compared.append((is_4bit(reference), is_4bit(other), reference is other))
        return real_agreement(reference, other, rows, device)

    monkeypatch.setattr(verify, "agreement_over_rows", spy)
    out = tmp_path / "served"
    assert main(["bundle", str(pair["a"]), str(pair["b"]), "--out", str(out), "--dtype", "fp32", "--verify",
                 "--rows", "2"]) == 3
    r = json.loads((out / "verify.json").read_text())
    assert r["passed"] is False
    assert r["adapters"]["pair-lambda0"]["passed"] and not r["adapters"]["pair-lambda2"]["passed"]
    assert compared == [(True, False, False)] * 3  # the floor, then each adapter: 4-bit reference vs served


def _altered(adapter, tmp_path, **changes):
    """A copy of `adapter` whose tear_lora.json records something else (the weights stay, as does their hash)."""
    copy = tmp_path / f"{adapter.name}-altered"
    shutil.copytree(adapter, copy, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((copy / "tear_lora.json").read_text())
    for key, value in changes.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
    (copy / "tear_lora.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("changes,reason", [
    ({"base": {"content_sha256": "0" * 64}}, "different weights"),
    ({"structural_tokens": {"<|input|>": 5}}, "tag ids"),
    ({"quantization": {"double_quant": False}}, "quantized as"),
], ids=["mixed-bases", "tag-ids", "nf4-settings"])
def test_refused_with_the_reason(pair, tmp_path, capsys, changes, reason):
    out = tmp_path / "out"
    assert main(["bundle", str(pair["a"]), str(_altered(pair["b"], tmp_path, **changes)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err and not out.exists()


def test_dora_refused(pair, tmp_path, capsys):
    copy = _altered(pair["b"], tmp_path)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["use_dora"] = True
    (copy / "adapter_config.json").write_text(json.dumps(config))
    meta = json.loads((copy / "tear_lora.json").read_text())  # keep the recorded hash honest: only DoRA differs
    from tear_lora.metadata import file_record

    meta["files"]["adapter_config.json"] = file_record(copy / "adapter_config.json")
    (copy / "tear_lora.json").write_text(json.dumps(meta))
    assert main(["bundle", str(copy), "--out", str(tmp_path / "out")]) == 2
    assert "DoRA" in capsys.readouterr().err


def test_foreign_out_dir_untouched(pair, tmp_path, capsys):
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["bundle", str(pair["a"]), "--out", str(out)]) == 2
    assert "is not a finished tear_lora bundle" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_a_bundle_with_an_extra_file_is_not_ours(bundled, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundled, copy)
    assert not_a_bundle(copy) is None
    (copy / "adapters" / "mine.txt").write_text("x")
    assert "did not write" in not_a_bundle(copy)


def test_gguf_without_the_lora_converter_names_the_script(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEAR_LORA_LLAMA_DIR", str(tmp_path / "nothing"))
    assert main(["bundle", str(pair["a"]), "--out", str(tmp_path / "out"), "--gguf", "f16"]) == 2
    assert "scripts/build_llama_server.sh" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_serve_without_llama_server_names_the_script(bundled, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEAR_LORA_LLAMA_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TEAR_LORA_LLAMA_SERVER", raising=False)
    assert main(["serve", str(bundled)]) == 2
    err = capsys.readouterr().err
    assert "scripts/build_llama_server.sh" in err and err.count("\n") == 1


def test_bundle_publishes_the_base_by_name_and_weights_with_the_usual_modes(bundled, pair, tiny_model_dir):
    """Issue 28 cases 6 and 7: README.md, the PEFT cards, bundle.json and adapter_config.json carried the user's
    absolute paths (/home/...), and the weights were written 0600."""
    from tear_lora.rundir import UMASK

    local = [str(tiny_model_dir.parent), str(pair["a"].parent), str(bundled.parent)]
    for path in bundled.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".json"):
            text = path.read_text()
            assert not any(prefix in text for prefix in local), path
        if path.is_file() and path.suffix in (".safetensors", ".gguf"):
            assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK, path
    manifest = json.loads((bundled / BUNDLE_FILE).read_text())
    assert manifest["base_model"]["name_or_path"] == tiny_model_dir.name
    assert [e["source"] for e in manifest["adapters"]] == [pair["a"].name, pair["b"].name]
    config = json.loads((bundled / manifest["adapters"][0]["peft_dir"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"


def test_a_merged_dir_is_refused_in_one_line(pair, tmp_path, capsys):
    """Issue 28 case 8: `bundle` given a merged directory raised a ValueError traceback."""
    merged = _altered(pair["a"], tmp_path)
    meta = json.loads((merged / "tear_lora.json").read_text())
    meta.pop("files")
    meta["merged"] = {"adapter": "x", "base_weights": "dequantized", "dtype": "fp32"}
    (merged / "tear_lora.json").write_text(json.dumps(meta))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (merged / name).unlink()
    assert main(["bundle", str(merged), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "a merged model dir, not an adapter dir" in err
    assert not (tmp_path / "out").exists()


def test_page_dir_columns(bundled, pair):
    """The page's page.json: the base then each adapter with λ, seed, steps, data hash (bundle.json) and the `lora`
    list that selects it. The directory goes when serve ends."""
    from tear_lora.recipe import load_recipe
    from tear_lora.release.llama_server import lora_field
    from tear_lora.release.serve_page import page_dir

    manifest = json.loads((bundled / BUNDLE_FILE).read_text())
    loras = {e["name"]: lora_field(manifest, e["name"]) for e in manifest["adapters"]}
    with page_dir(bundled, manifest, loras) as public:
        info = json.loads((public / "page.json").read_text())
        assert (public / "index.html").read_bytes().startswith(b"<!doctype html>")
    assert not public.exists()
    assert [c["name"] for c in info["columns"]] == ["base", "pair-lambda0", "pair-lambda2"]
    assert info["columns"][0]["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    for column, source, chosen in zip(info["columns"][1:], (pair["a"], pair["b"]), (0, 1)):
        meta = json.loads((source / "tear_lora.json").read_text())
        assert column["lambda"] == meta["lambda"] and column["steps"] == meta["metrics"]["global_step"] == 2
        assert column["seed"] == load_recipe(source / "recipe.yaml", saved=True).training.get("seed", 42)
        assert column["data_sha256"] == meta["data"]["train"]["source_sha256"]
        assert [x["scale"] for x in column["lora"]] == [float(i == chosen) for i in range(2)]


def test_page_prompt_layout_is_template_encode(tokenizer):
    """The page's prompt layout, its slots filled with encode_text ids (what llama-server's /tokenize gives with
    parse_special off), is exactly template.encode's response prompt and witness prompt: what `tear-lora
    generate` feeds the model. A tag string inside the text stays text."""
    from tear_lora.data import template
    from tear_lora.release.serve_page import prompt_layout

    layout = prompt_layout(tokenizer)
    text = {"input": 'Is "<|witness|>" a tag?', "response": "It is text here."}
    slots = {k: template.encode_text(tokenizer, v) for k, v in text.items()}

    def filled(up_to=None):
        ids = []
        for item in layout:
            if item == up_to:
                break
            ids += slots[item] if isinstance(item, str) else item
        return ids

    assert filled("response") == template.encode(tokenizer, template.segments(text["input"]))[0]
    assert filled() == template.encode(tokenizer, template.segments(text["input"], text["response"]))[0]


def test_one_lora_flag_as_a_csv_row(tmp_path):
    """Every adapter in one `--lora` (repeating it is deprecated in llama.cpp), quoted as llama.cpp's
    parse_csv_row reads a field: a path with a comma or a quote stays one path."""
    import csv

    from tear_lora.release.llama_server import server_command

    paths = ["adapters/a-f16.gguf", 'adapters/b, "odd"-f16.gguf']
    manifest = {"base_gguf": "base-f16.gguf", "adapters": [{"gguf": p} for p in paths]}
    command = server_command("llama-server", tmp_path, manifest, "127.0.0.1", 8080, extra=["--path", "/x"])
    assert command.count("--lora") == 1 and command[-2:] == ["--path", "/x"]
    value = command[command.index("--lora") + 1]
    assert next(csv.reader([value])) == [str(tmp_path / p) for p in paths]


def test_page_seed_is_each_adapters_own(pair):
    """bundle.json's seed (the page's column header) comes from each adapter's tear_lora.json, or, for an adapter
    written before that field, from its own recipe.yaml: never from the first adapter's recipe, which an adapter
    opened `like` another carries."""
    from types import SimpleNamespace

    from tear_lora.recipe import load_recipe
    from tear_lora.release.bundle import adapter_seed

    meta = json.loads((pair["b"] / "tear_lora.json").read_text())
    own = load_recipe(pair["b"] / "recipe.yaml", saved=True).training.get("seed", 42)
    assert meta["seed"] == own
    other = SimpleNamespace(training={"seed": own + 1})
    assert adapter_seed(SimpleNamespace(dir=pair["b"], recipe=other, metadata={**meta, "seed": 7})) == 7
    older = {k: v for k, v in meta.items() if k != "seed"}
    assert adapter_seed(SimpleNamespace(dir=pair["b"], recipe=other, metadata=older)) == own
