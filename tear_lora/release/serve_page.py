"""The side-by-side page of `tear-lora serve`: one input, one column per λ adapter plus the base.

llama-server serves static files from `--path DIR` at its own address, so the page and the API share one process
and one origin (no CORS, no second server). `page_dir` writes that DIR for the lifetime of `serve`: the page
(`release/page/index.html`, plain HTML + JS, nothing fetched from elsewhere) and `page.json`, what the page cannot learn
from llama-server itself:

- the columns: for each adapter its name, λ, seed, steps and training-data hash (from bundle.json) and the
  per-request `lora` list that selects it (every id, scale 1 for it, 0 for the others; the base: all zeros);
- the prompt layout: `template.segments(input, response)` with each tag as its token id and the two text spans
  as slots. The page tokenizes the text through llama-server's `/tokenize` with special-token parsing off (as
  `template.encode_text` does) and sends token ids, so the server sees exactly the prompt `tear-lora generate`
  builds: the response after `<|response|>`, then the witness of the decoded, stripped response after
  `<|witness|>`.

With `--api-key`, llama-server leaves `/` (the page) public and guards everything else, page.json included: the
page asks for the key when it gets a 401 and sends it as `Authorization: Bearer`.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..data import template
from ..metadata import public_name
from ..rundir import atomic_write_bytes, atomic_write_json

PAGE_HTML = Path(__file__).parent / "page" / "index.html"
SLOTS = ("input", "response")  # the text spans the page fills in, in template order


def prompt_layout(tokenizer) -> list:
    """`template.encode`'s token layout for segments(input, response): id lists (the BOS prefix when the tokenizer
    adds one, each tag as its single id) and slot names where text goes. The response prompt is the layout up to
    the "response" slot; the witness prompt is all of it."""
    marks = {f"\x00{slot}\x00": slot for slot in SLOTS}
    prefix = template.prefix_ids(tokenizer)
    layout: list = [prefix] if prefix else []
    for part in template.segments(*marks):
        layout.append([tokenizer.convert_tokens_to_ids(part.text)] if part.is_tag else marks[part.text])
    assert [x for x in layout if isinstance(x, str)] == list(SLOTS), layout
    return layout


def _column(entry: dict | None, lora: list[dict]) -> dict:
    if entry is None:
        return {"name": "base", "lambda": None, "seed": None, "steps": None, "data_sha256": None, "lora": lora}
    record = entry.get("tear_lora") or {}
    train = (record.get("data") or {}).get("train") or {}
    return {"name": entry["name"], "lambda": entry.get("lambda"), "seed": entry.get("seed"),
            "steps": (record.get("metrics") or {}).get("global_step"), "data_sha256": train.get("source_sha256"),
            "lora": lora}


def page_info(bundle_dir: Path, manifest: dict, loras: dict[str, list[dict]], tokenizer) -> dict:
    """page.json: the bundle's columns (the base first: every scale 0) and the prompt layout. `loras`: each
    adapter's per-request `lora` list (llama_server.lora_field)."""
    zeros = [{**x, "scale": 0.0} for x in next(iter(loras.values()))]
    columns = [_column(None, zeros)] + [_column(e, loras[e["name"]]) for e in manifest["adapters"]]
    base = (manifest.get("base_model") or {}).get("name_or_path") or "?"
    return {"kind": "tear_lora-page", "bundle": Path(bundle_dir).resolve().name, "base_model": public_name(base),
            "gguf_type": manifest.get("gguf_type"), "columns": columns, "layout": prompt_layout(tokenizer)}


@contextmanager
def page_dir(bundle_dir: str | Path, manifest: dict, loras: dict[str, list[dict]]):
    """A temporary directory holding index.html and page.json, for llama-server's `--path`; removed on exit."""
    from transformers import AutoTokenizer

    bundle_dir = Path(bundle_dir)
    tokenizer = AutoTokenizer.from_pretrained(bundle_dir / manifest["base"])
    directory = Path(tempfile.mkdtemp(prefix="tear-lora-page-"))
    try:
        atomic_write_bytes(directory / "index.html", PAGE_HTML.read_bytes())
        atomic_write_json(directory / "page.json", page_info(bundle_dir, manifest, loras, tokenizer))
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
