"""`tear-lora serve` (issue 28): bundle.json read through one checked reader (paths inside the bundle, names by the
run-name rule, types, bounded nesting), requests printed safe to paste, llama-server stopped and waited for on
SIGTERM / SIGINT at any point (start-up included), and no listening beyond this machine without a key.

A stand-in llama-server (a few lines of Python's http.server, `fake_server`) makes these fast; the real one is
tests/release/test_serving_server.py (slow)."""

import json
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tear_lora.cli import main
from tear_lora.release.llama_server import example_requests
from tear_lora.rundir import write_complete_marker

FAKE = '''import http.server, json, os, sys, time
args = sys.argv[1:]
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
record = os.environ["FAKE_LLAMA_RECORD"]
with open(record + ".tmp", "w") as f:
    json.dump({"pid": os.getpid(), "argv": args, "api_key": os.environ.get("LLAMA_ARG_API_KEY")}, f)
os.replace(record + ".tmp", record)
time.sleep(float(os.environ.get("FAKE_LLAMA_DELAY", "0")))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a):
        pass
http.server.HTTPServer((host, port), Health).serve_forever()
'''


@pytest.fixture()
def fake_server(tmp_path, monkeypatch):
    """A llama-server stand-in: records its pid, argv and key (FAKE_LLAMA_RECORD), answers /health."""
    script = tmp_path / "llama-server"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(0o755)
    record = tmp_path / "server.json"
    monkeypatch.setenv("TEAR_LORA_LLAMA_SERVER", str(script))
    monkeypatch.setenv("FAKE_LLAMA_RECORD", str(record))
    return record


BASE_TOKENIZER: list[Path] = []  # the tiny model's tokenizer with the tags, saved once (bundle_tokenizer)


@pytest.fixture(scope="module", autouse=True)
def bundle_tokenizer(tmp_path_factory, tiny_model_dir):
    """serve reads the base's tokenizer for the page's prompt layout: a fake bundle carries the real one."""
    from tear_lora.data.tokens import load_tokenizer

    directory = tmp_path_factory.mktemp("bundle-tokenizer")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(directory)
    BASE_TOKENIZER[:] = [directory]
    yield
    BASE_TOKENIZER.clear()


def fake_bundle(root: Path, edit=None) -> Path:
    """A bundle's layout and bundle.json as `tear-lora bundle --gguf f16` writes them (GGUF bytes are not read
    here; base/ holds only the tokenizer); `edit(manifest, bundle_dir)` changes it before the completion marker
    is written."""
    bundle = root / "served"
    for d in ("adapters/pair-lambda0", "adapters/pair-lambda2"):
        (bundle / d).mkdir(parents=True)
    shutil.copytree(BASE_TOKENIZER[0], bundle / "base")
    for f in ("base-f16.gguf", "adapters/pair-lambda0-f16.gguf", "adapters/pair-lambda2-f16.gguf"):
        (bundle / f).write_bytes(b"GGUF")
    manifest = {"kind": "tear_lora-bundle", "format_version": 1, "base": "base", "base_gguf": "base-f16.gguf",
                "gguf_type": "f16", "dtype": "fp32", "base_model": {"name_or_path": "tiny"},
                "adapters": [{"name": f"pair-lambda{lam}", "lambda": float(lam), "peft_dir": f"adapters/pair-lambda{lam}",
                              "gguf": f"adapters/pair-lambda{lam}-f16.gguf"} for lam in (0, 2)]}
    if edit:
        manifest = edit(manifest, bundle) or manifest
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (bundle / "bundle.json").write_text(text)
    write_complete_marker(bundle, kind="bundle")
    return bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def one_error_line(capsys, *needles) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _outside(manifest, bundle):
    (bundle.parent / "outside").mkdir()
    (bundle.parent / "outside" / "private.txt").write_text("secret")
    manifest["base_gguf"] = "../outside/private.txt"


def _absolute(manifest, bundle):
    manifest["adapters"][1]["gguf"] = "/etc/passwd"


def _symlink_out(manifest, bundle):
    (bundle.parent / "elsewhere.gguf").write_bytes(b"GGUF")
    os.symlink(bundle.parent / "elsewhere.gguf", bundle / "adapters" / "linked.gguf")
    manifest["adapters"][0]["gguf"] = "adapters/linked.gguf"


def _newline_name(manifest, bundle):
    manifest["adapters"][0]["name"] = "x\ntouch /tmp/pwned-by-bundle"


def _null_adapters(manifest, bundle):
    manifest["adapters"] = None


def _number_base_gguf(manifest, bundle):
    manifest["base_gguf"] = 5


def _deep(manifest, bundle):
    return '{"kind": "tear_lora-bundle", "adapters": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("edit,needle", [
    (_outside, "base_gguf '../outside/private.txt' points outside the bundle"),
    (_absolute, "adapters[1].gguf '/etc/passwd' points outside the bundle"),
    (_symlink_out, "goes through a symlink"),
    (_newline_name, "adapters[0].name"),
    (_null_adapters, "adapters must be a non-empty list, got None"),
    (_number_base_gguf, "base_gguf must be a path inside the bundle, got 5"),
    (_deep, "nested deeper than 64 levels"),
], ids=["dotdot", "absolute", "symlink", "newline-name", "adapters-null", "base-gguf-5", "nested"])
def test_serve_refuses_a_crafted_bundle_json_before_starting_anything(tmp_path, fake_server, edit, needle, capsys):
    """Issue 28 cases 4 and 8: each was handed to llama-server, or a TypeError / RecursionError traceback."""
    bundle = fake_bundle(tmp_path, edit)
    done = threading.Event()
    stopper = _signal_when(fake_server.exists, signal.SIGTERM, cancel=done)  # a regression would serve forever
    code = main(["serve", str(bundle), "--port", str(free_port())])
    done.set()
    stopper.join()
    assert code == 2
    one_error_line(capsys, "bundle.json", needle)
    assert not fake_server.exists()  # llama-server never started


def test_example_requests_are_safe_to_paste_whatever_the_name():
    """Quoted with shlex.quote: a name holding a newline, quotes and `touch` stays inside one argument."""
    evil = "x'\n touch /tmp/pwned; echo \"$(id)\""
    manifest = {"adapters": [{"name": evil, "lambda": 1.0}, {"name": "ok", "lambda": None}]}
    for line, entry in zip(example_requests("http://127.0.0.1:8080", manifest, api_key=True), manifest["adapters"]):
        comment, command = line.split("\n")
        assert comment.startswith("# ") and "\n" not in comment
        argv = shlex.split(command)
        assert argv[:3] == ["curl", "-s", "http://127.0.0.1:8080/v1/chat/completions"] and len(argv) == 9
        assert argv[6] == "Authorization: Bearer $TEAR_LORA_API_KEY" and "$(id)" not in " ".join(argv[:8])
        lora = json.loads(argv[8])["lora"]
        assert [x["scale"] for x in lora] == [1.0 if e is entry else 0.0 for e in manifest["adapters"]]


def _signal_when(condition, signum, timeout=120, cancel=None):
    """Send `signum` to this process from a thread once `condition()` holds (serve's handler sets its flag);
    nothing if it does not within `timeout`."""
    def run():
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline and not (cancel and cancel.is_set()):
            time.sleep(0.05)
        if condition():
            os.kill(os.getpid(), signum)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_during_start_up_stops_llama_server_and_closes_the_port(tmp_path, fake_server, monkeypatch, capsys):
    """Issue 28 case 5: the signal came while __enter__ waited for /health; serve said "stopped" and exited 0
    while the server kept answering on its port. Now: exit 143, the process gone, the port closed."""
    monkeypatch.setenv("FAKE_LLAMA_DELAY", "3")  # the server takes 3 s to listen: the signal lands in start-up
    port = free_port()
    thread = _signal_when(fake_server.exists, signal.SIGTERM)
    assert main(["serve", str(fake_bundle(tmp_path)), "--port", str(port)]) == 143
    thread.join()
    pid = json.loads(fake_server.read_text())["pid"]
    assert not alive(pid) and not port_open(port)
    err = capsys.readouterr().err
    assert "stopped llama-server (SIGTERM)" in err and "Traceback" not in err


def serving(monkeypatch) -> list:
    """A list that gets an item once serve has started llama-server and printed its requests."""
    from tear_lora.release import llama_server

    printed, original = [], llama_server.example_requests
    monkeypatch.setattr(llama_server, "example_requests", lambda *a, **k: printed.append(1) or original(*a, **k))
    return printed


def test_sigint_while_serving_stops_llama_server(tmp_path, fake_server, monkeypatch, capsys):
    port, printed = free_port(), serving(monkeypatch)
    thread = _signal_when(lambda: bool(printed), signal.SIGINT)
    assert main(["serve", str(fake_bundle(tmp_path)), "--port", str(port)]) == 130
    thread.join()
    assert not alive(json.loads(fake_server.read_text())["pid"]) and not port_open(port)
    out = capsys.readouterr().out
    assert out.count("curl -s") == 2 and "Authorization" not in out


def test_beyond_loopback_needs_a_key_which_is_passed_never_printed_never_written(tmp_path, fake_server, monkeypatch,
                                                                                 capsys):
    """Issue 28 case 10: --host 0.0.0.0 listened on every interface with no key and no warning."""
    bundle = fake_bundle(tmp_path)
    assert main(["serve", str(bundle), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    one_error_line(capsys, "--host 0.0.0.0", "--api-key-file")
    assert not fake_server.exists()

    key = "tl-canary-key-0123456789"
    (tmp_path / "key.txt").write_text(key + "\n")
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    port, printed = free_port(), serving(monkeypatch)
    thread = _signal_when(lambda: bool(printed), signal.SIGTERM)
    assert main(["serve", str(bundle), "--host", "0.0.0.0", "--port", str(port), "--api-key-file",
                 str(tmp_path / "key.txt")]) == 143
    thread.join()
    seen = json.loads(fake_server.read_text())
    assert seen["api_key"] == key and key not in " ".join(seen["argv"])  # off the command line (ps)
    captured = capsys.readouterr()
    assert key not in captured.out + captured.err and "Authorization: Bearer $TEAR_LORA_API_KEY" in captured.out
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    assert not any(key.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "key.txt"
                   and p != fake_server)
