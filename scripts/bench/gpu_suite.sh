#!/usr/bin/env bash
# Every GPU benchmark in one command, about 10 minutes on one H100; results in docs/bench/*_cuda.json and one
# markdown page, docs/bench/gpu_suite_cuda.md.
#
#   bash scripts/bench/gpu_suite.sh                            # on the GPU machine (after scripts/setup.sh)
#   bash scripts/bench/gpu_suite.sh --device cpu --smoke       # tiny shapes, about a minute: checks the plumbing
#   bash scripts/bench/gpu_suite.sh --only long,recipe         # some stages (then the page covers what is there)
#   bash scripts/bench/gpu_suite.sh --total-s 540              # the whole suite inside 540 s: later stages get
#                                                              # what is left, a stage with under 20 s is skipped
#
# Stages, each a script in scripts/bench/ with its own docstring:
#   loss    bench_loss.py          our chunked span loss vs full logits vs TRL's fused head, 4k/16k/32k tokens
#   layer   bench_layer.py         what one decoder layer keeps for backward per token vs the plan's formula
#   train   bench_train.py         tear vs stock vs stock-best (TRL packing + padding-free, activation offloading,
#                                  Liger if installed), seq 2048 x micro-batch 1/4/8, 2 warm-up + 10 timed steps,
#                                  each arm in a fresh process: median and min-max step time
#   switches bench_train.py        our switches one at a time (tear-offload, tear-fused-adamw, tear-liger,
#                                  tear-dropout0) at micro-batch 8 / 1, against the train stage's `tear` rows
#   recipe  bench_recipe.py        recipes/qwen3-1.7b-base.yaml for 20 steps, padded and packed (data.packing)
#   long    bench_long_context.py  micro-batch 1 at 8k/16k/32k, all 28 layers, vs `tear-lora plan`
#   multi   bench_distributed.py   DDP and FSDP per-rank memory under torchrun, only with 2+ GPUs
# then gpu_suite_table.py writes the page. There is no model hub on a benchmark machine: random weights in
# Qwen3-1.7B-Base's exact shape (bench_train.build_model_dir) stand in for the model everywhere.
#
# A failing stage is recorded (suite_<device>.json, the page) and the rest still run: one broken benchmark
# should not cost the whole GPU slot. Each stage has a time limit so that one hang cannot either. --smoke
# writes to a temporary directory (or --out), never to docs/bench: its numbers describe nothing.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
DEVICE=cuda
SMOKE=0
OUT=""
ONLY="loss,train,switches"  # fits one 10-minute call; layer,recipe,long,multi were measured in the last round
TOTAL_S=""
PY="${PYTHON:-$(command -v python || command -v python3)}"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --total-s) TOTAL_S="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$OUT" ]; then
    if [ "$SMOKE" = 1 ]; then OUT="$(mktemp -d -t gpu_suite_smoke.XXXXXX)"; else OUT="$REPO/docs/bench"; fi
fi
mkdir -p "$OUT"
MODELS="${BENCH_MODEL_ROOT:-${TMPDIR:-/tmp}/tear_lora_bench_models}"
[ "$SMOKE" = 1 ] && MODELS="$OUT/models"  # hermetic: a smoke run never reuses (or leaves) a real-size model
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
SUITE_START=$SECONDS
STARTED=$(date -u +%Y-%m-%dT%H:%MZ)
STAGES_JSON=""

# Per-stage arguments: the real shapes, or tiny ones for --smoke.
if [ "$SMOKE" = 1 ]; then
    SHAPE=tiny
    LOSS_ARGS=(--tokens 64 --impl chunked --vocab 1000 --hidden 32 --dtype float32)
    LAYER_ARGS=(--shape tiny --tokens 32)
    TRAIN_ARGS=(--shape tiny --seq 64 --micro-batch 1 --steps 3 --warmup 2 --trainers tear,stock,stock-best)
    SWITCH_ARGS=(--shape tiny --seq 64 --micro-batch 1 --steps 2 --warmup 1 --trainers tear-fused-adamw)
    RECIPE_ARGS=(--shape tiny --steps 1 --set data.max_seq_len=256 --set training.per_device_train_batch_size=2
                 --set training.gradient_accumulation_steps=1)
    LONG_ARGS=(--shape tiny --seq 256)
    LIMIT_S=600
else
    SHAPE=qwen3-1.7b
    # naive at 32k tokens would need ~60 GB of logits: skipped by --max-gb, its size is a known linear fit
    LOSS_ARGS=(--tokens 4096 --tokens 16384 --tokens 32768 --max-gb 40 --chunk 256 --impl chunked --impl chunked_recompute
               --impl trl_fused)
    LAYER_ARGS=(--shape qwen3-1.7b --tokens 2048)
    TRAIN_ARGS=(--shape qwen3-1.7b --seq 2048 --micro-batch 1,4,8 --steps 12 --warmup 2
                --trainers tear,stock,stock-best)
    SWITCH_ARGS=(--shape qwen3-1.7b --seq 2048 --micro-batch 8 --steps 12 --warmup 2
                 --trainers tear-offload,tear-fused-adamw,tear-liger,tear-dropout0)
    RECIPE_ARGS=(--shape qwen3-1.7b --steps 20)
    LONG_ARGS=(--shape qwen3-1.7b --seq 8192,16384,32768)
    LIMIT_S=""
fi

wants() { [[ ",$ONLY," == *",$1,"* ]]; }

# run_stage NAME LIMIT_SECONDS COMMAND...: runs it under a time limit, logs to $OUT/<name>_<device>.log, records
# status and seconds for suite_<device>.json.
run_stage() {
    local name="$1" limit="${LIMIT_S:-$2}"; shift 2
    local start=$SECONDS status log="$OUT/${name}_${DEVICE}.log"
    if [ -n "$TOTAL_S" ]; then  # a lent GPU has a fixed slot: keep 15 s for the page and the JSON
        local left=$((TOTAL_S - (SECONDS - SUITE_START) - 15))
        if [ "$left" -lt 20 ]; then
            echo "== $name: skipped (${left} s left of --total-s $TOTAL_S)"
            STAGES_JSON="${STAGES_JSON:+$STAGES_JSON,}{\"stage\": \"$name\", \"status\": \"skipped (no time left)\", \"seconds\": 0}"
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "== $name (limit ${limit} s): $*"
    if timeout --kill-after 10 "$limit" "$@" >"$log" 2>&1; then
        status=ok
    else
        local rc=$?
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out after ${limit} s"; else status="failed (exit $rc)"; fi
        echo "   $name $status; last lines of $log:"; tail -n 5 "$log" | sed 's/^/   | /'
    fi
    echo "   $name: $status in $((SECONDS - start)) s (suite: $((SECONDS - SUITE_START)) s)"
    STAGES_JSON="${STAGES_JSON:+$STAGES_JSON,}{\"stage\": \"$name\", \"status\": \"$status\", \"seconds\": $((SECONDS - start))}"
}

# The random-weight model is written once (about a minute of CPU for the full shape) while the loss stage keeps
# the GPU busy; later stages wait for it.
PREBUILD_PID=""
if wants train || wants recipe || wants long; then
    "$PY" -c "import sys; sys.path.insert(0, 'scripts/bench'); from pathlib import Path; from bench_train import \
build_model_dir; build_model_dir('$SHAPE', None, Path('$MODELS'))" >"$OUT/model_${DEVICE}.log" 2>&1 &
    PREBUILD_PID=$!
fi
wait_for_model() {
    if [ -n "$PREBUILD_PID" ]; then
        wait "$PREBUILD_PID" || echo "   building the random-weight model failed: see $OUT/model_${DEVICE}.log"
        PREBUILD_PID=""
    fi
}

if wants loss; then
    run_stage loss 70 "$PY" scripts/bench/bench_loss.py --device "$DEVICE" "${LOSS_ARGS[@]}" \
        --json "$OUT/loss_${DEVICE}.json"
fi
if wants layer; then  # a one-layer model of its own: small, built by the stage itself
    run_stage layer 90 "$PY" scripts/bench/bench_layer.py --device "$DEVICE" "${LAYER_ARGS[@]}" --model-root "$MODELS" \
        --json "$OUT/layer_${DEVICE}.json"
fi
wait_for_model
if wants train; then
    run_stage train 330 "$PY" scripts/bench/bench_train.py --device "$DEVICE" "${TRAIN_ARGS[@]}" \
        --model-root "$MODELS" --json "$OUT/train_qwen3-1.7b_seq2048_${DEVICE}.json"
fi
if wants switches; then
    run_stage switches 160 "$PY" scripts/bench/bench_train.py --device "$DEVICE" "${SWITCH_ARGS[@]}" \
        --model-root "$MODELS" --json "$OUT/switches_qwen3-1.7b_seq2048_${DEVICE}.json"
fi
if wants recipe; then
    run_stage recipe 120 "$PY" scripts/bench/bench_recipe.py --device "$DEVICE" "${RECIPE_ARGS[@]}" --modes padded,packed \
        --model-root "$MODELS" --json "$OUT/recipe_qwen3-1.7b-base_${DEVICE}.json"
fi
if wants long; then
    run_stage long 120 "$PY" scripts/bench/bench_long_context.py --device "$DEVICE" "${LONG_ARGS[@]}" \
        --model-root "$MODELS" --json "$OUT/long_context_${DEVICE}.json"
fi
if wants multi; then
    GPUS=0
    if [ "$DEVICE" = cuda ]; then GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0); fi
    if [ "$GPUS" -ge 2 ]; then
        run_stage multi 200 torchrun --standalone --nproc_per_node 2 scripts/bench/bench_distributed.py --seq 2048 \
            --micro-batch 4 --optim paged_adamw_8bit --model-root "$MODELS" --json "$OUT/distributed_${DEVICE}.json"
    else
        echo "== multi: skipped ($GPUS GPUs; needs 2)"
        STAGES_JSON="${STAGES_JSON:+$STAGES_JSON,}{\"stage\": \"multi\", \"status\": \"skipped ($GPUS GPUs)\", \"seconds\": 0}"
    fi
fi
wait_for_model

MACHINE=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    2>/dev/null || echo unknown)
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]; then COMMIT="$COMMIT+uncommitted"; fi
cat >"$OUT/suite_${DEVICE}.json" <<EOF
{"machine": "$MACHINE", "commit": "$COMMIT", "started": "$STARTED",
 "smoke": $([ "$SMOKE" = 1 ] && echo true || echo false), "seconds": $((SECONDS - SUITE_START)), "stages": [$STAGES_JSON]}
EOF
"$PY" scripts/bench/gpu_suite_table.py --dir "$OUT" --device "$DEVICE"
echo "suite done in $((SECONDS - SUITE_START)) s; results in $OUT"
# exit status: 0 when every stage that ran succeeded, 1 otherwise (the page and JSON are written either way)
[[ "$STAGES_JSON" != *'"failed'* && "$STAGES_JSON" != *'"timed out'* ]]
