"""llama.cpp outside Python: its LoRA converter and its server, for bundles (serving.py) and `tear-lora serve`.

Neither is on PyPI as a tool: `scripts/build_llama_server.sh` unpacks the llama.cpp that llama-cpp-python's sdist
vendors (convert_lora_to_gguf.py with its own gguf-py) and builds the standalone `llama-server` once, into
`.cache/llama.cpp/` of the project. The converter runs as a subprocess of that tree, never copied into ours.

The server is driven over plain HTTP (urllib; the `openai` client is not needed): llama-server loads the serving
base once and every LoRA beside it (`--lora a.gguf,b.gguf`, `--lora-init-without-apply`), and each request names the
adapter it wants in `"lora": [{"id": i, "scale": s}, ...]`. The full list goes with every request, zeros included
(llama-server otherwise keeps the scales of the slot's previous request). It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tear_lora.metadata import CONTROL_CHARACTERS, AdapterError
from tear_lora.rundir import PROJECT_ROOT

BUILD_SCRIPT = "scripts/build_llama_server.sh"
LLAMA_DIR = PROJECT_ROOT / ".cache" / "llama.cpp"  # where BUILD_SCRIPT puts the source and the binary


class LlamaServerError(AdapterError):
    """llama.cpp's converter or server missing or failing; exit status 2."""


def llama_dir() -> Path:
    return Path(os.environ.get("TEAR_LORA_LLAMA_DIR") or LLAMA_DIR)


def converter_script() -> Path:
    """llama.cpp's convert_lora_to_gguf.py as BUILD_SCRIPT unpacked it, or a one-line error naming the script."""
    script = llama_dir() / "src" / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise LlamaServerError(f"--gguf needs llama.cpp's convert_lora_to_gguf.py (not on PyPI as a tool): run "
                               f"CONVERTER_ONLY=1 bash {BUILD_SCRIPT} (seconds; without CONVERTER_ONLY it also "
                               f"builds llama-server), looked in {script.parent}")
    return script


def convert_lora(peft_dir: Path, base_dir: Path, outtype: str, out_path: Path, trust_remote_code: bool = False) -> Path:
    """A PEFT LoRA dir -> llama.cpp LoRA GGUF, by llama.cpp's own converter (temp name, then renamed)."""
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    command = [sys.executable, str(converter_script()), "--base", str(base_dir), "--outtype", outtype,
               "--outfile", str(tmp), str(peft_dir)] + (["--trust-remote-code"] if trust_remote_code else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise LlamaServerError(f"llama.cpp's convert_lora_to_gguf.py failed on {peft_dir}: {' | '.join(tail)}")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def find_llama_server() -> str:
    """$TEAR_LORA_LLAMA_SERVER, the binary BUILD_SCRIPT built, or llama-server on PATH; else a one-line error."""
    for candidate in (os.environ.get("TEAR_LORA_LLAMA_SERVER"), llama_dir() / "bin" / "llama-server"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("llama-server")
    if found:
        return found
    raise LlamaServerError(f"llama-server not found (not on PATH, not in {llama_dir() / 'bin'}): build it once with "
                           f"bash {BUILD_SCRIPT} (~10 min on 2 cores) or put a llama.cpp llama-server on PATH")


def server_command(binary: str, bundle_dir: Path, manifest: dict, host: str, port: int, extra=()) -> list[str]:
    """llama-server with the bundle's base GGUF and every adapter's LoRA GGUF (ids in bundle.json order)."""
    if not manifest.get("base_gguf"):
        raise LlamaServerError(f"{bundle_dir}: the bundle has no GGUF files; make it with `tear-lora bundle ... --gguf f16`")
    command = [binary, "-m", str(bundle_dir / manifest["base_gguf"]), "--host", host, "--port", str(port)]
    command += ["--lora", lora_list([bundle_dir / entry["gguf"] for entry in manifest["adapters"]])]
    return command + ["--lora-init-without-apply", "--jinja", *extra]


def lora_list(paths) -> str:
    """One `--lora` value for every adapter: llama.cpp reads it as a CSV row (a repeated `--lora` is deprecated),
    so a path holding a comma or a quote is quoted, quotes doubled."""
    row = io.StringIO()
    csv.writer(row, lineterminator="").writerow([str(p) for p in paths])
    return row.getvalue()


def lora_field(manifest: dict, name: str) -> list[dict]:
    """The per-request `lora` list selecting adapter `name`: every id, scale 1 for it and 0 for the others."""
    names = [e["name"] for e in manifest["adapters"]]
    if name not in names:
        raise LlamaServerError(f"no adapter {name!r} in the bundle (it has {', '.join(names)})")
    return [{"id": i, "scale": 1.0 if n == name else 0.0} for i, n in enumerate(names)]


def post(url: str, payload: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class ServerStopped(Exception):
    """A stop was asked for (SIGTERM / SIGINT) while llama-server was starting; it has been stopped."""


class LlamaServer:
    """A llama-server process for the block: started, waited for (`/health`), stopped (SIGTERM, then kill).

    Whatever ends the start-up (no answer in time, the process dying, `stop_requested()` turning true, an
    exception) stops the process before it propagates: `__exit__` never runs when `__enter__` raises.
    """

    def __init__(self, command: list[str], host: str, port: int, log=None, start_timeout: float = 300, env=None,
                 stop_requested=lambda: False):
        self.command, self.url, self.log, self.start_timeout = command, f"http://{host}:{port}", log, start_timeout
        self.env, self.stop_requested, self.process = env, stop_requested, None

    def __enter__(self) -> LlamaServer:
        self.process = subprocess.Popen(self.command, stdout=self.log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        env=self.env)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:  # bounded: a server that never answers is stopped and reported
            if self.stop_requested():
                raise ServerStopped
            if self.process.poll() is not None:
                raise LlamaServerError(f"llama-server exited with status {self.process.returncode} while starting "
                                       f"(command: {' '.join(self.command)})")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise LlamaServerError(f"llama-server did not answer {self.url}/health within {self.start_timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def complete(self, prompt_ids: list[int], lora: list[dict], n_predict: int = 128) -> dict:
        """Greedy completion of token ids (no re-tokenizing, no BOS added), with the given adapter scales."""
        return post(f"{self.url}/completion", {"prompt": prompt_ids, "n_predict": n_predict, "temperature": 0.0,
                                               "top_k": 1, "lora": lora, "return_tokens": True,
                                               "cache_prompt": False})


def example_requests(url: str, manifest: dict, api_key: bool = False) -> list[str]:
    """One curl command per adapter, safe to paste: every argument shell-quoted (shlex.quote), the key never
    written out (`$TEAR_LORA_API_KEY` is read by the user's shell)."""
    lines = []
    auth = ' -H "Authorization: Bearer $TEAR_LORA_API_KEY"' if api_key else ""
    for entry in manifest["adapters"]:
        body = {"messages": [{"role": "user", "content": "My question"}], "temperature": 0,
                "lora": lora_field(manifest, entry["name"])}
        lines.append(f"# {json.dumps(entry['name'])} (λ = {json.dumps(entry['lambda'])})\n"
                     f"curl -s {shlex.quote(url + '/v1/chat/completions')} -H 'Content-Type: application/json'"
                     f"{auth} -d {shlex.quote(json.dumps(body))}")
    return lines


LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


def read_api_key(api_key: str | None, api_key_file: str | None, host: str) -> str | None:
    """The key clients must send (None: none asked for). A host other than this machine's loopback needs one:
    llama-server would otherwise answer anyone who can reach the port."""
    if api_key is not None and api_key_file is not None:
        raise LlamaServerError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise LlamaServerError(f"--api-key-file {api_key_file}: unreadable ({e.__class__.__name__})") from None
        if not api_key or "\n" in api_key:
            raise LlamaServerError(f"--api-key-file {api_key_file}: must hold the key alone on one line")
    if api_key is not None and (not api_key.strip() or CONTROL_CHARACTERS.search(api_key)):
        raise LlamaServerError("--api-key: empty or holding a control character")
    if api_key is None and not is_loopback(host):
        raise LlamaServerError(f"--host {host} listens beyond this machine: anyone who reaches the port could use "
                               "the server; pass --api-key-file FILE (or --api-key KEY), or bind 127.0.0.1")
    return api_key


def serve(bundle_dir: str | Path, manifest: dict, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, api_key_file: str | None = None) -> int:
    """`tear-lora serve`: run llama-server on the bundle (its checked bundle.json as `manifest`, from
    bundle_manifest.read_bundle) until SIGINT / SIGTERM, then stop it and wait for it.

    The signals only set a flag (no exception can land half-way through starting or stopping the process); the
    start-up wait and the serving loop read it. Exit status: 130 / 143 stopped by SIGINT / SIGTERM (start-up
    included); a server that dies by itself is an error naming its status.
    """
    from .serve_page import page_dir

    bundle_dir = Path(bundle_dir)
    key = read_api_key(api_key, api_key_file, host)
    command = server_command(find_llama_server(), bundle_dir, manifest, host, port)
    env = dict(os.environ, **({"LLAMA_ARG_API_KEY": key} if key else {}))  # llama-server's --api-key, off `ps`
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # the side-by-side page (serve_page.py) from llama-server's --path: one process, one origin
        loras = {e["name"]: lora_field(manifest, e["name"]) for e in manifest["adapters"]}
        with page_dir(bundle_dir, manifest, loras) as public, \
                LlamaServer(command + ["--path", str(public)], host, port, log=2, env=env,
                            stop_requested=lambda: bool(received)) as server:  # its log: our stderr
            print(f"llama-server on {server.url}: base {manifest['base_gguf']}, {len(manifest['adapters'])} "
                  f"adapters{' (clients send the API key)' if key else ''} (Ctrl-C stops it)")
            print(f"every adapter side by side: open {server.url}/ in a browser")
            for line in example_requests(server.url, manifest, api_key=bool(key)):
                print(line)
            sys.stdout.flush()
            while server.process.poll() is None and not received:
                time.sleep(0.2)
    except ServerStopped:
        pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        print(f"stopped llama-server ({signal.Signals(received[0]).name})", file=sys.stderr)
        return 128 + received[0]
    raise LlamaServerError(f"llama-server exited with status {server.process.returncode}")
