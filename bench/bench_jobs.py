"""Side by side on one machine: the demo's build and training in one process against worker
processes of one thread each (``--jobs``), alternating within each repeat.

    python bench/bench_jobs.py [--demo DIR] [--repeats 2] [--no-write]

DIR is a finished demo folder (``trakview demo --no-serve --out DIR``; default
demo-run): its pairs and the final checkpoint of each model are built again into DIR/bench-jobs,
and its first two models are trained again. Prints a table and writes it into BENCHMARKS.md
(section ``bench_jobs``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench_common import arguments, demo_pairs, machine, md_table, train_on, write_section
from engine import files
from engine.assemble.executors import LocalExecutor
from engine.assemble.orchestrate import build
from engine.attribution.settings import BuildConfig
from engine.models.checkpoints import find_checkpoints
from engine.models.train import TRAIN_CONFIG_FILE, TrainConfig
from engine.run.layout import RunLayout


def build_with(demo_dir: Path, out: Path, checkpoints: list[Path], jobs: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(checkpoints=[str(p) for p in checkpoints], seed=0)
    t0 = time.perf_counter()
    build(*demo_pairs(demo_dir), cfg, out, executor=LocalExecutor(jobs=jobs))
    return time.perf_counter() - t0


def train_two(demo_dir: Path, out: Path, jobs: int) -> float:
    """The first two models of the demo again, with its trainer (keeping the final epochs)."""
    shutil.rmtree(out, ignore_errors=True)
    recorded = files.read_json(demo_dir / "models" / TRAIN_CONFIG_FILE)
    cfg = replace(TrainConfig(**recorded), members=2, save_epochs=[])
    pairs, _ = demo_pairs(demo_dir)
    t0 = time.perf_counter()
    train_on(pairs, cfg, out, jobs=jobs)
    return time.perf_counter() - t0


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--demo", type=Path, default=Path("demo-run"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    work = args.demo / "bench-jobs"
    finals = find_checkpoints(args.demo / "models")  # the last epoch of each model
    n_train = len(demo_pairs(args.demo)[0])
    rows: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for jobs in (1, args.jobs):
            s = build_with(args.demo, work / f"run-j{jobs}", finals, jobs)
            rows.setdefault(f"build, jobs {jobs}", []).append(s)
            print(f"repeat {r + 1}: build, {jobs} job(s): {s:.1f} s", flush=True)
            s = train_two(args.demo, work / f"train-j{jobs}", jobs)
            rows.setdefault(f"train, jobs {jobs}", []).append(s)
            print(f"repeat {r + 1}: train 2 members, {jobs} job(s): {s:.1f} s", flush=True)
    one = files.load_npy(RunLayout(work / "run-j1").scores)
    many = files.load_npy(RunLayout(work / f"run-j{args.jobs}").scores)
    diff = float(np.abs(one - many).max() / np.abs(one).max())
    table_rows = []
    for what in ("build", "train"):
        a, b = rows[f"{what}, jobs 1"], rows[f"{what}, jobs {args.jobs}"]
        ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
        label = (
            f"build: {len(finals)} checkpoints x {n_train} pairs"
            if what == "build"
            else "train: 2 members of the demo's trainer"
        )
        per_job = max(1, (os.cpu_count() or 1) // args.jobs)
        for procs, values, speed in ((1, a, "1.00x"), (args.jobs, b, f"{ratio:.2f}x")):
            each = ", ".join(f"{v:.1f}" for v in values)
            cores = f"{procs} x {threads if procs == 1 else per_job}"
            table_rows.append((label, cores, f"{statistics.median(values):.1f}", each, speed))
    table = md_table(
        (
            "what",
            "processes x torch threads",
            "median s",
            "per repeat s",
            "speed-up (median of per-repeat ratios)",
        ),
        table_rows,
    )
    print(table)
    if args.no_write:
        return
    write_section(
        "bench_jobs",
        "### Worker processes on one machine (`--jobs`)\n\n"
        f"`python bench/bench_jobs.py --repeats {args.repeats}` on the demo world; one process "
        f"against {args.jobs} processes, alternating within each repeat. {machine()}. A tiny "
        "model's per-sample gradients gain little from a second torch thread, so a second "
        "process nearly doubles the build's speed; a training step's batched matrix products use "
        "the second thread better, so training gains less. The build's scores with "
        f"{args.jobs} jobs differ from the one-process build's by at most {diff:.1e} of the "
        "largest score (float sums over another number of threads; with the same threads they "
        "are identical, `tests/engine/test_graph.py`). `--jobs 0` (auto) uses one process per "
        "core for a build of at least 5,000 gradients or a training of several members.\n\n"
        + table
        + "\n",
    )


if __name__ == "__main__":
    main()
