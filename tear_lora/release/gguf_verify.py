"""Checking a GGUF against the merged model it was converted from (`merge --gguf ... --verify`, and the bundle's
base GGUF): what a user of llama.cpp would otherwise find out only from wrong answers.

The file is read back three ways: gguf's reader for the vocabulary, stop tokens, chat template and the tags'
embedding rows (dequantized with gguf's own code); transformers' GGUF loader (`gguf_file=`) for every tensor
against the safetensors; and the logits of the transformers-loaded GGUF against the merged model on the
held-out rows that the merge verify uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tear_lora.data.template import prefix_ids
from tear_lora.data.tokens import structural_token_ids
from tear_lora.rundir import read_json

from .gguf import CONTROL

# Every tensor: max |gguf - safetensors| <= bound * max |safetensors| (+ 2^-24 for values in the subnormal range).
# f16/bf16 round to 11/8 significant bits: relative error <= 2^-11 / 2^-8. Q8_0 stores blocks of 32 as int8 times
# an fp16 scale d = max|block| / 127 (gguf.quants): rounding costs <= d/2, the fp16 scale <= 127 * d * 2^-11.
TENSOR_BOUNDS = {"f16": 2.0**-11, "bf16": 2.0**-8, "q8_0": 1 / 254 + 2.0**-11}
# Logits of the GGUF (loaded by transformers) vs the merged model. f16/bf16: the bounds the merge itself uses for
# those dtypes (export.TOLERANCES). q8_0, set from measurement: the demo model (SmolLM2-135M, 16 held-out rows,
# 1,636 positions) gave mean KL 1.25e-3 and top-1 0.976; the tiny random model 8e-7 and 1.0 (its flat layers barely
# notice). A real small model is the sensitive case (few, large weights per row). The bounds allow 4x the measured
# KL and about twice the top-1 flips (near-ties); max |Δlogit| is not bounded (1.22 measured: large logits carry
# large absolute rounding), as KL and top-1 already say what a user sees.
LOGIT_BOUNDS = {"q8_0": {"max_abs_logit": None, "mean_kl": 5e-3, "top1": 0.95}}



def read_gguf(path: str | Path, token_ids: list[int]) -> dict:
    """What gguf's reader says about the file: the given tokens (id, text, type), stop and BOS settings, chat
    template, hyperparameters, tensor names/types, and those tokens' rows of the embedding (and output) matrix,
    dequantized by gguf's own code. One reader: parsing a 151k-token vocabulary costs seconds each time."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)

    def value(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    def rows(name):
        found = [t for t in reader.tensors if t.name == name]
        if not found:
            return None
        matrix = dequantize(found[0].data, found[0].tensor_type)  # numpy [rows, hidden]
        return torch.from_numpy(matrix[token_ids].copy()).float()

    arch = value("general.architecture")
    texts, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    return {
        "architecture": arch, "name": value("general.name"),
        "vocab_size": len(texts.data),
        "tokens": {i: {"text": texts.contents(i), "type": int(types.contents(i))} for i in token_ids},
        "eos": value("tokenizer.ggml.eos_token_id"), "eot": value("tokenizer.ggml.eot_token_id"),
        "eom": value("tokenizer.ggml.eom_token_id"), "add_bos": value("tokenizer.ggml.add_bos_token"),
        "chat_template": value("tokenizer.chat_template"),
        "hparams": {k.removeprefix(f"{arch}."): value(k) for k in reader.fields if k.startswith(f"{arch}.")},
        "tensors": {t.name: t.tensor_type.name for t in reader.tensors},
        "embedding_rows": rows("token_embd.weight"), "output_rows": rows("output.weight"),
    }


def check_tokens(header: dict, merged_dir: str | Path, tokenizer, config) -> dict:
    """Tags are single CONTROL tokens at the tokenizer's ids, the GGUF ends generation exactly where
    generation_config.json does, BOS and chat template as in the merged tokenizer, tie flag and sizes kept."""
    tags = structural_token_ids(tokenizer)
    stops = read_json(Path(merged_dir) / "generation_config.json")["eos_token_id"]
    stops = stops if isinstance(stops, list) else [stops]
    declared = [header[k] for k in ("eos", "eot", "eom") if header[k] is not None]
    hp = header["hparams"]
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    expected_hp = {"block_count": config.num_hidden_layers, "embedding_length": config.hidden_size,
                   "attention.head_count": config.num_attention_heads,
                   "attention.head_count_kv": getattr(config, "num_key_value_heads", config.num_attention_heads),
                   "feed_forward_length": getattr(config, "intermediate_size", None), "rope.freq_base": rope,
                   "attention.layer_norm_rms_epsilon": getattr(config, "rms_norm_eps", None)}
    hparam_mismatches = {k: [hp.get(k), v] for k, v in expected_hp.items()
                         if v is not None and (hp.get(k) is None or abs(float(hp[k]) - float(v)) > 1e-6 * abs(float(v)))}
    result = {
        "tags": {tag: {"id": i, **header["tokens"][i]} for tag, i in tags.items()},
        "stop_ids": {"gguf": {k: header[k] for k in ("eos", "eot", "eom")}, "generation_config": stops},
        "add_bos": header["add_bos"], "tied": "output.weight" not in header["tensors"],
        "vocab_size": header["vocab_size"], "hparam_mismatches": hparam_mismatches,
        "tensor_types": sorted(set(header["tensors"].values())),
    }
    result["checks"] = {
        "tags_single_control_tokens": all(t["text"] == tag and t["type"] == CONTROL for tag, t in result["tags"].items()),
        "stop_ids_agree": sorted(declared) == sorted(set(stops)) and len(set(declared)) == len(declared),
        "add_bos_agrees": bool(header["add_bos"]) == bool(prefix_ids(tokenizer)),
        "chat_template_agrees": header["chat_template"] == tokenizer.chat_template,
        "tie_flag_honoured": result["tied"] == bool(config.tie_word_embeddings),
        "vocab_size_agrees": header["vocab_size"] == config.vocab_size,
        "hparams_agree": not hparam_mismatches,
    }
    return result


def compare_tensors(gguf_model, merged_dir: str | Path, outtype: str) -> dict:
    """Every safetensors tensor against the GGUF's (as transformers' GGUF loader reads it back: gguf's reader,
    dequantized, names mapped and llama's Q/K permutation undone), each within its rounding bound."""
    from safetensors import safe_open

    state = gguf_model.state_dict()
    worst = {"max_abs": 0.0, "max_rel": 0.0, "worst_tensor": None}
    missing, beyond = [], []
    for shard in sorted(Path(merged_dir).glob("model*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if key not in state:
                    missing.append(key)
                    continue
                ref, got = f.get_tensor(key).float(), state[key].detach().float().cpu()
                diff = (ref - got).abs().max().item() if ref.shape == got.shape else float("inf")
                scale = ref.abs().max().item()
                if diff > TENSOR_BOUNDS[outtype] * scale + 2.0**-24:
                    beyond.append(key)
                worst["max_abs"] = max(worst["max_abs"], diff)
                if scale and diff / scale >= worst["max_rel"]:
                    worst.update(max_rel=diff / scale, worst_tensor=key)
    return {**worst, "bound_rel": TENSOR_BOUNDS[outtype], "missing": missing, "beyond_bound": beyond[:10],
            "passed": not missing and not beyond}


def load_gguf_model(path: str | Path, merged_dir: str | Path, dtype, device):
    """The GGUF through transformers' loader, with the merged dir's config: transformers maps only part of the
    GGUF metadata to a config (e.g. no head_dim for qwen3), and the hyperparameters are checked on their own
    (check_tokens) against that same config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(merged_dir)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=dtype,
                                                device_map=device).eval()


def logit_bounds(outtype: str, merge_tolerances: dict) -> dict:
    return LOGIT_BOUNDS.get(outtype) or merge_tolerances[{"f16": "fp16", "bf16": "bf16"}[outtype]]


def verify_gguf(path: str | Path, outtype: str, merged_dir: str | Path, merged_model, tokenizer,
                rows: list[list[int]], merge_tolerances: dict) -> dict:
    """Tokens, tensors, tag rows and logits of one GGUF against the merged model it was converted from."""
    from .verify import agreement_over_rows, within_tolerance

    path, merged_dir = Path(path), Path(merged_dir)
    device = next(merged_model.parameters()).device
    tag_ids = list(structural_token_ids(tokenizer).values())
    header = read_gguf(path, tag_ids)
    result = {"file": path.name, "outtype": outtype, "bytes": path.stat().st_size,
              "tokens": check_tokens(header, merged_dir, tokenizer, merged_model.config)}
    # the tags' rows are the trained ones: embedding always, output matrix too when it is a separate one
    pairs = [(header["embedding_rows"], merged_model.get_input_embeddings().weight)]
    if not merged_model.config.tie_word_embeddings:
        pairs.append((header["output_rows"], merged_model.get_output_embeddings().weight))
    result["tag_rows_max_abs"], tag_rows_ok = 0.0, True
    for got, weight in pairs:
        want = weight[tag_ids].detach().float().cpu()
        diff = float((got - want).abs().max()) if got is not None else float("inf")
        result["tag_rows_max_abs"] = max(result["tag_rows_max_abs"], diff)
        tag_rows_ok = tag_rows_ok and diff <= TENSOR_BOUNDS[outtype] * float(want.abs().max()) + 2.0**-24
    model = load_gguf_model(path, merged_dir, merged_model.dtype, device)
    result["tensors"] = compare_tensors(model, merged_dir, outtype)
    agreement = agreement_over_rows(merged_model, model, rows, device)
    del model
    bounds = logit_bounds(outtype, merge_tolerances)
    result["logits"] = {"rows": len(rows), **agreement, "tolerance": bounds}
    result["passed"] = (all(result["tokens"]["checks"].values()) and tag_rows_ok and result["tensors"]["passed"]
                        and within_tolerance(agreement, bounds))
    return result


def describe(result: dict) -> str:
    """One line per GGUF for the CLI and the model card."""
    t, lg = result["tensors"], result["logits"]
    failed = [k for k, ok in result["tokens"]["checks"].items() if not ok]
    return (f"{result['file']} ({result['bytes'] / 1e6:.1f} MB): tensors max rel err {t['max_rel']:.3g} "
            f"(bound {t['bound_rel']:.3g}), tag rows max |Δ| {result['tag_rows_max_abs']:.3g}; logits vs merged on "
            f"{lg['positions']} positions: max |Δlogit| {lg['max_abs_logit']:.3g}, mean KL {lg['mean_kl']:.3g}, "
            f"top-1 {lg['top1_agreement']:.4f}; tokens {'ok' if not failed else 'FAILED ' + ', '.join(failed)}: "
            f"{'passed' if result['passed'] else 'FAILED'}")

