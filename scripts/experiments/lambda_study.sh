#!/usr/bin/env bash
# The λ study: does weighting the witness loss make the model's consequence predictions depend on what was said?
# Demo model (SmolLM2-135M, 4-bit, CPU), recipes/demo-cpu.yaml; docs/experiments/lambda.md has the method and results.
#
# ROUND=3 (default; issue 29): crossed quadruples and the rule fixed in advance (docs/experiments/round3_rule.md).
#   arms: λ 0, λ 1 on data/raw/quad_train.jsonl (16 families), λ 1 on the same triples with witnesses shuffled
#   within their family (scripts/experiments/shuffle_witnesses.py), SEEDS (42 7 1), EPOCHS (1), each sweep's eval
#   on the held-out families (the sweep tables give held-out NLL per span); the base
#   `tear-lora analyze --report $OUT/lambda_study_r3` on the 8 held-out families of data/raw/quad_eval.jsonl (the
#   rule's data), then `--report $OUT/lambda_study_r3_in_family` on its 16 training families; about 3 h on 2 CPU
#   cores, measured in docs/experiments/lambda.md ("Round-3 results")
# ROUND=2 (issue 24): instruments that can fail.
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
ROUND="${ROUND:-3}"
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
from tear_lora.study.study_report import study_tables
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

if [ "$ROUND" = 3 ]; then
  NAME="${NAME:-lambda-study-r3}"
  SEEDS="${SEEDS:-42 7 1}"
  EPOCHS="${EPOCHS:-1}"
  QUAD_TRAIN="${QUAD_TRAIN:-data/raw/quad_train.jsonl}"
  QUAD_EVAL="${QUAD_EVAL:-data/raw/quad_eval.jsonl}"
  HOLD_OUT="${HOLD_OUT:-$(python -c 'import json, sys; print(",".join(json.load(open(sys.argv[1]))["held_out"]))' \
    "${QUAD_MANIFEST:-data/raw/quad_manifest.json}")}"
  SPLIT="data/processed/splits/quad-r3"
  SHUFFLED="data/processed/quad_train.shuffled.jsonl"
  echo "== held-out families: $HOLD_OUT -> $SPLIT; shuffled-witness training file -> $SHUFFLED"
  tear-lora split-domains "$QUAD_EVAL" --hold-out "$HOLD_OUT" --out "$SPLIT" --overwrite
  stem="$(basename "$QUAD_EVAL" .jsonl)"
  python scripts/experiments/shuffle_witnesses.py "$QUAD_TRAIN" "$SHUFFLED" --seed 0
  for seed in $SEEDS; do
    for arm in plain shuffled; do
      train="$QUAD_TRAIN"; lambdas=0,1
      [ "$arm" = shuffled ] && train="$SHUFFLED" && lambdas=1
      echo "== $arm, seed $seed, lambda $lambdas, $EPOCHS epoch(s) on $train"
      nice -n 10 tear-lora sweep "$RECIPE" --lambdas "$lambdas" --set training.seed="$seed" "${steps[@]}" \
        --set training.num_train_epochs="$EPOCHS" --set data.train_file="$train" \
        --set data.eval_file="$SPLIT/$stem.out.jsonl" --set output.run_name="$NAME-$arm-seed$seed" \
        --plot "adapters/$NAME-$arm-seed$seed-sweep.png" > "adapters/$NAME-$arm-seed$seed-sweep.txt"
    done
  done
  mapfile -t runs < <(ls -d adapters/"$NAME"-plain-seed*-lambda* adapters/"$NAME"-shuffled-seed*-lambda*)
  # two calls, the rule's data first: the in-family file is three times as long and only reported, so a study
  # cut short still has what the rule decides on (each call loads the base once); the tables print here and are
  # kept once, as analyze.txt in each report dir
  echo "== analyze (one base, every adapter): the held-out families (the rule's data)"
  nice -n 10 tear-lora analyze "${runs[@]}" --data "$SPLIT/$stem.out.jsonl" \
    --report "$OUT/lambda_study_r3" --overwrite
  echo "== analyze: the 16 training families (reported, not decided on)"
  nice -n 10 tear-lora analyze "${runs[@]}" --data "$SPLIT/$stem.in.jsonl" \
    --report "$OUT/lambda_study_r3_in_family" --overwrite
  echo "study finished in $((SECONDS - started)) s; tables: $OUT/lambda_study_r3/tables.md"
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
