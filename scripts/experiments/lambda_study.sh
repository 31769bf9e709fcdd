#!/usr/bin/env bash
# The λ study (issue 10): does weighting the witness loss make the model's consequence predictions depend on what
# was said? Demo model (SmolLM2-135M, 4-bit, CPU), recipes/demo-cpu.yaml:
#   λ ∈ {0, 0.5, 1, 2} × seeds {42, 7}            plain objective (response loss on every row)
#   λ = 1, seed 42, response_weight harmful 0, mixed 0.5   the "witness without imitation" arm
# then `tear-lora analyze` on all nine adapters (one shared base) on eval.jsonl and contrast.jsonl, and
# `tear-lora eval` (held-out NLL per span) of the nine.
# Resumable: every arm goes through `tear-lora sweep`, which skips finished runs and resumes checkpoints.
# Not in CI. About 50 min on 2 idle cores (9 × ~4 min of training + ~2 min of sweep comparison each + analyze).
#   bash scripts/experiments/lambda_study.sh            # writes docs/experiments/lambda_study*.{json,txt,md,png}
# On a GPU, for Qwen3-1.7B-Base: RECIPE=recipes/qwen3-1.7b-base.yaml bash scripts/experiments/lambda_study.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RECIPE="${RECIPE:-recipes/demo-cpu.yaml}"
NAME="${NAME:-lambda-study}"
OUT="${OUT:-docs/experiments}"
LAMBDAS="${LAMBDAS:-0,0.5,1,2}"
SEEDS="${SEEDS:-42 7}"
started=$SECONDS
[ "$RECIPE" = recipes/demo-cpu.yaml ] && python scripts/make_demo_model.py

for seed in $SEEDS; do
  echo "== plain objective, seed $seed, lambda $LAMBDAS"
  tear-lora sweep "$RECIPE" --lambdas "$LAMBDAS" --set training.seed="$seed" \
    --set output.run_name="$NAME-seed$seed" --plot "adapters/$NAME-seed$seed-sweep.png" > "adapters/$NAME-seed$seed-sweep.txt"
done
first_seed="${SEEDS%% *}"
echo "== witness without imitation: lambda 1, seed $first_seed, response_weight {harmful: 0, mixed: 0.5}"
tear-lora sweep "$RECIPE" --lambdas 1 --set training.seed="$first_seed" \
  --set "objective.response_weight={harmful: 0.0, mixed: 0.5}" \
  --set output.run_name="$NAME-witness-only-seed$first_seed" --plot "adapters/$NAME-witness-only-sweep.png" > "adapters/$NAME-witness-only-sweep.txt"

echo "== analyze (one base, nine adapters) on eval.jsonl and contrast.jsonl"
mkdir -p "$OUT"
mapfile -t runs < <(ls -d adapters/"$NAME"-seed*-lambda* adapters/"$NAME"-witness-only-seed*-lambda*)
tear-lora analyze "${runs[@]}" --data data/raw/eval.jsonl --data data/raw/contrast.jsonl --json \
  --plot "$OUT/lambda_study.png" > "$OUT/lambda_study.json"
python - "$OUT/lambda_study.json" <<'PY' | tee "$OUT/lambda_study.txt"
import json, sys
from tear_lora.analyze_report import format_analysis
print(format_analysis(json.load(open(sys.argv[1]))))
PY
python - "$OUT/lambda_study.json" > "$OUT/lambda_study_tables.md" <<'PY'
import json, sys
from tear_lora.analyze_report import study_tables
print(study_tables(json.load(open(sys.argv[1]))))
PY
tear-lora eval "${runs[@]}" --data data/raw/eval.jsonl | tee "$OUT/lambda_study_eval.txt"
echo "study finished in $((SECONDS - started)) s"
