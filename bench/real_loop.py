"""The real loop against the benchmark: `smollm2.train`'s logged tok/s over `python -m bench.step`'s row of the same shape.

    python -m bench.real_loop --metrics RUN_DIR/metrics.jsonl --bench bench.json [--case "B=8 T=2048 accum=1 ac=none"]

The run's first `--skip` log records (compile and warm-up) are left out; the rest's median tok/s is compared with the
benchmark row whose label starts with `--case` (default: the first smollm2 row without an error). Target:
the real loop >= 0.95x the benchmark. Prints one PASS/FAIL line and writes `real_loop.json` next to the bench JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

TARGET = 0.95


def compare(metrics: Path, bench: Path, case: str | None = None, skip: int = 1) -> dict:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "tok_per_s" in r and "loss" in r]
    steady = train[skip:]
    if not steady:
        raise SystemExit(f"real_loop: {metrics} has {len(train)} train records; need more than --skip {skip}")
    rows = [r for r in json.loads(bench.read_text())["rows"] if r["impl"] == "smollm2" and not r.get("error")]
    row = next((r for r in rows if case is None or r["case"].startswith(case)), None)
    if row is None:
        raise SystemExit(f"real_loop: no benchmark row {case!r} in {bench}")
    real = statistics.median(r["tok_per_s"] for r in steady)
    ratio = real / row["tok_per_s"]
    return {"real_tok_per_s": real, "real_steps": [r["step"] for r in steady], "real_data_wait_ms":
            statistics.median(r.get("data_wait_ms", 0.0) for r in steady), "bench_case": row["case"],
            "bench_tok_per_s": row["tok_per_s"], "ratio": ratio, "target": TARGET,
            "status": "PASS" if ratio >= TARGET else "FAIL"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", required=True, type=Path, help="the run's metrics.jsonl")
    parser.add_argument("--bench", required=True, type=Path, help="bench.step's JSON")
    parser.add_argument("--case", help="benchmark row label prefix, e.g. 'B=8 T=2048 accum=1 ac=none'")
    parser.add_argument("--skip", type=int, default=1, help="leading log records left out (compile, warm-up)")
    args = parser.parse_args(argv)
    result = compare(args.metrics, args.bench, args.case, args.skip)
    print(f"{result['status']:<5} real loop {result['real_tok_per_s']:,.0f} tok/s (steps {result['real_steps']}, data "
          f"wait {result['real_data_wait_ms']:.1f} ms) vs bench {result['bench_tok_per_s']:,.0f} tok/s "
          f"({result['bench_case']}): {result['ratio']:.3f}x, target >= {TARGET:.2f}x")
    (args.bench.parent / "real_loop.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
