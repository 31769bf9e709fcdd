"""`tear-lora merge`: an adapter -> a standalone model directory that plain transformers can load.

Why `dequantized` is the default: the adapter was trained on top of the NF4-rounded weights Wq, not the
original W, so the model that was trained (and evaluated) is Wq + BA. Loading the base exactly as in training,
dequantizing every Linear4bit to a plain Linear and merging there reproduces that model (to rounding in the
export dtype). `original` merges into W instead: W + BA differs from the trained model by the quantization
error W - Wq in every layer, an error the adapter never saw; use it only when you want the unquantized base's
behaviour plus the adapter and accept that gap (`--verify` measures it).

Merging into a model that is still 4-bit is refused: PEFT would add BA to the dequantized weights and round
the sum back to NF4, whose step (~1/8 of each block's largest weight) is larger than most LoRA updates, so
most of the adapter would vanish in the rounding.

On disk (rundir.py): the output is built in a hidden sibling `.<out>.merge-<pid>/`, verified there when asked,
marked complete last and only then swapped in, under a lock on `<out>`. A killed or failed merge never leaves
a directory at `--out` that loads as a model, and a previous output stays until its replacement is whole.
`--out` may only replace a previous complete merge output holding nothing but what that merge wrote, and only
with `--overwrite` (rundir.check_replaceable, the rule every directory-writing verb shares).

For servers the output also carries a chat template generated from template.py (what an OpenAI-style chat
request turns into) and stop tokens that end each span: `<|/response|>`, `<|/witness|>` and the base EOS. With
`--gguf` it holds llama.cpp GGUFs and an Ollama Modelfile too, converted in the same build dir (gguf_export.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tear_lora.adapters import Adapter, AdapterSet, open_adapter
from tear_lora.data.tokens import RESPONSE_CLOSE, WITNESS_CLOSE, structural_token_ids
from tear_lora.metadata import METADATA_FILE, METADATA_VERSION, AdapterError, read_metadata
from tear_lora.rundir import (
    COMPLETE_MARKER,
    RunDirError,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    exclusive_lock,
    incomplete_reason,
    lock_path_for,
    read_marker,
    replacing,
    usual_permissions,
    write_complete_marker,
)
from tear_lora.train.model import load_base

from .gguf import gguf_file_name
from .model_card import write_model_card
from .verify import agreement_over_rows, calibrated_tolerance, noise_floor, within_tolerance

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# --verify passes when all three hold (merged model vs 4-bit base + adapter, over every position of each row).
# fp32 agrees to float rounding. bf16/fp16 round every merged weight to 8/11 significant bits (~0.2%/0.05%),
# far below NF4's per-weight error (~10%), so their KL bound stays well under what an `original` merge of a real
# model shows; max |Δlogit| is loose because large logits carry large absolute rounding, and top-1 because
# near-ties flip under any rounding (the flat distributions of a random tiny model have many).
TOLERANCES = {
    "fp32": {"max_abs_logit": 1e-3, "mean_kl": 1e-6, "top1": 0.999},
    "fp16": {"max_abs_logit": 0.5, "mean_kl": 5e-4, "top1": 0.97},
    "bf16": {"max_abs_logit": 1.0, "mean_kl": 1e-3, "top1": 0.95},
}
DEFAULT_VERIFY_ROWS = 16


class MergeError(AdapterError):
    """A merge that would produce something other than the trained model, or overwrite a directory."""


def is_4bit(model) -> bool:
    return any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


def load_merge_base(recipe, tokenizer, base_weights: str, dtype: torch.dtype):
    """The base to merge into, in `dtype`: NF4-rounded as in training (`dequantized`) or as published (`original`)."""
    if base_weights not in ("dequantized", "original"):
        raise MergeError(f"--base-weights must be 'dequantized' or 'original', got {base_weights!r}")
    quantize = base_weights == "dequantized" and recipe.model.load_in_4bit  # a 16-bit-trained adapter has no Wq
    model = load_base(recipe, tokenizer, quantize=quantize)
    if quantize:
        model = model.dequantize(dtype=dtype)  # transformers: bnb dequantize_4bit per layer, quantization_config dropped
    return model.to(dtype)


def merge_into(model, adapter_dir: str | Path):
    """LoRA and the trained token rows folded into `model`'s weights; refuses a 4-bit model (see module doc)."""
    from peft import PeftModel

    if is_4bit(model):
        raise MergeError("refusing to merge into a 4-bit model: the merged weights would be re-quantized to NF4, "
                         "whose rounding step is larger than most LoRA updates and erases the adapter; merge into "
                         "the dequantized base instead (--base-weights dequantized, the default)")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    embed, output = merged.get_input_embeddings(), merged.get_output_embeddings()
    merged.config.tie_word_embeddings = output is None or output.weight.data_ptr() == embed.weight.data_ptr()
    return merged.eval()


def generation_config(model, tokenizer):
    """The base's generation settings, stopping at `<|/response|>`, `<|/witness|>` and the base EOS.

    Why `<|/response|>` too: `<|witness|>` is context, never a target, so nothing the model learned follows
    `<|/response|>`; a generation that ran on past it (as a server's would) produces more response-like text.
    Each span is one call: the response stops at its closing tag, the witness is asked for after
    `<|/response|><|witness|>` and stops at `<|/witness|>`. The GGUF declares the same three (gguf_export.py).
    """
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    base_eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    base_eos = base_eos if isinstance(base_eos, list) else [base_eos] if base_eos is not None else []
    tags = structural_token_ids(tokenizer)
    config.eos_token_id = list(dict.fromkeys([tags[RESPONSE_CLOSE], tags[WITNESS_CLOSE], *base_eos]))
    config.pad_token_id = tokenizer.pad_token_id
    return config


def check_out_dir(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse an --out that merge must not create or replace (rundir.check_replaceable); runs before anything
    loads."""
    try:
        check_replaceable(out_dir, "merge output", METADATA_FILE, overwrite, "pass --overwrite", legacy=True)
    except RunDirError as e:
        raise MergeError(f"--out {e}") from None


def merge(adapter_dir: str | Path, out_dir: str | Path, base_weights: str = "dequantized", dtype: str = "bf16",
          base: str | None = None, trust_remote_code: bool = False, verify_rows: int | None = None,
          verify_data: str | Path | None = None, gguf: list[str] | tuple[str, ...] = (),
          overwrite: bool = False) -> Path:
    """Write the merged model, tokenizer, generation config, metadata and model card to `out_dir` (and, with
    `verify_rows`, verify.json; with `gguf` outtypes, `<run>-<outtype>.gguf` files and an Ollama Modelfile),
    all or nothing: see the module doc."""
    from .gguf import OUTTYPES, require_converter

    out_dir = Path(out_dir)
    if dtype not in EXPORT_DTYPES:
        raise MergeError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if any(t not in OUTTYPES for t in gguf):
        raise MergeError(f"--gguf must be one or more of {', '.join(OUTTYPES)}, got {', '.join(gguf)}")
    if gguf:
        require_converter()  # a missing extra is reported now, not after the merge
    check_out_dir(out_dir, overwrite)  # a MergeError naming --out, before anything is made
    with replacing(out_dir, "merge output", METADATA_FILE, overwrite, "pass --overwrite", "merge", legacy=True) as build:
        adapter = open_adapter(adapter_dir, base, trust_remote_code)  # read once: the merge and --verify share it
        check = _prepare_verify(adapter, verify_data, verify_rows) if verify_rows else None
        run_name = _write_merged(adapter, build, base_weights, dtype, gguf, check)
        _write_gguf(build, run_name, gguf, trust_remote_code)
        write_model_card(build, out_dir.name)  # after the GGUFs: the converter would read it as its metadata
        if check:
            gguf_files = {t: gguf_file_name(run_name, t) for t in gguf}
            _verify(check, build, dtype, gguf_files, out_dir.name, trust_remote_code)
        write_complete_marker(build, kind="merge output")  # last: only now is the build a merge output
    return out_dir


def _write_merged(adapter: Adapter, build: Path, base_weights: str, dtype: str, gguf: tuple[str, ...] = (),
                  check: dict | None = None) -> str:
    """Weights, tokenizer (with the chat template), generation config, recipe and metadata; returns the run name.
    With `check` (a --verify under way) the export dtype's noise floor is measured on the base before the adapter
    goes into it (check["floor"])."""
    import yaml

    from tear_lora.data import template
    from tear_lora.recipe import mask_secrets

    from .gguf import MODELFILE

    recipe, tokenizer, metadata = adapter.recipe, adapter.tokenizer, dict(adapter.metadata)
    if check is not None and base_weights != "dequantized":  # the floor needs the dequantized base: loaded, freed
        check["floor"] = _floor(check, None, dtype)
    model = load_merge_base(recipe, tokenizer, base_weights, EXPORT_DTYPES[dtype])
    if check is not None and base_weights == "dequantized":  # the base about to be merged into is that base
        check["floor"] = _floor(check, model, dtype)
    merged = merge_into(model, adapter.dir)
    merged.generation_config = generation_config(merged, tokenizer)
    merged.save_pretrained(build)  # safetensors; the whole dir is swapped in later, so in place is fine here
    del model, merged
    usual_permissions(build)
    tokenizer.chat_template = template.chat_template_for(tokenizer)  # replaces the base's (e.g. ChatML)
    tokenizer.save_pretrained(build)
    # re-masked: an adapter trained before recipes were masked may still hold a hub token in its recipe.yaml
    atomic_write_text(build / "recipe.yaml", yaml.safe_dump(mask_secrets(yaml.safe_load(adapter.recipe_text)),
                                                           sort_keys=False))
    metadata["format_version"] = METADATA_VERSION
    metadata["merged"] = {"adapter": str(adapter.dir), "adapter_files": metadata.pop("files", None),
                          "base_weights": base_weights, "dtype": dtype, "base_used": recipe.model.name_or_path}
    if gguf:
        metadata["merged"]["gguf"] = {t: gguf_file_name(metadata["run_name"], t) for t in gguf}
        metadata["merged"]["modelfile"] = MODELFILE
    atomic_write_json(build / METADATA_FILE, metadata)
    return metadata["run_name"]


def _write_gguf(build: Path, run_name: str, outtypes, trust_remote_code: bool = False) -> None:
    """Each outtype through llama.cpp's converter into the build dir, then the Modelfile for the first."""
    from .gguf import gguf_file_name, write_gguf, write_modelfile

    for outtype in outtypes:
        write_gguf(build, outtype, build / gguf_file_name(run_name, outtype), name=run_name,
                   trust_remote_code=trust_remote_code)
    if outtypes:
        write_modelfile(build, gguf_file_name(run_name, outtypes[0]), run_name)


# ---- verify ---------------------------------------------------------------------------------------------------


def verify(adapter_dir: str | Path, merged_dir: str | Path, data: str | Path | None = None,
           rows: int = DEFAULT_VERIFY_ROWS, base: str | None = None, trust_remote_code: bool = False) -> dict:
    """Logits of the 4-bit base + adapter (what was trained) vs the merged directory, on the eval set, within a
    multiple of the export dtype's own noise on those rows (verify.calibrated_tolerance).

    `merge(verify_rows=...)` does this inside its build dir, before the completion marker, with what the merge
    already loaded. On a finished output (marker present) verify.json and README.md change in place, so the
    marker is rewritten after them (under the output's lock): it lists every file by size, and excluding these
    two would let a truncated card pass as complete.
    """
    merged_dir = Path(merged_dir)

    def run() -> dict:
        merged = read_metadata(merged_dir)["merged"]
        check = _prepare_verify(open_adapter(adapter_dir, base, trust_remote_code), data, rows)
        check["floor"] = _floor(check, None, merged["dtype"])
        return _verify(check, merged_dir, merged["dtype"], merged.get("gguf") or {}, merged_dir.name, trust_remote_code)

    if not (merged_dir / COMPLETE_MARKER).exists():
        return run()
    with exclusive_lock(lock_path_for(merged_dir), f"merge output {merged_dir}"):
        problem = incomplete_reason(merged_dir)
        if problem:
            raise MergeError(f"{merged_dir}: an incomplete merge output ({problem}); merge again")
        result = run()
        write_complete_marker(merged_dir, kind=(read_marker(merged_dir) or {}).get("kind"))
    return result


def _prepare_verify(adapter: Adapter, data, rows: int) -> dict:
    """The held-out rows and the reference (the adapter on its 4-bit base, as trained), before anything is written:
    a missing eval file is found out now, not after the merge."""
    from tear_lora.data.prepare import prepare

    data = data or adapter.recipe.data.eval_file
    if not data:
        raise MergeError(f"{adapter.dir}: the recipe has no data.eval_file; pass --data FILE for --verify")
    dataset = prepare(data, adapter.tokenizer, adapter.recipe, save=False).dataset
    held_out = [row["input_ids"] for row in dataset.select(range(min(rows, len(dataset))))]
    return {"adapter": adapter, "rows": held_out, "reference": AdapterSet(adapter)}


def _floor(check: dict, base_model, dtype: str) -> dict:
    """The export dtype's noise on the verify rows (verify.noise_floor): the dequantized base in `dtype` against the
    reference's base. `base_model`: that base when the merge has it in memory; else it is loaded here."""
    reference = check["reference"]
    if base_model is None:  # `original` merges and verify() on a finished output
        adapter = check["adapter"]
        base_model = load_merge_base(adapter.recipe, adapter.tokenizer, "dequantized", EXPORT_DTYPES[dtype])
    return noise_floor(reference.model, base_model.eval(), check["rows"], reference.model.device)


def _verify(check: dict, merged_dir: Path, dtype: str, gguf_files: dict, name: str, trust_remote_code: bool) -> dict:
    """Measure, write verify.json and the model card; the merged side is loaded back from disk, so the saved
    files (weights, tie flag, dtype) are what is checked."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    reference, rows = check.pop("reference"), check["rows"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto", device_map=reference.model.device,
                                                  trust_remote_code=trust_remote_code).eval()
    agreement = agreement_over_rows(reference.model, merged, tqdm(rows, desc="verify", unit="row"),
                                    reference.model.device)
    tolerance = calibrated_tolerance(TOLERANCES[dtype], check["floor"])
    result = {"rows": len(rows), **agreement, "dtype": dtype, "floor": check["floor"], "tolerance": tolerance,
              "passed": within_tolerance(agreement, tolerance)}
    if gguf_files:  # `passed` stays the merge's own verdict; each GGUF carries its own
        del reference  # the 4-bit model: the GGUFs are compared with the merged model only
        result["gguf"] = _verify_gguf(merged_dir, merged, gguf_files, rows)
    atomic_write_json(merged_dir / "verify.json", result)
    write_model_card(merged_dir, name)
    return result


def _verify_gguf(merged_dir: Path, merged, gguf_files: dict, rows: list[list[int]]) -> dict:
    """Each GGUF of the output against the merged model, on the rows the merge was verified on."""
    from transformers import AutoTokenizer

    from .gguf import INSTALL_HINT, GGUFError
    from .gguf_verify import verify_gguf

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError(f"{merged_dir} holds GGUF files; verifying them needs gguf: {INSTALL_HINT}") from None
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    return {outtype: verify_gguf(merged_dir / name, outtype, merged_dir, merged, tokenizer, rows, TOLERANCES)
            for outtype, name in gguf_files.items()}


def all_passed(result: dict) -> bool:
    """The merge and every GGUF within their bounds (what `merge --verify` exits 0 on)."""
    return result["passed"] and all(g["passed"] for g in (result.get("gguf") or {}).values())
