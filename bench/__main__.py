"""Run every benchmark: `python -m bench` (all) or `python -m bench store mesh` (some).

Each `bench/bench_<name>.py` exposes `main() -> list[dict]` that measures our code and its
anchor in the same process, prints its own table, and returns rows for `bench/results/`.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import pkgutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _names() -> list[str]:
    mods = pkgutil.iter_modules([str(HERE)])
    return sorted(m.name[6:] for m in mods if m.name.startswith("bench_"))


def main(argv: list[str]) -> None:
    """Run the named benchmarks (default: all) and save their rows as JSON."""
    chosen = argv or _names()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    for name in chosen:
        mod = importlib.import_module(f"bench.bench_{name}")
        print(f"\n=== bench {name} ===", flush=True)
        started = time.perf_counter()
        result = mod.main()
        rows = asyncio.run(result) if inspect.isawaitable(result) else result
        (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
        print(f"--- {name}: {time.perf_counter() - started:.1f} s", flush=True)
    from .report import write

    write()  # docs/bench-results.md and docs/img/bench-ratios.svg from the latest results


if __name__ == "__main__":
    main(sys.argv[1:])
