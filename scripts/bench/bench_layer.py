"""What one decoder layer keeps for backward and holds on top while it runs, per token, vs the plan's formula.

    python scripts/bench/bench_layer.py --tokens 512                 # CPU as it is
    python scripts/bench/bench_layer.py --tokens 512 --cuda-like     # CPU keeping what CUDA keeps
    python scripts/bench/bench_layer.py --tokens 512 --device cuda --json docs/bench/layer_cuda.json

One Qwen3-1.7B-shaped decoder layer (random weights, 4-bit NF4, LoRA r16 on all linears with the recipe's dropout
0.05, loaded through the recipe's own path) runs forward under bf16 autocast on [1, tokens, hidden] bf16 hidden
states, inside `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for backward.
Counted: each distinct storage once, leaving out parameters, the layer's input (a checkpointed layer input, a
term of its own in the plan) and the rotary cos/sin (shared by all layers, also its own term). That is the
"saved" part of the plan's per-token layer cost. The "transient" part is measured on a second forward + backward:
the forward's peak above what is alive when it returns, and the backward's peak above what is alive when it
starts (CPU: the profiler's allocation timeline; CUDA: the allocator's counters); the plan takes the larger.
`--cuda-like` undoes the two CPU-only differences (bench_train.emulate_cuda_saved_tensors), so the CPU counts are
what CUDA would keep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, bench_recipe, build_model_dir, emulate_cuda_saved_tensors  # noqa: E402


def saved_bytes(layer, hidden, position_embeddings, excluded: set[int], device: str) -> dict[str, int]:
    """Bytes of the distinct storages the layer's forward saves for backward, by dtype."""
    import torch

    seen: dict[int, tuple[int, str]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = (storage.nbytes(), str(t.dtype).replace("torch.", ""))
        return t

    with torch.autocast(device, dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(hidden, attention_mask=None, position_embeddings=position_embeddings)
    out = out[0] if isinstance(out, tuple) else out
    by_dtype: dict[str, int] = {}
    for nbytes, dtype in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    out.float().sum().backward()  # the graph really is trainable (and frees what it saved)
    return by_dtype


def transients(layer, hidden, position_embeddings, device: str) -> tuple[int, int]:
    """(forward, backward) bytes the layer holds beyond its steady state: the forward's peak above what is alive
    when it returns (what it saved, its output), and the backward's peak above what is alive when it starts.
    CPU: the profiler's allocation timeline; CUDA: the allocator's counters."""
    import torch

    def run_forward():
        with torch.autocast(device, dtype=torch.bfloat16):
            out = layer(hidden, attention_mask=None, position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run_forward()
        torch.cuda.synchronize()
        forward = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        grad = torch.randn_like(out)
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.backward(grad)
        torch.cuda.synchronize()
        return forward, torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    def peak_and_end(prof) -> tuple[int, int]:
        current = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
            peak = max(peak, current)
        return peak, current

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        out = run_forward()
    peak, end = peak_and_end(p)
    grad = torch.randn_like(out)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        out.backward(grad)
    return peak - end, peak_and_end(p)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--shape", choices=("tiny", "qwen3-1.7b"), default="qwen3-1.7b")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cuda-like", action="store_true", help="CPU: keep what CUDA keeps")
    parser.add_argument("--lora-dropout", type=float, help="instead of the recipe's 0.05 (what dropout costs)")
    parser.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "tear_lora_bench_models"))
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    import torch

    from tear_lora.data.tokens import structural_token_ids
    from tear_lora.train.model import add_adapters, load_base, load_tokenizer_for
    from tear_lora.train.plan import Shape, _sizes, layer_bytes_per_token

    if args.cuda_like and args.device == "cpu":
        emulate_cuda_saved_tensors()
    model_dir = build_model_dir(args.shape, 1, Path(args.model_root))
    ns = argparse.Namespace(seq=args.tokens, chunk=256, steps=1, optim=None)
    recipe = bench_recipe(model_dir, ns, 1, args.device == "cuda")
    if args.lora_dropout is not None:
        recipe.lora.dropout = args.lora_dropout
    tokenizer = load_tokenizer_for(recipe)
    model = add_adapters(load_base(recipe, tokenizer), recipe, list(structural_token_ids(tokenizer).values()))
    model.train()
    inner = model.get_base_model().model
    layer = inner.layers[0]
    torch.manual_seed(0)
    hidden_size = inner.config.hidden_size
    hidden = torch.randn(1, args.tokens, hidden_size, dtype=torch.bfloat16, device=args.device, requires_grad=True)
    positions = torch.arange(args.tokens, device=args.device)[None]
    cos, sin = inner.rotary_emb(hidden, positions)
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), hidden, cos, sin]}
    by_dtype = saved_bytes(layer, hidden, (cos, sin), excluded, args.device)
    measured = sum(by_dtype.values()) / args.tokens
    hidden.grad = None
    forward, backward = (b / args.tokens for b in transients(layer, hidden, (cos, sin), args.device))

    shape = Shape.from_config(json.loads((model_dir / "config.json").read_text()))
    act = _sizes(recipe, shape)["act"]
    lora_on = set(shape.linears())
    plan_saved, plan_transient = layer_bytes_per_token(shape, act, recipe.lora.dropout, lora_on, kv_repeated=False)
    row = {"device": args.device, "shape": args.shape, "cuda_like": args.cuda_like and args.device == "cpu", "tokens": args.tokens,
           "hidden": hidden_size, "lora_dropout": recipe.lora.dropout, "measured_saved_bytes_per_token": round(measured),
           "measured_by_dtype_bytes_per_token": {k: round(v / args.tokens) for k, v in by_dtype.items()},
           "plan_saved_bytes_per_token": plan_saved, "plan_over_measured": round(plan_saved / measured, 4),
           "forward_transient_bytes_per_token": round(forward), "backward_transient_bytes_per_token": round(backward),
           "plan_transient_bytes_per_token": plan_transient,
           "measured_layer_bytes_per_token": round(measured + max(forward, backward)),
           "plan_layer_bytes_per_token": plan_saved + plan_transient,
           "plan_over_measured_layer": round((plan_saved + plan_transient) / (measured + max(forward, backward)), 4)}
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
