"""The cost of an estimator, side by side with TRAK's: whole `trakview build` commands, as a user
runs them, alternated and repeated, each in its own process.

    python bench/bench_estimator_cost.py --train-data DATA --val-data VAL --trajectory TRAJ \\
        [--repeats 2] [--name demo]

TRAJ is a `trakview train --save-epochs 1,2,3,5,10` folder. Built: TRAK at epochs 5, 10, 15
(the demo's choice) and the most faithful settings of BENCHMARKS.md (epochs 2, 3, 5, `--output
batch-loss --lambda-rel 1`, `--proj-dim` 2048 and 4096). Per build: wall seconds, the peak
resident memory of the build (GNU time, its process tree), the TRAK store on disk, and a new query's median
seconds (engine loaded) over 5 validation pairs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_estimators import QUERY  # a new query's median seconds, engine loaded

from bench_common import arguments, machine, md_table, run_child, write_section

SETTINGS = {
    "trak, epochs 5, 10, 15": ("5,10,15", []),
    "batch-loss, proj 2048, lambda 1, epochs 2, 3, 5": (
        "2,3,5",
        ["--output", "batch-loss", "--proj-dim", "2048", "--lambda-rel", "1"],
    ),
    "batch-loss, proj 4096, lambda 1, epochs 2, 3, 5": (
        "2,3,5",
        ["--output", "batch-loss", "--proj-dim", "4096", "--lambda-rel", "1"],
    ),
}


def _build(args, epochs: str, flags: list[str], out: Path) -> dict[str, float]:
    command = [
        "/usr/bin/time", "-f", "%M", "-o", str(out) + ".rss", sys.executable, "-m", "engine.cli", "build",
        "--train-data", str(args.train_data), "--val-data", str(args.val_data),
        "--checkpoints-dir", str(args.trajectory), "--epochs", epochs,
        "--out", str(out), *flags,
    ]  # fmt: skip
    t0 = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        subprocess.run(command, check=True, stdout=quiet, stderr=quiet)
    wall = time.perf_counter() - t0
    peak_kib = int(Path(str(out) + ".rss").read_text().split()[-1])  # the process tree's peak
    return {"wall_s": wall, "peak_mib": peak_kib / 1024}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--train-data", type=Path, required=True)
    parser.add_argument("--val-data", type=Path, required=True)
    parser.add_argument("--trajectory", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="demo")
    args = parser.parse_args()
    load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    work = Path(tempfile.mkdtemp(prefix="trakview-cost-"))
    measured: dict[str, dict[str, list[float]]] = {n: {} for n in SETTINGS}
    try:
        for r in range(args.repeats):
            for name, (epochs, flags) in SETTINGS.items():
                out = work / f"{len(measured[name].get('wall_s', []))}-{abs(hash(name))}"
                got = _build(args, epochs, flags, out)
                got["store_mib"] = (
                    sum(p.stat().st_size for p in (out / "trak").rglob("*") if p.is_file()) / 2**20
                )
                if r == 0:
                    got["query_s"] = run_child(QUERY, str(out))["query_s"]
                for key, value in got.items():
                    measured[name].setdefault(key, []).append(value)
                print(name, got, flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = statistics.median(measured["trak, epochs 5, 10, 15"]["wall_s"])
    rows = []
    for name, m in measured.items():
        wall = statistics.median(m["wall_s"])
        rows.append(
            [
                name,
                " / ".join(f"{w:.0f}" for w in m["wall_s"]),
                f"{wall:.0f}",
                f"{wall / ref:.2f}x",
                f"{max(m['peak_mib']):.0f}",
                f"{m['store_mib'][0]:.0f}",
                f"{m['query_s'][0] * 1000:.0f}",
            ]
        )
    header = ["build", "wall s (each)", "median", "vs TRAK", "peak MiB (max)", "store MiB"]
    body = (
        f"### The cost of the most faithful settings, side by side (`bench_estimator_cost`)\n\n"
        f"`trakview build` of {args.train_data} against {args.val_data} from {args.trajectory}, "
        f"each setting {args.repeats} times, alternated, one build at a time. Peak: GNU time's "
        f"maximum resident size of the build (its process and the workers it waited for). {machine()}. Load "
        f"average before: {load}. `python bench/bench_estimator_cost.py --train-data "
        f"{args.train_data} --val-data {args.val_data} --trajectory {args.trajectory} --repeats "
        f"{args.repeats} --name {args.name}`\n\n" + md_table([*header, "query ms"], rows)
    )
    print(body)
    if not args.no_write:
        write_section(f"bench_estimator_cost_{args.name}", body)
    print(json.dumps(measured))


if __name__ == "__main__":
    main()
