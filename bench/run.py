"""`make bench`: run every benchmark and write its figures to bench/results/<name>.json.

Benchmarks measure; tests never time anything. Each benchmark module has a `main() -> dict`.
Pick a subset with `BENCH=train_throughput,api_latency make bench`.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALL = ["api_latency", "train_throughput", "dpo_throughput", "serving_throughput"]


def main() -> int:
    sys.path.insert(0, str(HERE.parent))
    names = [n for n in os.environ.get("BENCH", ",".join(ALL)).split(",") if n]
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"== {name} ==", flush=True)
        started = time.time()
        figures = module.main()
        record = {
            "benchmark": name,
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "figures": figures,
        }
        (results / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(figures, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
