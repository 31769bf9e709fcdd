"""`tear-lora plan`: peak GPU memory of a recipe, estimated from the model config before anything loads.

Why a formula instead of a trial run: a run that does not fit dies minutes in (after the download and the
4-bit load), and the user learns nothing about which knob to turn. The estimate is the sum of what is alive
at the step's worst moment, term by term, so the report says where the memory goes. The per-token activation
terms were checked against saved-tensor counts of a real Qwen3-1.7B-shaped 4-bit LoRA layer (within ~3%;
scripts/bench/bench_layer.py) and the whole estimate against measured training runs up to 32k tokens
(docs/performance.md).

The decoder layer's linears (LoRA target names, widths) come from the model itself, built from the config on the
meta device (shape.py); the per-token activation terms assume a Llama-shaped layer at the config's widths (see
layer_bytes_per_token for what that approximates in other families).

The config comes from a local model dir, the HF cache, a copy shipped in `tear_lora/configs/` for known bases
(checked before the network: a plan must work offline, and an unreachable hub costs ~30 s of retries), or
the hub.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tear_lora.recipe import Recipe
from tear_lora.rundir import read_json

from .shape import PlanError, Shape, TargetModulesError

GIB = 2**30
SHIPPED_CONFIGS = Path(__file__).parent.parent / "configs"
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context + cuBLAS/bnb workspaces: outside torch's allocator counters
ALLOCATOR_SLACK = 0.10  # reserved beyond allocated (fragmentation of the caching allocator)
N_STRUCTURAL_TOKENS = 6
MAX_MICRO_BATCH = 1024


@dataclass
class Plan:
    micro_batch: int
    seq_len: int
    components: dict[str, int]  # bytes alive at the peak, by what holds them
    phase: str  # the moment of the step the peak happens in
    peak_allocated: int  # what torch.cuda.max_memory_allocated() would read
    card_bytes: int  # + allocator slack + CUDA context: what the card must hold
    gpu_bytes: int
    max_micro_batch: int  # largest micro-batch that fits at this seq_len (0: not even 1)
    source: str  # where the model config came from
    notes: list[str] = field(default_factory=list)
    nproc: int = 1  # processes the peak is per: 1, or each rank of a DDP / FSDP run
    sharding: str = "none"  # "none" (one process), "ddp" (every rank holds the whole model), "fsdp"

    @property
    def fits(self) -> bool:
        return self.card_bytes <= self.gpu_bytes

    @property
    def margin_bytes(self) -> int:
        return self.gpu_bytes - self.card_bytes

    def to_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits, "margin_bytes": self.margin_bytes}


def load_model_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """(config dict, where it came from): local dir, HF cache, shipped copy, then the hub."""
    local = Path(name_or_path) / "config.json"
    if local.is_file():
        return read_json(local), str(local)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                            local_files_only=True)
        return config.to_dict(), f"{name_or_path} (HF cache)"
    except (OSError, ValueError):
        pass
    shipped = SHIPPED_CONFIGS / f"{name_or_path.rstrip('/').split('/')[-1]}.json"
    if shipped.is_file():
        return read_json(shipped), f"{name_or_path} (copy shipped with tear_lora: {shipped.name})"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
            return config.to_dict(), f"{name_or_path} (hub)"
        except (OSError, ValueError):
            pass
    raise PlanError(f"no config.json for '{name_or_path}' (model.name_or_path): not a local dir, not cached, "
                    f"not shipped in {SHIPPED_CONFIGS}, hub unreachable")


def _sizes(recipe: Recipe, shape: Shape) -> dict[str, float]:
    """Bytes per element of each kind of tensor, and the parameter counts that do not depend on the batch."""
    m, training = recipe.model, recipe.training
    half = {"bfloat16": 2, "float16": 2, "float32": 4}
    weight = 4 if m.upcast_to_fp32 else half[m.dtype]  # embeddings, norms (never quantized)
    act = 2 if training.get("bf16") or training.get("fp16") else half[m.dtype]
    if m.load_in_4bit and act == 4 and half[m.compute_dtype] == 2 and not m.upcast_to_fp32:
        act = 2  # bf16 hidden states, no autocast: the 4-bit matmuls still return the compute dtype
    linears = shape.linears()
    targets = {name: linears[name] for name in shape.lora_targets(recipe.lora.target_modules)}
    trainable = 4  # fp32: PEFT's default, which TearTrainer keeps (TRL alone would cast them to bf16 on 4-bit bases)
    optim = str(training.get("optim", "adamw_torch"))
    states = 2 if "8bit" in optim else trainable / 4 if "adafactor" in optim else 0 if optim == "sgd" else 2 * trainable
    return {"weight": weight, "act": act, "trainable": trainable, "optimizer": states,
            "linear_params": shape.layers * sum(i * o for i, o in linears.values()),
            "lora_params": shape.layers * recipe.lora.r * sum(i + o for i, o in targets.values()),
            "row_params": N_STRUCTURAL_TOKENS * shape.hidden * (1 if shape.tied else 2)}


def layer_bytes_per_token(shape: Shape, act: int, dropout: float, lora_on: set[str],
                          kv_repeated: bool = True) -> tuple[int, int]:
    """(saved for backward, transient on top) per token of one decoder layer, recomputed under checkpointing.

    Saved: both RMSNorms' fp32 inputs, q/k-norm fp32 inputs (Qwen3), SDPA's q, k, v, out, with k/v repeated to
    all heads when `kv_repeated` (transformers repeats them whenever it passes SDPA a mask; without one SDPA does
    grouped-query attention itself), the MLP's gate, up and SiLU outputs, and per LoRA module its input (a
    dropout copy and mask each when dropout > 0; the 4-bit base saves none).
    Transient: the larger of what the layer's recomputed forward and its backward hold beyond the saved tensors.
    The forward's peak is in the MLP: an intermediate-width tensor, and with LoRA dropout also the SiLU product
    (down_proj's input, which only its dropout copy outlives) and two hidden-width ones (PEFT's clone of the 4-bit
    output, the LoRA sum). The backward's is the MLP and hidden-width gradients. Measured on one Qwen3-1.7B-shaped
    layer at 4096 tokens (scripts/bench/bench_layer.py): forward 32.7 KB/token with dropout 0.05 and 12.3 KB
    without, backward 24.5 KB; counting only the backward's left the long-context slope 7% under the measured one.
    `lora_on`: names from `shape.linears()`. The LoRA inputs are the model's own (widths, and which linears share an
    input: shape.input_groups); the rest is a Llama-shaped layer at the config's widths, which for other families
    approximates: a non-gated MLP (GPT-NeoX, Phi: fc1 -> GELU -> fc2) saves one intermediate-width tensor less than
    the three counted, LayerNorm saves its statistics too, and partial rotary (GPT-NeoX) is counted whole.
    """
    h, q, i = shape.hidden, shape.heads * shape.head_dim, shape.intermediate
    kv = shape.kv_heads * shape.head_dim
    saved = 2 * 4 * h + 2 * (q + (q if kv_repeated else kv)) * act + 3 * i * act
    if shape.model_type.startswith("qwen3"):
        saved += 4 * (q + kv)
    inputs = {name: in_features for name, (in_features, _) in shape.layer_linears.items()}
    if dropout > 0:
        saved += sum((act + 1) * inputs[name] for name in lora_on)
    else:  # one saved input per distinct input tensor
        saved += sum(act * inputs[g[0]] for g in shape.input_groups if lora_on & set(g))
    forward = i + (i + 2 * h if dropout > 0 else 0)
    return saved, max(forward, i + 3 * h) * act


def attention_mask_bytes(recipe: Recipe, micro_batch: int, seq_len: int, act: int) -> int:
    """The [micro_batch, 1, T, T] attention mask the model builds once per forward, 0 when it builds none. It is
    alive for the whole step: every checkpointed layer keeps it as an input.

    transformers 5 (masking_utils.sdpa_mask) skips the mask when nothing is masked beyond causality, and SDPA then
    runs with `is_causal` (and grouped-query attention natively). One row is never padded (the collator pads to
    the longest row of the batch), so micro-batch 1 has no mask; with several rows the shorter ones are padded
    (the estimate takes the worst case), and packed rows (data.packing) need the block-diagonal one. Eager
    attention always builds one, in the activation dtype; flash attention never does. Quadratic in seq_len: at
    32k tokens a bool mask is 1 GiB per row.
    """
    attn = recipe.model.attn_implementation or "sdpa"
    if "flash" in attn:
        return 0
    if attn == "eager":
        return micro_batch * seq_len * seq_len * act
    return micro_batch * seq_len * seq_len if micro_batch > 1 or recipe.data.packing else 0


TRL_OFFLOAD_STASH = 5  # trl OffloadActivations' max_fwd_stash_size: saved tensors kept on the GPU while copying


def offloaded_layers(recipe: Recipe, layers: int) -> int:
    """How many layers' checkpointed inputs are on the GPU at once. All of them without offloading; with TRL's
    `training.activation_offloading` the forward stash (up to 5 tensors, taken as 5 layers: an upper bound); with
    transformers' `activation_checkpointing_kwargs.offload` (synchronous copies) the one being copied. Not yet
    checked against a GPU measurement (docs/performance.md, round 3)."""
    training = recipe.training
    if training.get("activation_offloading"):
        return min(layers, TRL_OFFLOAD_STASH)
    if (training.get("activation_checkpointing_kwargs") or {}).get("offload"):
        return min(layers, 1)
    return layers


def estimate(recipe: Recipe, shape: Shape, micro_batch: int, seq_len: int,
             nproc: int = 1) -> tuple[dict[str, int], str, int]:
    """(components, peak phase, peak allocated bytes) for one training step at this micro-batch and length, per
    process when `nproc` processes train together.

    DDP (the default with several processes): every rank holds the whole model, plus gradient buckets the size of
    the trainable gradients. FSDP (`distributed.fsdp`, distributed.shard_fsdp): each rank keeps 1/nproc of every
    weight, LoRA matrix and optimizer state; a decoder layer is whole only while it runs (plus the next one,
    prefetched), and the root unit (output layer and tag rows; the embedding too when tied) is whole for the entire
    step, because the span loss reads the output layer after the forward: it counts once whole, once as a shard.
    """
    s = _sizes(recipe, shape)
    m, tokens, h, v = recipe.model, micro_batch * seq_len, shape.hidden, shape.vocab
    act = s["act"]
    fsdp = recipe.distributed.fsdp and nproc > 1
    share = 1 / nproc if fsdp else 1
    linear_bytes = s["linear_params"] * (0.5 if m.load_in_4bit else s["weight"])
    quant_bytes = s["linear_params"] * ((1 / 64 + 4 / (64 * 256)) if m.double_quant else 4 / 64) if m.load_in_4bit else 0
    matrix = v * h * s["weight"]  # the input embedding; an untied output layer is another one
    trainable_bytes = (s["lora_params"] + s["row_params"]) * (2 * s["trainable"] + s["optimizer"])
    mask = attention_mask_bytes(recipe, micro_batch, seq_len, act)
    static = {
        "base linear weights (4-bit)" if m.load_in_4bit else "base linear weights": linear_bytes * share,
        "quantization state": quant_bytes * share,
        # under FSDP the root holding the output layer is whole all step; an untied input embedding is a unit
        # of its own, whole only while it runs
        "embeddings (tied)" if shape.tied else "embeddings + output layer": matrix * (
            (1 + share) if shape.tied else (share + 1 + share)) if fsdp else matrix * (1 if shape.tied else 2),
        "norms": (shape.layers * (2 * h + 2 * shape.head_dim) + h) * s["weight"] * share,
        "LoRA + token rows: weights, grads, optimizer": trainable_bytes * share,
        "checkpointed layer inputs": offloaded_layers(recipe, shape.layers) * tokens * h * act + mask
        + tokens * shape.head_dim * 2 * 4,  # + the attention mask (if any), rotary cos/sin
    }
    if fsdp:
        static["FSDP: two decoder layers whole (running + prefetched)"] = 2 * (linear_bytes + quant_bytes) / shape.layers
    elif nproc > 1:
        static["DDP gradient buckets"] = (s["lora_params"] + s["row_params"]) * s["trainable"]
    lora_on = shape.lora_targets(recipe.lora.target_modules)
    saved, transient = layer_bytes_per_token(shape, act, recipe.lora.dropout, lora_on, kv_repeated=mask > 0)
    max_linear = max(i * o for i, o in shape.linears().values())
    chunk = min(recipe.objective.loss_chunk_size, tokens)
    phases = {
        "backward through a layer": {
            "one layer recomputed (activations + gradients)": tokens * (saved + transient) + max_linear * act,
            "hidden-state gradients": tokens * h * 4,
        },
        "loss": {
            "final hidden states + final norm": tokens * h * (2 * act + 4),
            "loss chunk (logits + fp32 softmax)": chunk * v * (4 + (act if act != 4 else 0)) + tokens * h * act,
        },
    }
    if fsdp:
        # Unsharding a unit takes twice its size while the gathered buffer is copied out (measured alone on gloo:
        # 1.16 GiB to unshard a 0.58 GiB embedding); for the root that happens at the start of the forward.
        phases["forward: unsharding the root"] = {"FSDP: gather copy of the root's matrix": matrix}
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    phase = max(totals, key=totals.get)
    components = {k: int(b) for k, b in {**static, **phases[phase]}.items() if b}
    return components, phase, sum(components.values())


def card_bytes(peak_allocated: int) -> int:
    return int(peak_allocated * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES


def plan(recipe: Recipe, config: dict | None = None, source: str = "given config",
         gpu_memory_gb: float | None = None, nproc: int = 1) -> Plan:
    """Estimate the recipe's peak at its micro-batch and max_seq_len, and the largest micro-batch that fits;
    per rank when `nproc` processes train together (DDP, or FSDP with `distributed.fsdp`)."""
    if nproc < 1:
        raise PlanError(f"--nproc must be at least 1 (got {nproc})")
    if config is None:
        config, source = load_model_config(recipe.model.name_or_path, recipe.model.revision,
                                           recipe.model.trust_remote_code)
    shape = Shape.from_config(config, recipe.model.trust_remote_code)
    micro_batch = int(recipe.training.get("per_device_train_batch_size", 8))
    seq_len = recipe.data.max_seq_len
    gpu = int((gpu_memory_gb or recipe.hardware.gpu_memory_gb) * GIB)
    components, phase, peak = estimate(recipe, shape, micro_batch, seq_len, nproc)
    best = 0
    while best < MAX_MICRO_BATCH and card_bytes(estimate(recipe, shape, best + 1, seq_len, nproc)[2]) <= gpu:
        best += 1
    notes = [f"seq_len = data.max_seq_len = {seq_len} (data.packing: packed rows are nearly that long)"
             if recipe.data.packing else
             f"seq_len = data.max_seq_len = {seq_len} (the worst case: batches pad to their longest row)"]
    on = shape.lora_targets(recipe.lora.target_modules)
    notes.append(f"LoRA on {len(on)} of the {len(shape.layer_linears)} linears of each {shape.model_type} decoder "
                 f"layer: {', '.join(n for n in shape.layer_linears if n in on)}")
    sharding = "none" if nproc == 1 else "fsdp" if recipe.distributed.fsdp else "ddp"
    if sharding == "fsdp":
        notes.append("FSDP: each rank first loads the whole 4-bit base, then shards it; that load-time peak is "
                     f"{(components.get('base linear weights (4-bit)', 0) * nproc) / GIB:.2f} GiB of linear weights")
    elif sharding == "ddp" and recipe.model.load_in_4bit:
        notes.append("DDP: every rank holds the whole model; set distributed.fsdp: true to shard it")
    if shape.vocab > 2**16 and recipe.objective.loss_chunk_size > 4096:
        notes.append("objective.loss_chunk_size above 4096 buys little speed for a lot of memory")
    if recipe.model.attn_implementation == "eager":
        notes.append("eager attention also keeps [micro-batch, heads, T, T] attention weights per layer in backward, "
                     "which this estimate leaves out (quadratic in seq_len); sdpa or flash_attention_2 do not")
    return Plan(micro_batch, seq_len, components, phase, peak, card_bytes(peak), gpu, best, source, notes, nproc,
                sharding)


def format_plan(p: Plan, recipe: Recipe) -> str:
    gib = lambda b: f"{b / GIB:6.2f} GiB"  # noqa: E731
    per = "" if p.nproc == 1 else f", per rank of {p.nproc} ({p.sharding.upper()})"
    lines = [f"memory plan for {recipe.source or 'recipe'}: micro-batch {p.micro_batch} x {p.seq_len} tokens{per}, "
             f"model config from {p.source}"]
    lines += [f"  {gib(b)}  {name}" for name, b in p.components.items()]
    lines.append(f"  {gib(p.peak_allocated)}  = peak allocated (during: {p.phase})")
    lines.append(f"  {gib(p.card_bytes)}  with {ALLOCATOR_SLACK:.0%} allocator slack + "
                 f"{CUDA_CONTEXT_BYTES / GIB:.1f} GiB CUDA context ({p.card_bytes / 1e9:.2f} GB)")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"{verdict} hardware.gpu_memory_gb = {p.gpu_bytes / GIB:g} GiB: margin {p.margin_bytes / GIB:+.2f} GiB;"
                 f" largest micro-batch that fits at {p.seq_len} tokens: {p.max_micro_batch}")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def check_memory(recipe: Recipe, force: bool = False, cuda: bool | None = None, quiet: bool = False,
                 nproc: int = 1) -> Plan | None:
    """Print the plan (unless `quiet`: the other ranks of a launcher run); when training would run on CUDA,
    refuse a recipe that does not fit unless forced. A model the plan cannot build only skips the plan; LoRA target
    names the model lacks are refused."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    try:
        p = plan(recipe, nproc=nproc)
    except TargetModulesError:
        raise  # a recipe error, not a missing plan
    except PlanError as e:
        if not quiet:
            print(f"warning: memory plan skipped: {e}", flush=True)
        return None
    if not quiet:
        print(format_plan(p, recipe), flush=True)
    if not cuda:
        if not quiet:
            print("note: training on CPU: the plan above is for the recipe's GPU, not enforced here", flush=True)
    elif not p.fits and not force:
        fix = (f"--set training.per_device_train_batch_size={p.max_micro_batch} (raise gradient_accumulation_steps "
               "to keep the effective batch)" if p.max_micro_batch else "a shorter data.max_seq_len or a bigger GPU")
        if recipe.distributed.fsdp and nproc == 1:
            fix = f"launching it on several GPUs (`tear-lora plan {recipe.source or 'RECIPE'} --nproc 2`), or {fix}"
        raise PlanError(f"{recipe.source or 'recipe'}: estimated {p.card_bytes / GIB:.1f} GiB does not fit "
                        f"hardware.gpu_memory_gb = {p.gpu_bytes / GIB:g} GiB; try {fix}, or pass --force")
    return p
