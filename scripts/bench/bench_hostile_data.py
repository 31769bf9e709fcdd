"""Peak memory of `tear-lora data prepare` on a large file of hostile rows: the bound of issue 20, measured.

    python scripts/bench/bench_hostile_data.py --json docs/bench/hostile_data_cpu.json          # ~1 GB, 10,000 rows
    python scripts/bench/bench_hostile_data.py --size-mb 50 --hostile 500                         # a quick look

Writes a JSONL file of about `--size-mb` MB: the bundled training triples (they tokenize and are kept) and
`--hostile` rows that each carry one huge field (input, response or witness in turn; every sixth one also lacks
its witness), each far over the per-field bound (data.max_seq_len x the longest token: 32,768 characters for
tiny-cpu). Before the bound, each such row was tokenized whole (+220 bytes per character) and kept verbatim
among the rejects. Then runs `tear-lora data prepare FILE --skip-invalid` in a fresh process, twice: on that file
and on the good rows alone (the baseline), and records each process's peak RSS (wait4's ru_maxrss), wall time
and the rejects file's size. The number a reader wants: peak(hostile) - peak(baseline), against the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_file(path: Path, size_mb: float, hostile: int) -> dict:
    good = (REPO / "data/raw/consequences.jsonl").read_text(encoding="utf-8").splitlines()
    field_chars = max(int(size_mb * 1e6 / max(hostile, 1)) - 200, 1000)
    roles = ("input", "response", "witness")
    with open(path, "w", encoding="utf-8") as f:
        for line in good:
            f.write(line + "\n")
        for i in range(hostile):
            big = roles[i % 3]
            row = {"input": "a question", "response": "an answer", "witness": "what follows", "id": f"h{i}"}
            row[big] = (f"{i} " + "hostile text " * (field_chars // 13 + 1))[:field_chars]
            if i % 6 == 4:  # a huge response and no witness: invalid as well as too long
                del row["witness"]
            f.write(json.dumps(row) + "\n")
    return {"good_rows": len(good), "hostile_rows": hostile, "field_chars": field_chars,
            "file_bytes": path.stat().st_size}


def prepare_peak(raw: Path, out: Path, model: Path, code: Path = REPO) -> dict:
    """Run `data prepare` (of the tear_lora checkout `code`) in its own process; its peak RSS from the kernel
    (ru_maxrss, KiB on Linux)."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "tear_lora.cli", "data", "prepare", str(raw), "--recipe",
               str(REPO / "recipes/tiny-cpu.yaml"), "--set", f"model.name_or_path={model}", "--out", str(out),
               "--skip-invalid"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=code)  # -m
    # puts the working directory first on sys.path: it must be the checkout measured
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"data prepare failed:\n{output[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1),
            "rows_kept": manifest["rows_kept"], "rows_rejected": manifest["rows_rejected"],
            "rejects_file_bytes": (out / "rejects.jsonl").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=1000.0, help="size of the hostile file (default 1000)")
    parser.add_argument("--hostile", type=int, default=10_000, help="hostile rows (default 10,000)")
    parser.add_argument("--model", help="tiny model dir (default: models/tiny-qwen3, else one is written)")
    parser.add_argument("--code", default=str(REPO), help="tear_lora checkout to measure (default: this one; "
                        "e.g. a checkout from before the bound, for comparison)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else REPO / "models/tiny-qwen3"
        if not model.is_dir():
            sys.path.insert(0, str(REPO))
            from tear_lora.tiny import write_tiny_model

            model = write_tiny_model(tmp / "tiny-qwen3")
        hostile_file, good_file = tmp / "hostile.jsonl", tmp / "good.jsonl"
        data = write_file(hostile_file, args.size_mb, args.hostile)
        write_file(good_file, 0, 0)
        baseline = prepare_peak(good_file, tmp / "out-good", model, Path(args.code))
        hostile = prepare_peak(hostile_file, tmp / "out-hostile", model, Path(args.code))
    result = {"data": data, "baseline": baseline, "hostile": hostile,
              "peak_rss_increase_mib": round(hostile["peak_rss_mib"] - baseline["peak_rss_mib"], 1),
              "command": " ".join(["python", "scripts/bench/bench_hostile_data.py", *sys.argv[1:]])}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
