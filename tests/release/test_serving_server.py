"""A real llama-server serving two λ adapters of one bundle, chosen per request (slow; scripts/serve_check.py).

Skipped, with the reason, when llama-server or llama.cpp's LoRA converter is not there: both come from
`bash scripts/build_llama_server.sh` (an opt-in ~10 min C++ build, never part of the fast suite)."""

import json
import os
import subprocess
import sys

import pytest

from ..conftest import REPO


def _missing() -> str | None:
    from tear_lora.release.llama_server import LlamaServerError, converter_script, find_llama_server

    try:
        find_llama_server()
        converter_script()
    except LlamaServerError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_llama_server_serves_each_lambda_as_its_merged_model(tmp_path):
    """Greedy tokens from llama-server equal each adapter's merged model in transformers on 3 held-out inputs
    (or diverge only at a near-tie), both stop at <|/response|>, the adapters answer differently on at least one
    input, and interleaved concurrent requests never get the other adapter's answer."""
    missing = _missing()
    if missing:
        pytest.skip(missing)
    adapters = os.environ.get("TEAR_LORA_SERVE_ADAPTERS")  # two adapter dirs, comma-separated, to skip training
    source = adapters.split(",") if adapters else ["--train-demo", str(tmp_path / "adapters")]
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts/serve_check.py"), *source, "--out",
                           str(tmp_path / "bundle"), "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=5400)
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["bundle_verify_passed"], result
    assert result["stops_agree"] and result["bleed"] == 0 and result["inputs_where_adapters_differ"] > 0, result
    assert result["tokens_compared"] > 0 and result["passed"], result
