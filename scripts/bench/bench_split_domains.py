"""Peak memory of `tear-lora split-domains` as the input grows: issue 28 case 9, measured.

    python scripts/bench/bench_split_domains.py --json docs/bench/split_domains_cpu.json           # 10 and 100 MB
    python scripts/bench/bench_split_domains.py --sizes 10,100 --code /path/to/older/checkout       # the code before

Writes JSONL files of about each `--sizes` MB: the bundled training triples (data/raw/consequences.jsonl, eight
meta.domain values), repeated with a running number appended to each input and id so every row stays a distinct
triple (duplicates are rejected). Runs `tear-lora split-domains FILE --hold-out code --out DIR` of the checkout
`--code` in a fresh process per size and records its peak RSS (wait4's ru_maxrss), wall time and the rows written.
The number a reader wants: how peak RSS moves from the smallest file to the largest (flat when streamed).
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


def write_file(path: Path, size_mb: float) -> dict:
    rows = [json.loads(line) for line in (REPO / "data/raw/consequences.jsonl").read_text(encoding="utf-8").splitlines()]
    target, written, n = size_mb * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            row = dict(rows[n % len(rows)])
            row["id"], row["input"] = f"{row['id']}-{n}", f"{row['input']} ({n})"
            line = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(line)
            written, n = written + len(line.encode()), n + 1
    return {"rows": n, "file_bytes": path.stat().st_size}


def split_peak(raw: Path, out: Path, code: Path) -> dict:
    """`split-domains` of the checkout `code` in its own process; its peak RSS (ru_maxrss, KiB on Linux)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, "-m", "tear_lora.cli", "split-domains", str(raw), "--hold-out", "code", "--out",
               str(out), "--json"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=code)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"split-domains failed:\n{output[-2000:]}")
    summary = json.loads(output[output.index("["):])[0]
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1),
            "rows_in": summary["in"]["rows"], "rows_out": summary["out"]["rows"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100", help="input sizes in MB, comma-separated (default 10,100)")
    parser.add_argument("--code", type=Path, default=REPO, help="tear_lora checkout to measure (default: this one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (float(s) for s in args.sizes.split(",")):
            raw = Path(tmp) / f"triples-{size:g}mb.jsonl"
            made = write_file(raw, size)
            measured = split_peak(raw, Path(tmp) / f"split-{size:g}", args.code.resolve())
            results.append({"size_mb": size, **made, **measured})
            print(json.dumps(results[-1]), flush=True)
    report = {"command": "tear-lora split-domains FILE --hold-out code --out DIR", "code": str(args.code),
              "machine": f"{os.cpu_count()} CPU cores (shared: other jobs running, wall times are loose)",
              "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
