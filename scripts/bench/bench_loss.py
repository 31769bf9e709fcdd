"""Loss-layer benchmark: our chunked span loss vs naive full-logits cross-entropy (and TRL's stock fused head).

    python scripts/bench/bench_loss.py --device cpu --tokens 1024 --tokens 16384 --json bench_loss.json
    python scripts/bench/bench_loss.py --device cuda --tokens 4096 --tokens 16384 --tokens 32768

What runs (forward + backward, vocab 151,936, hidden 2048, weights in --dtype, loss in fp32):
  naive           the full [1, N, V] logits through the PEFT-wrapped head, then `naive_span_loss`
  chunked         `span_loss` as the trainer calls it (fast path, `_FusedSpanLoss`: frozen matrix + trainable token
                  rows, gradients finished in forward, nothing recomputed)
  chunked_recompute  the fast path before that: `token_nll` (`_ProjectedNLL`, logits recomputed in backward)
  chunked_module  `span_loss` forced through the wrapped module under checkpointing (the path before the fast one)
  trl_fused       TRL's `ChunkedLogProbFunction`, what stock `SFTTrainer` runs (raw weight: no token rows)

Peak memory. CUDA: `max_memory_allocated` minus what was allocated after setup (weight, hidden states), in this
process. CPU: each (impl, N) runs in a fresh subprocess and reports `ru_maxrss` (the process's resident-memory
high-water mark) after the run minus `ru_maxrss` after setup; a fresh process is needed because the high-water
mark never goes down. A size whose predicted peak exceeds --max-gb is skipped with the prediction instead of run,
and a worker the kernel kills for memory is reported as such rather than taking the machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VOCAB, HIDDEN, TAG_IDS = 151_936, 2048, list(range(151_669, 151_675))
IMPLS = ("naive", "chunked", "chunked_recompute", "chunked_module", "trl_fused")
# Predicted bytes per (token x vocab) element for naive, a little above the measured CPU slope (12.0 B in bf16
# for N = 1024..4096: bf16 logits, fp32 copies and gradients alive at once); the others hold one chunk at a time.
NAIVE_BYTES_PER_ELEMENT = {"bfloat16": 12.5, "float32": 16}


def predict_bytes(impl: str, tokens: int, chunk: int, dtype: str, vocab: int = VOCAB, hidden: int = HIDDEN) -> int:
    """Rough peak above setup, used only to skip sizes that cannot fit (the measured value is what we report)."""
    width = 2 if dtype == "bfloat16" else 4
    states = tokens * hidden * (4 + 2 * width)  # hidden grad (fp32 accumulate) + the gathered/cast copies
    if impl == "naive":
        return int(tokens * vocab * NAIVE_BYTES_PER_ELEMENT[dtype]) + 2 * vocab * hidden * width + states
    if impl == "chunked_module":
        return min(tokens, chunk) * vocab * (8 + 3 * width) + 2 * vocab * hidden * width + states
    if impl == "trl_fused":
        return 4096 * 32768 * 2 * width + vocab * hidden * 4 + states
    return min(tokens, chunk) * vocab * (4 + width) + states


def setup(tokens: int, dtype_name: str, device: str, vocab: int = VOCAB, hidden: int = HIDDEN, seed: int = 0):
    """A frozen [V, H] head under PEFT's trainable-token wrapper (six tag rows, as the trainer sees it), hidden
    states for N target positions (half response, half witness) and their token ids."""
    import torch
    from peft.utils.other import TrainableTokensWrapper

    from tear_lora.data.template import CONTEXT, RESPONSE, WITNESS

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=0.02)
    tags = TAG_IDS if vocab > max(TAG_IDS) else list(range(vocab - len(TAG_IDS), vocab))
    head = TrainableTokensWrapper(head, "default", token_indices=tags)
    states = torch.randn(1, tokens + 1, hidden, device=device, dtype=dtype).requires_grad_(True)
    input_ids = torch.randint(0, vocab, (1, tokens + 1), device=device)
    roles = torch.full((1, tokens + 1), RESPONSE, device=device)
    roles[0, 0], roles[0, 1 + tokens // 2 :] = CONTEXT, WITNESS
    return head, states, input_ids, roles


def step(impl: str, head, hidden, input_ids, roles, chunk: int) -> float:
    """One forward + backward; returns the loss value."""
    import torch

    from tear_lora.data.template import RESPONSE
    from tear_lora.train import loss as L

    hidden.grad = None
    if impl == "naive":
        loss = L.naive_span_loss(head(hidden), input_ids, roles, 1.0)
    elif impl in ("chunked", "chunked_module"):
        original = L.projection_parts
        if impl == "chunked_module":
            L.projection_parts = lambda layer: None  # force the generic module path
        try:
            loss = L.span_loss(hidden, L.span_targets(input_ids, roles), head, 1.0, chunk_size=chunk).loss
        finally:
            L.projection_parts = original
    elif impl == "chunked_recompute":
        targets = L.span_targets(input_ids, roles)
        selected = hidden[:, :-1].reshape(-1, hidden.shape[-1])[targets.positions]
        nll = L.token_nll(selected, targets.targets, head, chunk)
        is_response = targets.roles == RESPONSE
        counts = targets.counts().float()
        loss = (nll * is_response).sum() / counts[0] + (nll * ~is_response).sum() / counts[1]
    elif impl == "trl_fused":
        from trl.kernels import ChunkedLogProbFunction

        flat, targets = hidden[0, :-1], input_ids[0, 1:]
        weight = head.token_adapter.base_layer.weight
        log_probs = ChunkedLogProbFunction.apply(flat, weight, None, targets, 1.0, 32768, None, 1.0,
                                                 ("log_probs", "entropy", "is_top1"))[0]
        loss = -log_probs.sum() / targets.numel()
    else:
        raise ValueError(impl)
    loss.backward()
    if hidden.device.type == "cuda":
        torch.cuda.synchronize()
    return float(loss)


def measure(impl: str, tokens: int, chunk: int, dtype: str, device: str, repeat: int, vocab: int = VOCAB,
            hidden: int = HIDDEN) -> dict:
    """Peak bytes above setup and the best time of `repeat` runs, in this process."""
    import torch

    head, states, input_ids, roles = setup(tokens, dtype, device, vocab, hidden)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, loss = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        loss = step(impl, head, states, input_ids, roles, chunk)
        times.append(time.perf_counter() - start)
        if device == "cuda" and len(times) == 1:
            peak = torch.cuda.max_memory_allocated() - base
    if device == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"impl": impl, "tokens": tokens, "peak_bytes": int(peak), "time_s": round(min(times), 4),
            "loss": round(loss, 5), "device": device, "dtype": dtype, "chunk": chunk, "vocab": vocab, "hidden": hidden}


def run_cpu_worker(impl: str, tokens: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--tokens", str(tokens),
           "--chunk", str(args.chunk), "--dtype", args.dtype, "--device", "cpu", "--repeat", str(args.repeat),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"failed: {proc.stderr.strip()[-300:]}"
    return {"impl": impl, "tokens": tokens, "peak_bytes": None, "time_s": None, "skipped": why}


def memory_limit(args) -> int:
    if args.max_gb is not None:
        return int(args.max_gb * 1e9)
    if args.device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0] * 0.9)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(12e9, 0.6 * available))  # leave room for whoever else uses this machine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, action="append", help="target tokens N (repeatable)")
    parser.add_argument("--impl", action="append", choices=IMPLS, help="implementations (default: all)")
    parser.add_argument("--chunk", type=int, default=1024, help="our loss chunk (objective.loss_chunk_size)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per size (default 1 CPU, 3 CUDA)")
    parser.add_argument("--max-gb", type=float, default=None, help="skip sizes predicted above this")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary rows (smoke tests shrink it)")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (3 if args.device == "cuda" else 1)
    tokens = args.tokens or [1024, 4096, 16384]
    impls = args.impl or list(IMPLS)
    if args.worker:
        print(json.dumps(measure(impls[0], tokens[0], args.chunk, args.dtype, args.device, args.repeat, args.vocab,
                                 args.hidden)))
        return 0

    limit, rows = memory_limit(args), []
    print(f"{'impl':15s} {'tokens':>7s} {'peak MB':>9s} {'time s':>8s}  note", flush=True)
    for n in tokens:
        for impl in impls:
            predicted = predict_bytes(impl, n, args.chunk, args.dtype, args.vocab, args.hidden)
            if predicted > limit:
                row = {"impl": impl, "tokens": n, "peak_bytes": None, "time_s": None, "predicted_bytes": predicted,
                       "skipped": f"predicted {predicted / 1e9:.1f} GB > limit {limit / 1e9:.1f} GB"}
            elif args.device == "cpu":
                row = run_cpu_worker(impl, n, args)
            else:
                import torch

                try:
                    row = measure(impl, n, args.chunk, args.dtype, "cuda", args.repeat, args.vocab, args.hidden)
                except torch.cuda.OutOfMemoryError:
                    row = {"impl": impl, "tokens": n, "peak_bytes": None, "time_s": None, "skipped": "out of memory"}
                except Exception as e:  # e.g. TRL's Triton kernel on a machine without Triton: record, go on
                    row = {"impl": impl, "tokens": n, "peak_bytes": None, "time_s": None,
                           "skipped": f"failed: {type(e).__name__}: {str(e)[-300:]}"}
                torch.cuda.empty_cache()
            row.setdefault("predicted_bytes", predicted)
            rows.append(row)
            peak = f"{row['peak_bytes'] / 2**20:9.0f}" if row["peak_bytes"] is not None else f"{'-':>9s}"
            secs = f"{row['time_s']:8.2f}" if row["time_s"] is not None else f"{'-':>8s}"
            print(f"{impl:15s} {n:7d} {peak} {secs}  {row.get('skipped', '')}", flush=True)
            if args.json:  # after every row: a long CPU run interrupted keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    sys.exit(main())
