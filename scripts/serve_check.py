"""A real llama-server, a real client: every λ of a bundle served side by side, checked against transformers.

    python scripts/serve_check.py ADAPTER_A ADAPTER_B --out BUNDLE_DIR [--json RESULT.json]
    python scripts/serve_check.py --train-demo DIR --out BUNDLE_DIR      # two short demo adapters (λ 0, 2) first

1. `tear-lora bundle A B --gguf f16 --dtype fp32 --verify` into BUNDLE_DIR (kept when it is already complete).
2. llama-server (scripts/build_llama_server.sh) on 127.0.0.1 with the base GGUF and both LoRA GGUFs,
   `--lora-init-without-apply`; each request selects one adapter with the full `lora` list (plain HTTP).
3. Per adapter, on held-out inputs: the server's greedy tokens (prompt sent as token ids) against transformers'
   greedy tokens on that adapter's merged model (export.merge_into, fp32); both must stop at `<|/response|>`.
   A divergence is reported with transformers' top-2 logit gap there (f16 weights can flip a near-tie).
4. Interleaved concurrent requests (both adapters, every input, several rounds, 4 client threads): an answer
   equal to the *other* adapter's sequential answer is a bleed; any other difference is drift (batching may move
   floating-point sums), counted separately.
Prints one JSON object with the numbers; exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NEAR_TIE = 0.05  # top-2 logit gap under which an f16 GGUF may pick the other token


def train_demo(root: Path, steps: int = 12, batch: int = 3) -> list[Path]:
    """Two demo adapters (λ 0 and 2) on SmolLM2-135M, trained briefly: enough to differ and to close spans.
    Without 4-bit: bitsandbytes' NF4 matmuls on a CPU take minutes a step on 2 shared cores."""
    subprocess.run([sys.executable, str(REPO / "scripts/make_demo_model.py")], check=True, cwd=REPO)
    out = []
    for lam in (0, 2):
        run = f"serve-demo-lambda{lam}"
        if not (root / run / "tear_lora.json").exists():
            subprocess.run([sys.executable, "-m", "tear_lora.cli", "train", "recipes/demo-cpu.yaml",
                            "--set", f"objective.lambda={lam}", "--set", f"output.run_name={run}",
                            "--set", f"output.dir={root}", "--set", f"data.processed_dir={root}/processed",
                            "--set", "model.load_in_4bit=false",
                            "--set", f"training.max_steps={steps}", "--set", "training.learning_rate=3e-3",
                            "--set", f"training.per_device_train_batch_size={batch}",
                            "--set", "training.warmup_steps=2", "--set", f"training.save_steps={steps}",
                            "--set", "training.report_to=none"], check=True, cwd=REPO)
        out.append(root / run)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformers_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy ids (the stop token included when reached) and the top-2 logit gap at each step."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    gaps = [float(s[0].float().topk(2).values.diff().abs()) for s in out.scores]
    return out.sequences[0, len(prompt):].tolist(), gaps


def compare(ours: list[int], gaps: list[float], served: list[int], stop_id: int) -> dict:
    """Server tokens against transformers', each with the stop token when generation reached it."""
    stopped = bool(ours) and ours[-1] == stop_id
    server_stopped = bool(served) and served[-1] == stop_id
    body, served = (ours[:-1] if stopped else ours), (served[:-1] if server_stopped else served)
    same = 0
    while same < min(len(body), len(served)) and body[same] == served[same]:
        same += 1
    equal = body == served
    return {"tokens": len(body), "matching_prefix": same, "equal": equal, "transformers_stopped": stopped,
            "server_stopped": server_stopped,
            "divergence_gap": None if equal or same >= len(gaps) else gaps[same]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="*", help="two adapter dirs of one base")
    parser.add_argument("--train-demo", type=Path, help="train two short demo adapters here (if absent) and use them")
    parser.add_argument("--out", type=Path, required=True, help="bundle dir (reused when complete)")
    parser.add_argument("--inputs", type=int, default=3, help="held-out inputs (default 3)")
    parser.add_argument("--n-predict", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3, help="concurrent rounds for the bleed check")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from tear_lora.adapters import adapter_recipe
    from tear_lora.data import template
    from tear_lora.data.tokens import RESPONSE_CLOSE
    from tear_lora.release.bundle import BundleError, bundle
    from tear_lora.release.bundle_manifest import read_bundle
    from tear_lora.release.llama_server import LlamaServer, find_llama_server, lora_field, server_command
    from tear_lora.release.merge import generation_config, load_merge_base, merge_into
    from tear_lora.train.model import load_tokenizer_for

    adapters = [Path(a) for a in args.adapters] or train_demo(args.train_demo)
    result: dict = {"adapters": [str(a) for a in adapters]}
    binary = find_llama_server()
    started = time.perf_counter()
    try:
        read_bundle(args.out)
    except BundleError:  # none yet, or not a complete one: (re)made; a directory not ours is refused, untouched
        bundle(adapters, args.out, gguf="f16", dtype="fp32", verify_rows=4, overwrite=True)
    result["bundle_s"] = round(time.perf_counter() - started, 1)
    manifest = json.loads((args.out / "bundle.json").read_text())
    verified = json.loads((args.out / "verify.json").read_text())
    result["bundle_verify_passed"] = verified["passed"]
    tokenizer = AutoTokenizer.from_pretrained(args.out / manifest["base"])
    stop_id = tokenizer.convert_tokens_to_ids(RESPONSE_CLOSE)
    recipe = adapter_recipe(adapters[0])
    inputs = [json.loads(line)["input"] for line in Path(REPO / recipe.data.eval_file).open()][: args.inputs]
    prompts = [template.encode(tokenizer, template.segments(x))[0] for x in inputs]

    reference: dict[str, list] = {}
    for adapter, entry in zip(adapters, manifest["adapters"]):
        recipe = adapter_recipe(adapter)
        merged = merge_into(load_merge_base(recipe, load_tokenizer_for(recipe), "dequantized", torch.float32), adapter)
        merged.generation_config = generation_config(merged, tokenizer)  # the stops the GGUF declares
        reference[entry["name"]] = [transformers_greedy(merged, p, args.n_predict) for p in prompts]
        del merged

    port = free_port()
    command = server_command(binary, args.out, manifest, "127.0.0.1", port,
                             extra=["--parallel", "4", "-c", "4096", "--threads", "2"])
    log = open(args.out.parent / f"{args.out.name}-llama-server.log", "w")
    names = [e["name"] for e in manifest["adapters"]]
    with LlamaServer(command, "127.0.0.1", port, log=log) as server:
        sequential: dict[str, list[list[int]]] = {}
        result["agreement"] = {}
        for name in names:
            answers = [server.complete(p, lora_field(manifest, name), args.n_predict) for p in prompts]
            sequential[name] = [a["tokens"] for a in answers]
            checks = [compare(ours, gaps, a["tokens"], stop_id) for (ours, gaps), a in zip(reference[name], answers)]
            for check, answer in zip(checks, answers):
                check["server_stop_type"] = answer.get("stop_type")
                check["server_stopped_at_response_close"] = check["server_stopped"] and answer.get("stop_type") == "eos"
            result["agreement"][name] = checks
        jobs = [(name, i) for _ in range(args.rounds) for i in range(len(prompts)) for name in names]
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda job: server.complete(prompts[job[1]], lora_field(manifest, job[0]),
                                                                args.n_predict)["tokens"], jobs))
        bleed = drift = 0
        for (name, i), tokens in zip(jobs, answers):
            other = [n for n in names if n != name][0]
            if tokens == sequential[name][i]:
                continue
            if tokens == sequential[other][i]:
                bleed += 1
            else:
                drift += 1
        chat = server_chat(server.url, manifest, names[0], inputs[0], args.n_predict)
    log.close()
    distinguishable = sum(sequential[names[0]][i] != sequential[names[1]][i] for i in range(len(prompts)))
    checks = [c for per in result["agreement"].values() for c in per]
    result.update({
        "tokens_compared": sum(c["tokens"] for c in checks),
        "tokens_matching": sum(c["matching_prefix"] for c in checks),
        "sequences_equal": sum(c["equal"] for c in checks), "sequences": len(checks),
        "stops_agree": all(c["transformers_stopped"] == c["server_stopped_at_response_close"] for c in checks),
        "concurrent_requests": len(jobs), "bleed": bleed, "drift": drift,
        "inputs_where_adapters_differ": distinguishable,
        "chat_text": chat, "completion_text": tokenizer.decode(sequential[names[0]][0], skip_special_tokens=True),
    })
    result["chat_completion_equals_completion"] = result["chat_text"] == result["completion_text"]
    near_ties_only = all(c["equal"] or (c["divergence_gap"] is not None and c["divergence_gap"] < NEAR_TIE)
                         for c in checks)
    result["passed"] = (result["bundle_verify_passed"] and near_ties_only and result["stops_agree"] and bleed == 0
                        and distinguishable > 0)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if result["passed"] else 1


def server_chat(url: str, manifest: dict, name: str, text: str, n: int) -> str:
    """The OpenAI-style chat endpoint with the GGUF's chat template (llama-server --jinja)."""
    from tear_lora.release.llama_server import lora_field, post

    reply = post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "temperature": 0,
                                                "max_tokens": n, "lora": lora_field(manifest, name)})
    return reply["choices"][0]["message"]["content"]


if __name__ == "__main__":
    sys.exit(main())
