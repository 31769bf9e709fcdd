"""`tear-lora bundle --verify`: every rewritten adapter against the adapter as trained, and the GGUFs read back.

For each adapter: the serving base + its plain LoRA, loaded from the bundle's files by plain transformers and
PEFT, against that adapter on its 4-bit base (the AdapterSet that eval and `merge --verify` use: the model that
was trained), on held-out rows. The bound is `merge --verify`'s: the dtype's table, widened to a multiple of the
dtype's own noise on the same rows (verify.noise_floor: the serving base before any LoRA against the 4-bit base
with its adapters disabled). The rewrite itself is exact; what is left is the bundle dtype's rounding, which the
floor measures. The base GGUF goes through gguf_verify.verify_gguf (tokens, tensors, logits against the serving
base); each LoRA GGUF is read back with gguf's reader, every LoRA matrix compared with its PEFT source within the
outtype's rounding bound (names mapped with gguf's own table, llama's Q/K row permutation undone as transformers'
GGUF loader does), and its alpha checked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tear_lora.rundir import atomic_write_json, read_json


def verify_bundle(bundle_dir: Path, adapters: list, manifest: dict, data, rows: int, trust_remote_code: bool) -> dict:
    """Measure and write verify.json in `bundle_dir`; returns it (`passed`: every adapter and GGUF within bounds).
    `adapters`: the bundle's adapters as `bundle` opened them (adapters.open_adapters), not read again."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tear_lora.adapters import AdapterSet
    from tear_lora.data.prepare import prepare

    from .merge import TOLERANCES
    from .verify import agreement_over_rows, calibrated_tolerance, noise_floor, within_tolerance

    recipe, tokenizer = adapters[0].recipe, adapters[0].tokenizer
    data = data or recipe.data.eval_file
    dataset = prepare(data, tokenizer, recipe, save=False).dataset
    held_out = [row["input_ids"] for row in dataset.select(range(min(rows, len(dataset))))]
    reference = AdapterSet(adapters[0])  # the 4-bit base, loaded once, with every adapter as trained
    labels = [reference.labels[0], *(reference.add(a) for a in adapters[1:])]
    device = reference.model.device
    dtype = manifest["dtype"]
    served = AutoModelForCausalLM.from_pretrained(bundle_dir / manifest["base"], dtype="auto", device_map=device,
                                                  trust_remote_code=trust_remote_code).eval()
    floor = noise_floor(reference.model, served, held_out, device)  # before any LoRA is attached
    tolerance = calibrated_tolerance(TOLERANCES[dtype], floor)
    result = {"rows": len(held_out), "dtype": dtype, "reference": "each adapter on its 4-bit base, as trained",
              "floor": floor, "tolerance": tolerance, "adapters": {}}
    if manifest["base_gguf"]:  # before any LoRA is attached: the GGUF is the plain serving base
        from .gguf_verify import verify_gguf

        saved = AutoTokenizer.from_pretrained(bundle_dir / manifest["base"])  # with the chat template it holds
        result["base_gguf"] = verify_gguf(bundle_dir / manifest["base_gguf"], manifest["gguf_type"],
                                          bundle_dir / manifest["base"], served, saved, held_out, TOLERANCES)
    peft_model = None
    for label, entry in zip(labels, manifest["adapters"]):
        name = entry["name"].replace(".", "_")  # PEFT adapter names may not contain '.'
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(served, str(bundle_dir / entry["peft_dir"]), adapter_name=name)
        else:
            peft_model.load_adapter(str(bundle_dir / entry["peft_dir"]), adapter_name=name)
        peft_model.set_adapter(name)
        peft_model.eval()
        reference.use(label)
        agreement = agreement_over_rows(reference.model, peft_model, held_out, device)
        check = {**agreement, "passed": within_tolerance(agreement, tolerance)}
        if entry["gguf"]:
            check["gguf"] = verify_lora_gguf(bundle_dir / entry["gguf"], bundle_dir / entry["peft_dir"],
                                             manifest["gguf_type"], served.config)
        result["adapters"][entry["name"]] = check
    result["passed"] = (all(a["passed"] and a.get("gguf", {}).get("passed", True) for a in result["adapters"].values())
                        and result.get("base_gguf", {}).get("passed", True))
    atomic_write_json(bundle_dir / "verify.json", result)
    return result


def verify_lora_gguf(path: Path, peft_dir: Path, outtype: str, config) -> dict:
    """Each LoRA matrix of the GGUF (dequantized by gguf) against the PEFT safetensors it was converted from."""
    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from .gguf_verify import TENSOR_BOUNDS

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    alpha_field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    got = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float() for t in reader.tensors}
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], config.num_hidden_layers)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    worst, missing, beyond = 0.0, [], []
    source = load_file(peft_dir / "adapter_model.safetensors")
    for key, tensor in source.items():
        module = key.removeprefix("base_model.model.")
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
            module = module.replace(part, "")
        which = "lora_a" if ("lora_A" in key or "lora_embedding_A" in key) else "lora_b"
        gguf_name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        stored = got.get(f"{gguf_name}.{which}") if gguf_name else None
        if stored is None:
            missing.append(key)
            continue
        if which == "lora_a" and gguf_name == "token_embd.weight":
            stored = stored.T  # llama.cpp stores the embedding's A transposed (get_rows by token id)
        if which == "lora_b":  # llama's Q/K rows are permuted in the GGUF: undone as transformers' loader does
            stored = torch.from_numpy(processor.process(stored.numpy(), f"{gguf_name}.{which}").weights.copy())
        ref = tensor.float()
        diff = float((ref - stored).abs().max()) if ref.shape == stored.shape else float("inf")
        worst = max(worst, diff)
        if diff > TENSOR_BOUNDS.get(outtype, 0.0) * float(ref.abs().max()) + 2.0**-24:
            beyond.append(key)
    alpha = read_json(peft_dir / "adapter_config.json")["lora_alpha"]
    alpha_ok = alpha_field is not None and abs(float(alpha_field.contents()) - alpha) < 1e-6
    return {"file": path.name, "bytes": path.stat().st_size, "tensors": len(source), "max_abs": worst,
            "bound_rel": TENSOR_BOUNDS.get(outtype), "missing": missing[:5], "beyond_bound": beyond[:5],
            "alpha_agrees": alpha_ok, "passed": not missing and not beyond and alpha_ok}
