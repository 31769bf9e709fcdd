#!/usr/bin/env bash
# The λ study: does weighting the witness loss make the model's consequence predictions depend on what was said?
# Demo model (SmolLM2-135M, 4-bit, CPU), recipes/demo-cpu.yaml; docs/experiments/lambda.md has the method and results.
#
# ROUND=2 (default; issue 24): instruments that can fail.
#   `tear-lora split-domains` holds out HOLD_OUT (default code,relationships) from every bundled file
#   λ ∈ LAMBDAS (0,1,2) × SEEDS (42 7 1), plain objective, trained on the left-in domains only
#   `tear-lora analyze` on all of them + the base, with the words-only controls, on: the minimal pairs (all
#   domains), the contrast pairs (all domains), and the held-out domains of eval, contrast and minimal pairs
#   `tear-lora eval` (held-out NLL per span) on the held-out domains' eval rows
#   writes $OUT/lambda_study_r2*.{json,txt,md,png}
# ROUND=1 (issue 10): λ ∈ {0, 0.5, 1, 2} × seeds {42, 7} on every domain, plus "witness without imitation" (λ = 1,
#   seed 42, response_weight harmful 0 / mixed 0.5); analyze on eval.jsonl and contrast.jsonl; $OUT/lambda_study*.
#
# Resumable: every arm goes through `tear-lora sweep`, which skips finished runs and resumes checkpoints; the split
# is rewritten identically each time. Not in CI. Round 1 took 1 h 45 min on 2 CPU cores (9 trainings of ~5 min).
#   bash scripts/experiments/lambda_study.sh
# Smoke run (every arm and instrument end to end in minutes, numbers meaningless): the tiny model, 2 steps, one seed
#   SETUP=0 RECIPE=recipes/tiny-cpu.yaml MAX_STEPS=2 SEEDS=42 NAME=lambda-smoke OUT=adapters/lambda-smoke \
#     bash scripts/experiments/lambda_study.sh
# On a GPU, for Qwen3-1.7B-Base: RECIPE=recipes/qwen3-1.7b-base.yaml bash scripts/experiments/lambda_study.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "${SETUP:-1}" = 1 ] && bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ROUND="${ROUND:-2}"
RECIPE="${RECIPE:-recipes/demo-cpu.yaml}"
OUT="${OUT:-docs/experiments}"
MAX_STEPS="${MAX_STEPS:-}"  # empty: the recipe's own length
started=$SECONDS
case "$RECIPE" in
  recipes/demo-cpu.yaml) python scripts/make_demo_model.py ;;
  recipes/tiny-cpu.yaml) [ -d models/tiny-qwen3 ] || python scripts/make_tiny_model.py ;;
esac
steps=()
[ -n "$MAX_STEPS" ] && steps=(--set training.max_steps="$MAX_STEPS" --set training.save_steps="$MAX_STEPS")
mkdir -p "$OUT" adapters

report() {  # $1 = analyze JSON, $2 = output prefix: the text tables and the markdown study tables
  python - "$1" <<'PY' | tee "$2.txt"
import json, sys
from tear_lora.study.analyze_report import format_analysis
print(format_analysis(json.load(open(sys.argv[1]))))
PY
  python - "$1" > "$2_tables.md" <<'PY'
import json, sys
from tear_lora.study.analyze_report import study_tables
print(study_tables(json.load(open(sys.argv[1]))))
PY
}

if [ "$ROUND" = 1 ]; then
  NAME="${NAME:-lambda-study}"
  LAMBDAS="${LAMBDAS:-0,0.5,1,2}"
  SEEDS="${SEEDS:-42 7}"
  for seed in $SEEDS; do
    echo "== plain objective, seed $seed, lambda $LAMBDAS"
    tear-lora sweep "$RECIPE" --lambdas "$LAMBDAS" --set training.seed="$seed" "${steps[@]}" \
      --set output.run_name="$NAME-seed$seed" --plot "adapters/$NAME-seed$seed-sweep.png" > "adapters/$NAME-seed$seed-sweep.txt"
  done
  first_seed="${SEEDS%% *}"
  echo "== witness without imitation: lambda 1, seed $first_seed, response_weight {harmful: 0, mixed: 0.5}"
  tear-lora sweep "$RECIPE" --lambdas 1 --set training.seed="$first_seed" "${steps[@]}" \
    --set "objective.response_weight={harmful: 0.0, mixed: 0.5}" \
    --set output.run_name="$NAME-witness-only-seed$first_seed" --plot "adapters/$NAME-witness-only-sweep.png" > "adapters/$NAME-witness-only-sweep.txt"
  echo "== analyze (one base, nine adapters) on eval.jsonl and contrast.jsonl"
  mapfile -t runs < <(ls -d adapters/"$NAME"-seed*-lambda* adapters/"$NAME"-witness-only-seed*-lambda*)
  tear-lora analyze "${runs[@]}" --data data/raw/eval.jsonl --data data/raw/contrast.jsonl --json \
    --plot "$OUT/lambda_study.png" > "$OUT/lambda_study.json"
  report "$OUT/lambda_study.json" "$OUT/lambda_study"
  tear-lora eval "${runs[@]}" --data data/raw/eval.jsonl | tee "$OUT/lambda_study_eval.txt"
  echo "study finished in $((SECONDS - started)) s"
  exit 0
fi

NAME="${NAME:-lambda-study-r2}"
LAMBDAS="${LAMBDAS:-0,1,2}"
SEEDS="${SEEDS:-42 7 1}"
HOLD_OUT="${HOLD_OUT:-code,relationships}"
SPLIT="data/processed/splits/${HOLD_OUT//[,\/]/-}"
echo "== leave-domains-out split: holding out $HOLD_OUT -> $SPLIT"
tear-lora split-domains data/raw/consequences.jsonl data/raw/eval.jsonl data/raw/contrast.jsonl \
  data/raw/minimal_pairs.jsonl --hold-out "$HOLD_OUT" --out "$SPLIT" --overwrite
for seed in $SEEDS; do
  echo "== plain objective on the left-in domains, seed $seed, lambda $LAMBDAS"
  tear-lora sweep "$RECIPE" --lambdas "$LAMBDAS" --set training.seed="$seed" "${steps[@]}" \
    --set data.train_file="$SPLIT/consequences.in.jsonl" --set data.eval_file="$SPLIT/eval.in.jsonl" \
    --set output.run_name="$NAME-seed$seed" --plot "adapters/$NAME-seed$seed-sweep.png" > "adapters/$NAME-seed$seed-sweep.txt"
done
echo "== analyze (one base, every adapter) on minimal pairs, contrast pairs and the held-out domains"
mapfile -t runs < <(ls -d adapters/"$NAME"-seed*-lambda*)
tear-lora analyze "${runs[@]}" --data data/raw/minimal_pairs.jsonl --data data/raw/contrast.jsonl \
  --data "$SPLIT/eval.out.jsonl" --data "$SPLIT/contrast.out.jsonl" --data "$SPLIT/minimal_pairs.out.jsonl" \
  --json --plot "$OUT/lambda_study_r2.png" > "$OUT/lambda_study_r2.json"
report "$OUT/lambda_study_r2.json" "$OUT/lambda_study_r2"
tear-lora eval "${runs[@]}" --data "$SPLIT/eval.out.jsonl" | tee "$OUT/lambda_study_r2_eval.txt"
echo "study finished in $((SECONDS - started)) s"
