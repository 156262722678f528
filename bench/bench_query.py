"""Latency of one new query on a run, checkpoints already loaded: gradient, projection, search.

    python bench/bench_query.py RUN [--repeats 20]

RUN defaults to demo-run/run. Queries are the run's own validation images with a caption of
another validation pair (so each is new). Prints a table and writes it into BENCHMARKS.md
(section ``bench_query``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench_common import machine, write_section
from engine.query import QueryEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=Path("demo-run/run"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    t0 = time.perf_counter()
    engine = QueryEngine.load(args.run)
    engine._load_models()
    load = time.perf_counter() - t0
    n_val = len(engine.val)
    engine.query(args.run / engine.val[0]["image"], engine.val[1]["caption"])  # warm-up
    parts: dict[str, list[float]] = {"gradient": [], "projection": [], "search": [], "total": []}
    for r in range(args.repeats):
        image = args.run / engine.val[(r * 7) % n_val]["image"]
        caption = engine.val[(r * 7 + 3) % n_val]["caption"]
        t = time.perf_counter()
        result = engine.query(image, caption, k=10)
        parts["total"].append(time.perf_counter() - t)
        for key in ("gradient", "projection", "search"):
            parts[key].append(result.timings[key])
    m = engine.manifest
    rows = [
        (k, f"{statistics.median(v) * 1000:.0f}", f"{min(v) * 1000:.0f}-{max(v) * 1000:.0f}")
        for k, v in parts.items()
    ]
    lines = ["| part | median ms | range ms |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    table = "\n".join(lines)
    print(table)
    write_section(
        "bench_query",
        (
            "### One new query (`trakview query`, the dashboard's Upload)\n\n"
            f"Run: {m['counts']['n_train']} train pairs, {m['counts']['n_checkpoints']} checkpoints, "
            f"proj_dim {m['counts']['proj_dim']}, grad params {m['config']['grad_params']}. Median "
            f"of {args.repeats} queries with checkpoints loaded (loading once: {load:.1f} s). "
            "Gradient = per-sample gradients and CLIP embeddings of the query for every checkpoint; "
            "projection = one JL projection of all checkpoints' gradients; search = scores of every "
            f"training pair and the top-k. {machine()}. Target: total < 500 ms.\n\n{table}\n"
        ),
    )


if __name__ == "__main__":
    main()
