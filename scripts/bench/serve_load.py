"""A served bundle under bounded load, against one merged model served alone: latency, throughput, RSS, bleed.

    python scripts/bench/serve_load.py --bundle BUNDLE_DIR [--json docs/bench/serve_load_cpu.json]
    python scripts/bench/serve_load.py --train-demo DIR --bundle BUNDLE_DIR ...   # two demo adapters (λ 0, 2) first

Loopback only (127.0.0.1, a free port). For the bundle (every adapter loaded, chosen per request by the `lora`
list) and then for one adapter's merged model (`tear-lora merge --gguf`, llama-server with no LoRA at all):

1. the reference: each (adapter, input) pair once, alone, greedy: "that adapter's greedy answer";
2. at each concurrency (1, 4, 8, 16 client threads, llama-server `--parallel` = the largest), the same N requests
   with the adapters interleaved at random (seeded): latency p50/p95/p99 (with N requests p99 is close to the
   max), generated tokens per second of wall time, the server's RSS (VmRSS, and VmHWM, the peak so far);
3. bleed: every answer that is not token for token that adapter's greedy answer, and of those, how many equal
   another adapter's answer (the adapter choice leaking between requests). Must be 0 at every level.

Bounded: N requests per level, each with a timeout, each level with a deadline; nothing listens beyond loopback.
Prints the JSON; exit status 1 when any level has bleed. Results: docs/bench/serve_load*.json, docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

HOST = "127.0.0.1"  # loopback only, whatever the arguments say
REQUEST_TIMEOUT = 300.0


def rss_mb(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


def ask(url: str, prompt: list[int], lora: list[dict] | None, n_predict: int) -> tuple[list[int], float]:
    """One greedy /completion of token ids -> (generated ids, latency in seconds)."""
    from tear_lora.release.llama_server import post

    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "top_k": 1, "return_tokens": True,
            "cache_prompt": False, **({"lora": lora} if lora is not None else {})}
    started = time.perf_counter()
    answer = post(f"{url}/completion", body, timeout=REQUEST_TIMEOUT)
    return answer["tokens"], time.perf_counter() - started


def level(url: str, pid: int, jobs: list[tuple[str, int]], prompts, loras: dict, reference: dict, n_predict: int,
          concurrency: int, deadline_s: float) -> dict:
    """The N jobs at one concurrency: latencies, tokens/s, RSS after, bleed against the reference answers."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(ask, url, prompts[i], loras[name], n_predict) for name, i in jobs]
        done, pending = wait(futures, timeout=deadline_s)
        for f in pending:
            f.cancel()
    wall = time.perf_counter() - started
    if pending:
        raise TimeoutError(f"concurrency {concurrency}: {len(pending)} of {len(jobs)} requests still running after "
                           f"{deadline_s:.0f} s")
    answers = [f.result() for f in futures]
    latencies = np.array([latency for _, latency in answers])
    bleed = other = 0
    for (name, i), (tokens, _) in zip(jobs, answers):
        if tokens != reference[name, i]:
            bleed += 1
            other += any(tokens == reference[n, i] for n in loras if n != name)
    tokens = sum(len(t) for t, _ in answers)
    return {"concurrency": concurrency, "requests": len(jobs), "wall_s": round(wall, 2),
            **{f"p{q}_s": round(float(np.percentile(latencies, q)), 3) for q in (50, 95, 99)},
            "max_s": round(float(latencies.max()), 3),
            "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 1), "rss_mb": rss_mb(pid),
            "bleed": bleed, "bleed_equal_to_another_adapter": other}


def run_server(make_command, log: Path, jobs, prompts, loras: dict, args) -> tuple[dict, dict]:
    """Start llama-server (`make_command(port)`), take the reference answers, run every level, stop it."""
    from tear_lora.release.llama_server import LlamaServer

    port = free_port()
    with open(log, "w") as out, LlamaServer(make_command(port), HOST, port, log=out) as server:
        pid = server.process.pid
        idle = rss_mb(pid)
        reference = {}
        for name in loras:
            for i, prompt in enumerate(prompts):
                reference[name, i] = ask(server.url, prompt, loras[name], args.n_predict)[0]
        levels = [level(server.url, pid, jobs, prompts, loras, reference, args.n_predict, c, args.level_deadline)
                  for c in args.levels]
    return {"rss_mb_loaded": idle, "levels": levels,
            "distinct_answers": len({tuple(v) for v in reference.values()}), "answers": len(reference)}, reference


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def merged_gguf(bundle: Path, manifest: dict, name: str, source: Path) -> Path:
    """`tear-lora merge` of the adapter the bundle calls `name`, with --gguf of the bundle's type (kept when done)."""
    entry = next(e for e in manifest["adapters"] if e["name"] == name)
    out = bundle.parent / f"{bundle.name}-merged-{name}"
    gguf = out / f"{entry['tear_lora']['run_name']}-{manifest['gguf_type']}.gguf"
    if not gguf.is_file():
        subprocess.run([sys.executable, "-m", "tear_lora.cli", "merge", str(source), "--out", str(out),
                        "--dtype", manifest["dtype"], "--gguf", manifest["gguf_type"], "--overwrite"],
                       check=True, cwd=REPO)
    return gguf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a `tear-lora bundle --gguf` dir (built here "
                        "from --train-demo when absent)")
    parser.add_argument("--train-demo", type=Path, help="train two short demo adapters here (if absent) first")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--levels", default="1,4,8,16", help="client concurrency levels (default 1,4,8,16)")
    parser.add_argument("--inputs", type=int, default=8, help="held-out inputs the requests draw from")
    parser.add_argument("--n-predict", type=int, default=32, help="max new tokens per request (default 32)")
    parser.add_argument("--level-deadline", type=float, default=600.0, help="seconds one level may take")
    parser.add_argument("--threads", type=int, default=2, help="llama-server --threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="the interleaving's random seed")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--adapters", help="the adapter dirs the bundle was made from, comma-separated (a bundle "
                        "names them by directory name only); not needed with --train-demo")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]

    from transformers import AutoTokenizer

    from tear_lora.adapters import adapter_recipe
    from tear_lora.data import template
    from tear_lora.release.bundle import bundle
    from tear_lora.release.bundle_manifest import BundleError, read_bundle
    from tear_lora.release.llama_server import find_llama_server, lora_field, server_command
    from tear_lora.rundir import atomic_write_json

    binary = find_llama_server()
    adapters = [Path(a) for a in args.adapters.split(",")] if args.adapters else []
    try:
        manifest = read_bundle(args.bundle)
    except BundleError:
        if not args.train_demo:
            parser.error(f"{args.bundle} is not a complete bundle; pass --train-demo DIR to make one")
        from serve_check import train_demo

        adapters = train_demo(args.train_demo)
        bundle(adapters, args.bundle, gguf="f16", dtype="fp32")
        manifest = read_bundle(args.bundle)
    sources = {a.name: a for a in adapters}
    missing = [e["source"] for e in manifest["adapters"] if e["source"] not in sources]
    if missing:
        parser.error(f"pass --adapters with the adapter dirs the bundle was made from (missing: {', '.join(missing)})")
    names = [e["name"] for e in manifest["adapters"]]
    tokenizer = AutoTokenizer.from_pretrained(args.bundle / manifest["base"])
    eval_file = REPO / adapter_recipe(sources[manifest["adapters"][0]["source"]]).data.eval_file
    inputs = [json.loads(line)["input"] for line in eval_file.open(encoding="utf-8")][: args.inputs]
    prompts = [template.encode(tokenizer, template.segments(x))[0] for x in inputs]
    rng = random.Random(args.seed)
    jobs = [(rng.choice(names), rng.randrange(len(prompts))) for _ in range(args.requests)]
    slots = ["--parallel", str(max(args.levels)), "-c", str(512 * max(args.levels)), "--threads", str(args.threads)]

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
              "bundle": args.bundle.name, "gguf_type": manifest["gguf_type"], "adapters": names,
              "settings": {"requests_per_level": args.requests, "levels": args.levels, "inputs": len(prompts),
                           "n_predict": args.n_predict, "greedy": True, "server": slots, "seed": args.seed},
              "interleaving": {n: sum(name == n for name, _ in jobs) for n in names}}
    loras = {n: lora_field(manifest, n) for n in names}
    result["bundle_server"], bundled = run_server(
        lambda port: server_command(binary, args.bundle, manifest, HOST, port, extra=slots),
        args.bundle.parent / f"{args.bundle.name}-load.log", jobs, prompts, loras, args)
    merged = names[-1]
    gguf = merged_gguf(args.bundle, manifest, merged, sources[manifest["adapters"][-1]["source"]])
    result["merged_server"], alone = run_server(
        lambda port: [binary, "-m", str(gguf), "--host", HOST, "--port", str(port), *slots],
        args.bundle.parent / f"{args.bundle.name}-merged-load.log", [(merged, i) for _, i in jobs], prompts,
        {merged: None}, args)
    # the merged model's greedy answers against the same adapter's through the bundle (f16 rounding differs)
    result["merged_server"].update({"adapter": merged, "answers_equal_to_the_bundle": sum(
        alone[merged, i] == bundled[merged, i] for i in range(len(prompts)))})
    result["cost_per_request_adapters"] = [
        {"concurrency": b["concurrency"], "p50_ratio": round(b["p50_s"] / m["p50_s"], 2),
         "tokens_per_s_ratio": round(b["tokens_per_s"] / m["tokens_per_s"], 2)}
        for b, m in zip(result["bundle_server"]["levels"], result["merged_server"]["levels"])]
    bleed = sum(x["bleed"] for s in ("bundle_server", "merged_server") for x in result[s]["levels"])
    result["passed"] = bleed == 0
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        atomic_write_json(args.json, result, indent=1)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
