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

from tear_lora.adapters import AdapterSet, adapter_recipe, check_base
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
from tear_lora.train.model import load_base, load_tokenizer_for

from .model_card import write_model_card
from .verify import agreement_over_rows, within_tolerance

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
        run_name = _write_merged(Path(adapter_dir), build, base_weights, dtype, base, trust_remote_code,
                                 needs_eval_file=bool(verify_rows) and not verify_data, gguf=gguf)
        _write_gguf(build, run_name, gguf, trust_remote_code)
        write_model_card(build, out_dir.name)  # after the GGUFs: the converter would read it as its metadata
        if verify_rows:
            _verify(adapter_dir, build, verify_data, verify_rows, base, trust_remote_code, out_dir.name)
        write_complete_marker(build, kind="merge output")  # last: only now is the build a merge output
    return out_dir


def _write_merged(adapter_dir: Path, build: Path, base_weights: str, dtype: str, base: str | None,
                  trust_remote_code: bool, needs_eval_file: bool = False, gguf: tuple[str, ...] = ()) -> str:
    """Weights, tokenizer (with the chat template), generation config, recipe and metadata; returns the run name."""
    import yaml

    from tear_lora.data import template
    from tear_lora.recipe import mask_secrets

    from .gguf import MODELFILE, gguf_file_name

    recipe = adapter_recipe(adapter_dir, base, trust_remote_code)
    if needs_eval_file and not recipe.data.eval_file:  # found out now, not after the merge
        raise MergeError(f"{adapter_dir}: the recipe has no data.eval_file; pass --data FILE for --verify")
    tokenizer = load_tokenizer_for(recipe)
    metadata = check_base(adapter_dir, recipe, tokenizer)
    merged = merge_into(load_merge_base(recipe, tokenizer, base_weights, EXPORT_DTYPES[dtype]), adapter_dir)
    merged.generation_config = generation_config(merged, tokenizer)
    merged.save_pretrained(build)  # safetensors; the whole dir is swapped in later, so in place is fine here
    usual_permissions(build)
    tokenizer.chat_template = template.chat_template_for(tokenizer)  # replaces the base's (e.g. ChatML)
    tokenizer.save_pretrained(build)
    # re-masked: an adapter trained before recipes were masked may still hold a hub token in its recipe.yaml
    raw = yaml.safe_load((adapter_dir / "recipe.yaml").read_text(encoding="utf-8"))
    atomic_write_text(build / "recipe.yaml", yaml.safe_dump(mask_secrets(raw), sort_keys=False))
    metadata["format_version"] = METADATA_VERSION
    metadata["merged"] = {"adapter": str(adapter_dir), "adapter_files": metadata.pop("files", None),
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
    """Logits of the 4-bit base + adapter (what was trained) vs the merged directory, on the eval set.

    `merge(verify_rows=...)` does this inside its build dir, before the completion marker. On a finished
    output (marker present) verify.json and README.md change in place, so the marker is rewritten after them
    (under the output's lock): it lists every file by size, and excluding these two would let a truncated
    card pass as complete.
    """
    merged_dir = Path(merged_dir)
    if not (merged_dir / COMPLETE_MARKER).exists():
        return _verify(adapter_dir, merged_dir, data, rows, base, trust_remote_code, merged_dir.name)
    with exclusive_lock(lock_path_for(merged_dir), f"merge output {merged_dir}"):
        problem = incomplete_reason(merged_dir)
        if problem:
            raise MergeError(f"{merged_dir}: an incomplete merge output ({problem}); merge again")
        result = _verify(adapter_dir, merged_dir, data, rows, base, trust_remote_code, merged_dir.name)
        write_complete_marker(merged_dir, kind=(read_marker(merged_dir) or {}).get("kind"))
    return result


def _verify(adapter_dir, merged_dir: Path, data, rows: int, base, trust_remote_code: bool, name: str) -> dict:
    """Measure, write verify.json and the model card; the merged side is loaded back from disk, so the saved
    files (weights, tie flag, dtype) are what is checked."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from tear_lora.data.prepare import prepare

    reference = AdapterSet(adapter_dir, base, trust_remote_code)
    data = data or reference.recipe.data.eval_file
    if not data:
        raise MergeError(f"{adapter_dir}: the recipe has no data.eval_file; pass --data FILE for --verify")
    dataset = prepare(data, reference.tokenizer, reference.recipe, save=False).dataset
    dataset = dataset.select(range(min(rows, len(dataset))))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto", device_map=reference.model.device,
                                                  trust_remote_code=trust_remote_code).eval()
    rows_ids = (row["input_ids"] for row in tqdm(dataset, desc="verify", unit="row"))
    agreement = agreement_over_rows(reference.model, merged, rows_ids, reference.model.device)
    dtype = read_metadata(merged_dir)["merged"]["dtype"]
    result = {"rows": len(dataset), **agreement, "dtype": dtype, "tolerance": TOLERANCES[dtype]}
    result["passed"] = within_tolerance(result, TOLERANCES[dtype])
    gguf_files = read_metadata(merged_dir)["merged"].get("gguf") or {}
    if gguf_files:  # `passed` stays the merge's own verdict; each GGUF carries its own
        del reference  # the 4-bit model: the GGUFs are compared with the merged model only
        result["gguf"] = _verify_gguf(merged_dir, merged, gguf_files, [row["input_ids"] for row in dataset])
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
