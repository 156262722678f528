"""Latency of one new query on a run, checkpoints already loaded: gradient, projection, search.

    python bench/bench_query.py RUN [--repeats 20] [--no-write]

RUN defaults to demo-run/run. Queries are the run's own validation images with a caption of
another validation pair (so each is new). Prints a table and writes it into BENCHMARKS.md
(section ``bench_query``).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench_common import arguments, machine, md_table, spread, write_section
from engine.explore.query import QueryEngine


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("run", nargs="?", type=Path, default=Path("demo-run/run"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    engine = QueryEngine.load(args.run)
    val = engine.val
    t0 = time.perf_counter()
    engine.warm()  # the checkpoints, the projection and the TRAK features
    load = time.perf_counter() - t0
    parts: dict[str, list[float]] = {"gradient": [], "projection": [], "search": [], "total": []}
    for r in range(args.repeats):
        image = engine.image_path(val[(r * 7) % len(val)]["image"])
        caption = val[(r * 7 + 3) % len(val)]["caption"]
        t = time.perf_counter()
        result = engine.query(image, caption, k=10)
        parts["total"].append(time.perf_counter() - t)
        for key in ("gradient", "projection", "search"):
            parts[key].append(result.timings[key])
    rows = [(k, *spread(v, digits=0, scale=1000)) for k, v in parts.items()]
    table = md_table(("part", "median ms", "range ms"), rows)
    print(table)
    if args.no_write:
        return
    counts, cfg = engine.manifest.counts, engine.manifest.config
    write_section(
        "bench_query",
        (
            "### One new query (`trakview query`, the dashboard's Upload)\n\n"
            f"Run: {counts.n_train} train pairs, {counts.n_checkpoints} checkpoints, "
            f"proj_dim {counts.proj_dim}, grad params {cfg.grad_params}. Median "
            f"of {args.repeats} queries with checkpoints loaded (loading them: {load:.1f} s). "
            "Gradient = per-sample gradients and CLIP embeddings of the query for every checkpoint; "
            "projection = one JL projection of all checkpoints' gradients; search = scores of every "
            f"training pair and the top-k. {machine()}. Target: total < 500 ms.\n\n{table}\n"
        ),
    )


if __name__ == "__main__":
    main()
