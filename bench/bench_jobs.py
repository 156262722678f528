"""Side by side on one machine: the demo's build and training in one process against worker
processes of one thread each (``--jobs``), alternating within each repeat.

    python bench/bench_jobs.py [--demo DIR] [--repeats 2]

DIR is a finished demo folder (``trakview demo --no-serve --out DIR``; default
demo-run): its pairs and the final checkpoint of each model are built again into DIR/bench-jobs,
and its first two models are trained again. Prints a table and writes it into BENCHMARKS.md
(section ``bench_jobs``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import machine, write_section
from engine import attribute, data, demo, executors, models, train


def build(demo_dir: Path, out: Path, checkpoints: list[str], jobs: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    train_pairs = data.read_pairs(demo_dir / "data" / "train.jsonl")
    val_pairs = data.read_pairs(demo_dir / "data" / "val.jsonl")
    cfg = attribute.BuildConfig(checkpoints=checkpoints, seed=0)
    t0 = time.perf_counter()
    attribute.build(train_pairs, val_pairs, cfg, out, executor=executors.LocalExecutor(jobs=jobs))
    return time.perf_counter() - t0


def train_two(demo_dir: Path, out: Path, jobs: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    dcfg = demo.DemoConfig()
    cfg = train.TrainConfig(
        model=dcfg.model, members=2, epochs=dcfg.epochs, lr=dcfg.lr, seed=dcfg.seed
    )
    pairs = data.read_pairs(demo_dir / "data" / "train.jsonl")
    bundle = models.create(dcfg.model)
    images = data.image_tensors(pairs, bundle.preprocess, progress=False)
    tokens = data.tokenize(bundle.tokenizer, pairs.captions)
    t0 = time.perf_counter()
    train.train_ensemble(images, tokens, cfg, out, jobs=jobs)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("demo-run"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    work = args.demo / "bench-jobs"
    members = sorted((args.demo / "models").glob("member-*"))
    finals = [
        str(max(m.glob("checkpoints/epoch_*.pt"), key=lambda p: int(p.stem[6:]))) for m in members
    ]
    rows: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for jobs in (1, args.jobs):
            s = build(args.demo, work / f"run-j{jobs}", finals, jobs)
            rows.setdefault(f"build, jobs {jobs}", []).append(s)
            print(f"repeat {r + 1}: build, {jobs} job(s): {s:.1f} s", flush=True)
            s = train_two(args.demo, work / f"train-j{jobs}", jobs)
            rows.setdefault(f"train, jobs {jobs}", []).append(s)
            print(f"repeat {r + 1}: train 2 members, {jobs} job(s): {s:.1f} s", flush=True)
    one = np.load(work / "run-j1" / "scores.npy")
    many = np.load(work / f"run-j{args.jobs}" / "scores.npy")
    diff = float(np.abs(one - many).max() / np.abs(one).max())
    lines = [
        "| what | processes x torch threads | median s | per repeat s | speed-up (median of per-repeat ratios) |",
        "|---|---|---:|---|---:|",
    ]
    for what in ("build", "train"):
        a, b = rows[f"{what}, jobs 1"], rows[f"{what}, jobs {args.jobs}"]
        ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
        label = (
            f"build: {len(finals)} checkpoints x {len(data.read_pairs(args.demo / 'data' / 'train.jsonl'))} pairs"
            if what == "build"
            else "train: 2 members of the demo's trainer"
        )
        lines.append(
            f"| {label} | 1 x {threads} | {statistics.median(a):.1f} | {', '.join(f'{v:.1f}' for v in a)} | 1.00x |"
        )
        lines.append(
            f"| {label} | {args.jobs} x {max(1, (os.cpu_count() or 1) // args.jobs)} | {statistics.median(b):.1f} | {', '.join(f'{v:.1f}' for v in b)} | {ratio:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
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
