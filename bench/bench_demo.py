"""The default demo, end to end: wall time and peak memory of each phase, and the ground truth.

Each repeat runs the demo's phases as separate processes in a fresh folder (so each phase's peak
resident memory is its own) and then checks the run against the world's planted ground truth,
reading only ``scores.npy``, ``suspect_mislabeled.npy`` and the jsonl files:

- near-duplicates: is the planted training copy among the top-5 positive influencers of its
  validation pair? (target: at least 90% of them)
- mislabeled pairs: ROC AUC of the suspected-mislabeled ranking (target: at least 0.8)

Prints tables and writes them into BENCHMARKS.md (sections ``bench_demo`` and
``bench_groundtruth``).

    python bench/bench_demo.py [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import machine, write_section
from engine import demo, groundtruth, store, train

PHASES = {
    "world + ensemble training": (
        "from engine import demo; from pathlib import Path; cfg = demo.DemoConfig(); "
        "out = Path({out!r}); tr, _ = demo.make_world(cfg, out / 'data'); "
        "demo.train_models(cfg, tr, out / 'models')"
    ),
    "attribution build": (
        "from engine import demo; from pathlib import Path; "
        "demo.run_demo(demo.DemoConfig(), Path({out!r}))"
    ),
}


def run_phase(code: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a Python snippet in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"phase failed ({status}): {code}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def check_ground_truth(run: Path) -> dict[str, float]:
    scores = np.load(run / "scores.npy")
    train = store.read_jsonl(run / "train.jsonl")
    val = store.read_jsonl(run / "val.jsonl")
    near = groundtruth.near_duplicate_hits(scores, train, val, k=5)
    auc = groundtruth.mislabeled_auc(np.load(run / "suspect_mislabeled.npy"), train)
    return {
        "near_n": near["n"],
        "near_hits": near["hits"],
        "near_rate": near["rate"],
        "near_median_rank": float(np.median(near["ranks"])),
        "mislabeled_auc": auc,
        "val_caption_top1": float((np.load(run / "val_caption_rank.npy") == 1).mean()),
    }


def md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="keep the last demo folder here")
    args = parser.parse_args()

    times: dict[str, list[float]] = {p: [] for p in PHASES}
    peaks: dict[str, list[float]] = {p: [] for p in PHASES}
    checks = []
    for r in range(args.repeats):
        folder = Path(tempfile.mkdtemp(prefix="trakview-demo-"))
        for phase, code in PHASES.items():
            seconds, peak = run_phase(code.format(out=str(folder)))
            times[phase].append(seconds)
            peaks[phase].append(peak)
            print(f"repeat {r + 1}: {phase}: {seconds:.1f} s, peak {peak:.0f} MiB", flush=True)
        checks.append(check_ground_truth(folder / "run"))
        if args.keep and r == args.repeats - 1:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.move(str(folder), args.keep)
        else:
            shutil.rmtree(folder)

    total = [sum(times[p][r] for p in PHASES) for r in range(args.repeats)]
    rows = [
        (
            p,
            f"{statistics.median(times[p]):.1f}",
            f"{min(times[p]):.1f}-{max(times[p]):.1f}",
            f"{max(peaks[p]):.0f}",
        )
        for p in PHASES
    ]
    rows.append(
        (
            "whole demo (no dashboard)",
            f"{statistics.median(total):.1f}",
            f"{min(total):.1f}-{max(total):.1f}",
            f"{max(max(v) for v in peaks.values()):.0f}",
        )
    )
    header = ("phase", "median s", "range s", "peak RSS MiB")
    cfg = demo.DemoConfig()
    epochs = ", ".join(str(e) for e in train.snapshot_epochs(cfg.epochs, cfg.snapshots))
    table = md_table(header, rows)
    print(table)
    write_section(
        "bench_demo",
        (
            "### The default demo, end to end\n\n"
            f"`trakview demo` defaults: {cfg.n_train} train / {cfg.n_val} val pairs, "
            f"{cfg.members} x {cfg.model}, {cfg.epochs} epochs, {cfg.snapshots} checkpoints of "
            f"each attributed (epochs {epochs}), proj_dim 512. Median of {args.repeats} runs; each phase in its own process. "
            f"{machine()}. `python bench/bench_demo.py`. Targets: ensemble < 120 s, whole demo "
            f"< 300 s.\n\n{table}\n"
        ),
    )

    c = checks[-1]
    gt_rows = [
        (
            "near-duplicate in top-5 positive influencers",
            f"{c['near_hits']}/{c['near_n']} = {c['near_rate']:.2f}",
            ">= 0.90",
        ),
        ("median rank of the near-duplicate", f"{c['near_median_rank']:.0f}", ""),
        ("suspected-mislabeled ROC AUC (self-influence)", f"{c['mislabeled_auc']:.3f}", ">= 0.80"),
        (
            "val caption rank 1 among 300 (ensemble CLIP)",
            f"{c['val_caption_top1']:.2f}",
            "chance 0.003",
        ),
    ]
    all_runs = ", ".join(f"{x['near_rate']:.2f} / {x['mislabeled_auc']:.3f}" for x in checks)
    gt = md_table(("check (default demo run)", "measured", "target"), gt_rows)
    print(gt)
    write_section(
        "bench_groundtruth",
        (
            "### Ground truth of the demo world\n\n"
            "Read from `scores.npy`, `suspect_mislabeled.npy` and the jsonl files only. "
            f"Near-duplicate rate / AUC of every repeat: {all_runs} (identical: the build is "
            f"deterministic).\n\n{gt}\n"
        ),
    )


if __name__ == "__main__":
    main()
