"""The default demo, end to end: wall time and peak memory of each phase, and the ground truth.

Each repeat runs the demo's phases as separate processes in a fresh folder (so each phase's peak
resident memory is its own) and then checks the run against the world's planted ground truth,
reading only the run's scores, suspected-mislabeled ranking and pair lists:

- near-duplicates: is the planted training copy among the top-5 positive influencers of its
  validation pair? (target: at least 90% of them)
- mislabeled pairs: ROC AUC of the suspected-mislabeled ranking (target: at least 0.8)

Prints tables and writes them into BENCHMARKS.md (sections ``bench_demo`` and
``bench_groundtruth``).

    python bench/bench_demo.py [--repeats 3] [--keep DIR]
    python bench/bench_demo.py --quick --repeats 1      # a small demo, a minute or two; no write
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench_common import QUICK_DEMO, arguments, machine, md_table, run_child, spread, write_section
from engine import demo, files
from engine.evaluate import groundtruth
from engine.models.train import snapshot_epochs
from engine.run.layout import SCORES, SUSPECT, RunLayout

# Each phase runs in its own process: sys.argv[2] is the demo folder, sys.argv[3] the DemoConfig.
PREFIX = (
    "import json, sys; from pathlib import Path; from engine import demo; "
    "out = Path(sys.argv[2]); cfg = demo.DemoConfig(**json.loads(sys.argv[3])); "
)
PHASES = {
    "world + ensemble training": PREFIX
    + "tr, _ = demo.make_world(cfg, out / 'data'); demo.train_models(cfg, tr, out / 'models')",
    "attribution build": PREFIX + "demo.run_demo(cfg, out)",
}


def check_ground_truth(run: Path) -> dict[str, float]:
    layout = RunLayout(run)
    scores = files.load_npy(layout.scores)
    train = files.read_jsonl(layout.pairs("train"))
    val = files.read_jsonl(layout.pairs("val"))
    near = groundtruth.near_duplicate_hits(scores, train, val, k=5)
    auc = groundtruth.mislabeled_auc(files.load_npy(layout.suspect), train)
    return {
        "near_n": near["n"],
        "near_hits": near["hits"],
        "near_rate": near["rate"],
        "near_median_rank": float(np.median(near["ranks"])),
        "mislabeled_auc": auc,
        "val_caption_top1": float((files.load_npy(layout.caption_rank("val")) == 1).mean()),
    }


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="keep the last demo folder here")
    parser.add_argument("--quick", action="store_true", help="a small demo (implies --no-write)")
    args = parser.parse_args()
    cfg = QUICK_DEMO if args.quick else demo.DemoConfig()

    times: dict[str, list[float]] = {p: [] for p in PHASES}
    peaks: dict[str, list[float]] = {p: [] for p in PHASES}
    checks = []
    for r in range(args.repeats):
        folder = Path(tempfile.mkdtemp(prefix="trakview-demo-"))
        for phase, code in PHASES.items():
            res = run_child(code, str(folder), json.dumps(asdict(cfg)))
            times[phase].append(res["seconds"])
            peaks[phase].append(max(res["main_mib"], res["worker_mib"]))
            print(
                f"repeat {r + 1}: {phase}: {res['seconds']:.1f} s, peak {peaks[phase][-1]:.0f} MiB",
                flush=True,
            )
        checks.append(check_ground_truth(folder / "run"))
        if args.keep and r == args.repeats - 1:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.move(str(folder), args.keep)
        else:
            shutil.rmtree(folder)

    total = [sum(times[p][r] for p in PHASES) for r in range(args.repeats)]
    rows = [(p, *spread(times[p]), f"{max(peaks[p]):.0f}") for p in PHASES]
    rows.append(
        ("whole demo (no dashboard)", *spread(total), f"{max(max(v) for v in peaks.values()):.0f}")
    )
    epochs = ", ".join(str(e) for e in snapshot_epochs(cfg.epochs, cfg.snapshots))
    table = md_table(("phase", "median s", "range s", "peak RSS MiB"), rows)
    print(table)

    c = checks[-1]
    gt_rows = [
        (
            "near-duplicate in top-5 positive influencers",
            f"{c['near_hits']}/{c['near_n']} = {c['near_rate']:.2f}",
            ">= 0.90",
        ),
        ("median rank of the near-duplicate", f"{c['near_median_rank']:.0f}", ""),
        (
            "suspected-mislabeled ROC AUC (`suspect_mislabeled.npy`)",
            f"{c['mislabeled_auc']:.3f}",
            ">= 0.80",
        ),
        (
            f"val caption rank 1 among {cfg.n_val} (ensemble CLIP)",
            f"{c['val_caption_top1']:.2f}",
            f"chance {1 / cfg.n_val:.3f}",
        ),
    ]
    all_runs = ", ".join(f"{x['near_rate']:.2f} / {x['mislabeled_auc']:.3f}" for x in checks)
    gt = md_table(("check (default demo run)", "measured", "target"), gt_rows)
    print(gt)
    if args.no_write or args.quick:
        return
    write_section(
        "bench_demo",
        (
            "### The default demo, end to end\n\n"
            f"`trakview demo` defaults: {cfg.n_train} train / {cfg.n_val} val pairs, "
            f"{cfg.members} x {cfg.model}, {cfg.epochs} epochs, {cfg.snapshots} checkpoints of "
            f"each attributed (epochs {epochs}), proj_dim 512; the models are fine-tuned (lr "
            f"{cfg.lr:g}) from a base model trained first ({cfg.base_epochs} epochs, lr "
            f"{cfg.base_lr:g}) on a second world of {cfg.n_train} pairs, which the first phase "
            f"generates too. Median of {args.repeats} runs; each phase in its own process. "
            f"{machine()}. `python bench/bench_demo.py`. Targets: ensemble < 120 s, whole demo "
            f"< 300 s.\n\n{table}\n"
        ),
    )
    write_section(
        "bench_groundtruth",
        (
            "### Ground truth of the demo world\n\n"
            f"Read from `{SCORES}`, `{SUSPECT}` and the jsonl files only. "
            f"Near-duplicate rate / AUC of every repeat: {all_runs} (identical: the build is "
            f"deterministic).\n\n{gt}\n"
        ),
    )


if __name__ == "__main__":
    main()
