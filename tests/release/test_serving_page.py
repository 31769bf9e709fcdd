"""`tear-lora serve`'s side-by-side page, driven in headless Chromium on a demo bundle of two λ adapters (slow).

Needs the real llama-server (`bash scripts/build_llama_server.sh`, a C++ build) and Chromium (installed by
tests/release/browser.py with apt-get where we are root, else it says how): never skipped, it fails with that one line.
Reuse work with TEAR_LORA_SERVE_ADAPTERS (two adapter dirs, comma-separated), and with it TEAR_LORA_PAGE_BUNDLE (a
complete `bundle --gguf` of those adapters: the bundle names each by directory name only); otherwise two demo adapters
are trained first.
TEAR_LORA_PAGE_SCREENSHOT=docs/serving-page.png writes the 1280 px screenshot there too."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ..conftest import REPO
from .browser import Browser, find_chromium

INPUT_LIMIT = 48  # max new tokens per span in the compared run: enough for the demo adapters to close spans
DONE = "[...document.querySelectorAll('.column')].every(c => ['done', 'error', 'stopped'].includes(c.dataset.state))"
STATES = "[...document.querySelectorAll('.column')].map(c => c.dataset.state)"


def _prerequisites() -> str | None:
    from tear_lora.release.llama_server import LlamaServerError, converter_script, find_llama_server

    try:
        find_llama_server()
        converter_script()
    except LlamaServerError as e:
        return str(e)
    return find_chromium()[1] or None


ADAPTER_DIRS: dict[str, str] = {}  # bundle.json's `source` (a directory name) -> the adapter dir


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    """A `bundle --gguf f16 --dtype fp32` of two λ adapters (λ 0 and 2), in a directory whose name holds a comma
    (the one `--lora` value is a CSV row: the quoting is exercised for real)."""
    missing = _prerequisites()
    if missing:
        pytest.fail(missing)
    root = tmp_path_factory.mktemp("page")
    given = os.environ.get("TEAR_LORA_SERVE_ADAPTERS")
    if os.environ.get("TEAR_LORA_PAGE_BUNDLE") and not given:
        pytest.fail("TEAR_LORA_PAGE_BUNDLE needs TEAR_LORA_SERVE_ADAPTERS: the adapter dirs the bundle was made from")
    if given:
        adapters = given.split(",")
    else:
        sys.path.insert(0, str(REPO / "scripts"))
        from serve_check import train_demo

        adapters = [str(a) for a in train_demo(root / "adapters", steps=6, batch=1)]
    ADAPTER_DIRS.update({Path(a).name: os.path.abspath(a) for a in adapters})  # `generate` takes the adapter dir
    if os.environ.get("TEAR_LORA_PAGE_BUNDLE"):
        return os.path.abspath(os.environ["TEAR_LORA_PAGE_BUNDLE"])
    out = root / "demo, bundle"
    subprocess.run([sys.executable, "-m", "tear_lora.cli", "bundle", *adapters, "--out", str(out), "--gguf", "f16",
                    "--dtype", "fp32"], check=True, cwd=REPO, capture_output=True, timeout=3600)
    return str(out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with status {process.returncode} while starting"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _ask(browser: Browser, text: str, max_new: int) -> None:
    """Set max new tokens, type the input into the box and press Enter, as a user does."""
    browser.js(f"document.getElementById('max').value = {max_new}; document.getElementById('input').value = ''")
    browser.type("#input", text)
    browser.key("Enter", 13)


def _streaming(browser: Browser) -> bool:
    return browser.wait("[...document.querySelectorAll('.column')].some(c => c.dataset.state === 'response' "
                        "&& c.querySelector('.response').textContent.length > 0)", 300)


@pytest.mark.slow
def test_every_lambda_side_by_side_in_chromium(demo_bundle, tmp_path):
    """Typed input, every column answered: greedy responses equal /completion for that adapter (token ids),
    witnesses equal `tear-lora generate` (text), different adapters show different text; headers from
    bundle.json; the columns stack on a narrow window; Copy gives Markdown; Stop cancels; a server stopped
    mid-answer is reported in the columns, which do not hang."""
    from transformers import AutoTokenizer

    from tear_lora.data import template
    from tear_lora.release.llama_server import lora_field, post
    from tear_lora.rundir import atomic_write_bytes

    manifest = json.loads(open(os.path.join(demo_bundle, "bundle.json")).read())
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "tear_lora.cli", "serve", demo_bundle, "--port", str(port)],
                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    browser = None
    try:
        _wait_http(f"{url}/health", serve)
        adapters = json.loads(urllib.request.urlopen(f"{url}/lora-adapters", timeout=10).read())
        assert len(adapters) == 2, adapters
        browser = Browser(tmp_path / "profile")
        browser.open(url + "/")
        browser.wait("document.querySelectorAll('.column').length === 3", 60)
        headers = browser.js("[...document.querySelectorAll('.column')].map(c => c.innerText.split('\\n')"
                             ".slice(0, 2).join(' | '))")
        for header, entry in zip(headers[1:], manifest["adapters"]):
            data = entry["tear_lora"]["data"]["train"]["source_sha256"][:12]
            steps = entry["tear_lora"]["metrics"]["global_step"]
            assert entry["name"] in header and f"λ {entry['lambda']:g}" in header, header  # JS prints 2.0 as 2
            assert f"seed {entry['seed']}" in header and f"{steps} steps" in header and data in header, header

        text = json.loads((REPO / "data/raw/eval.jsonl").read_text().splitlines()[0])["input"]
        started = time.monotonic()
        _ask(browser, text, INPUT_LIMIT)
        browser.wait(DONE, 900)
        elapsed = time.monotonic() - started
        assert browser.js(STATES) == ["done"] * 3, browser.js(STATES)
        columns = browser.js("window.tearLoraPage.columns.map(c => ({name: c.spec.name, response: c.response, "
                             "witness: c.witness, responseTokens: c.responseTokens, shown: "
                             "[c.el.querySelector('.response').textContent, c.el.querySelector('.witness').textContent],"
                             " figures: c.el.querySelector('.figures').textContent}))")
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(demo_bundle, manifest["base"]))
        prompt = template.encode(tokenizer, template.segments(text))[0]
        for column, entry in zip(columns[1:], manifest["adapters"]):
            assert column["shown"] == [column["response"], column["witness"]]
            assert f"response {len(column['responseTokens'])} tokens" in column["figures"], column["figures"]
            served = post(f"{url}/completion", {"prompt": prompt, "n_predict": INPUT_LIMIT, "temperature": 0.0,
                                                "top_k": 1, "lora": lora_field(manifest, entry["name"]),
                                                "return_tokens": True, "cache_prompt": False})
            assert column["responseTokens"] == served["tokens"], (entry["name"], column, served)
            generated = subprocess.run([sys.executable, "-m", "tear_lora.cli", "generate", ADAPTER_DIRS[entry["source"]], "--input",
                                        text, "--max-new-tokens", str(INPUT_LIMIT), "--json"], cwd=REPO, check=True,
                                       capture_output=True, text=True, timeout=900)
            reference = json.loads(generated.stdout)
            assert (column["response"], column["witness"]) == (reference["response"], reference["witness"]), \
                (entry["name"], column, reference)
        answers = [c["response"] + "\n" + c["witness"] for c in columns]
        assert len(set(answers)) == 3, answers  # base, λ 0 and λ 2 each say something else

        shot = browser.screenshot()
        atomic_write_bytes(tmp_path / "page-1280.png", shot)
        if os.environ.get("TEAR_LORA_PAGE_SCREENSHOT"):
            atomic_write_bytes(os.environ["TEAR_LORA_PAGE_SCREENSHOT"], shot)
        browser.resize(480, 900)  # narrow: one column under the other, nothing wider than the window
        boxes = browser.js("[...document.querySelectorAll('.column')].map(c => c.getBoundingClientRect())"
                           ".map(r => [r.left, r.top, r.right])")
        assert len({round(b[0]) for b in boxes}) == 1 and boxes[0][1] < boxes[1][1] < boxes[2][1], boxes
        assert browser.js("document.documentElement.scrollWidth") <= 480
        browser.resize(1280, 900)

        browser.call("Browser.grantPermissions", origin=url,
                     permissions=["clipboardReadWrite", "clipboardSanitizedWrite"])
        browser.call("Page.bringToFront")  # the clipboard API wants a focused document
        browser.click("#copy")
        browser.wait("document.getElementById('status').textContent.startsWith('copied')", 30)
        markdown = browser.js("navigator.clipboard.readText()")
        assert markdown.startswith("# Every λ side by side") and f"> {text}" in markdown
        for column in columns:
            assert f"## {column['name']}" in markdown and column["response"] in markdown and column["witness"] in markdown

        _ask(browser, text + " Tell me more.", 512)  # Stop cancels every column, nothing left waiting
        _streaming(browser)
        browser.click("#stop")
        browser.wait(DONE, 30)
        assert "stopped" in browser.js(STATES) and browser.js("window.tearLoraPage.run") is None

        _ask(browser, text + " And then?", 512)  # the server goes away mid-answer
        _streaming(browser)
        serve.send_signal(signal.SIGTERM)
        browser.wait(DONE, 60)
        states = browser.js(STATES)
        assert "error" in states and "stopped" not in states, states
        errors = browser.js("[...document.querySelectorAll('.column[data-state=error] .state')].map(e => e.textContent)")
        assert errors and all("server not reachable" in e for e in errors), errors  # a broken stream, or /health
        assert serve.wait(timeout=60) in (0, 143)  # stopped by the signal it was sent (143 once serve says so)

        _ask(browser, "Anyone there?", 8)  # and with no server at all, every column says so at once
        browser.wait(DONE, 30)
        assert browser.js(STATES) == ["error"] * 3
        print(f"page: 3 columns x ({INPUT_LIMIT} + {INPUT_LIMIT}) tokens answered in {elapsed:.1f} s")
    finally:
        if browser is not None:
            browser.close()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=60)
        log.close()
    assert "DEPRECATED" not in (tmp_path / "serve.log").read_text()  # one --lora, comma-separated


@pytest.mark.slow
def test_the_page_asks_for_the_api_key_once(demo_bundle, tmp_path):
    """llama-server with --api-key keeps the page public and page.json, /tokenize, /completion behind the key:
    the page asks for it, says when it is refused, then sends it with every request."""
    from tear_lora.release.llama_server import LlamaServer, find_llama_server, lora_field, server_command
    from tear_lora.release.serve_page import page_dir

    manifest = json.loads(open(os.path.join(demo_bundle, "bundle.json")).read())
    port = _free_port()
    key = "k3y-for-the-page-test"
    browser = None
    loras = {e["name"]: lora_field(manifest, e["name"]) for e in manifest["adapters"]}
    with open(tmp_path / "server.log", "w") as log, page_dir(demo_bundle, manifest, loras) as public:
        command = server_command(find_llama_server(), Path(demo_bundle), manifest, "127.0.0.1", port,
                                 extra=["--path", str(public), "--api-key", key])
        with LlamaServer(command, "127.0.0.1", port, log=log) as server:
            try:
                browser = Browser(tmp_path / "profile")
                browser.open(server.url + "/")
                browser.wait("!document.getElementById('keybox').hidden", 30)
                browser.type("#key", "wrong")
                browser.key("Enter", 13)
                browser.wait("document.getElementById('keymsg').textContent.includes('refused')", 30)
                assert browser.js("document.querySelectorAll('.column').length") == 0
                browser.type("#key", key)
                browser.key("Enter", 13)
                browser.wait("document.querySelectorAll('.column').length === 3", 30)
                _ask(browser, "Is the key sent?", 4)
                browser.wait(DONE, 300)
                assert browser.js(STATES) == ["done"] * 3, browser.js(STATES)
                browser.open(server.url + "/")  # asked once: the tab keeps it
                browser.wait("document.querySelectorAll('.column').length === 3", 30)
                assert browser.js("document.getElementById('keybox').hidden")
            finally:
                if browser is not None:
                    browser.close()
