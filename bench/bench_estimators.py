"""Estimators against retrained models: every variant of ``--estimator`` / ``--output`` /
projection size built on one run's data and checkpoints, and scored by LDS against the run's
own LDS evaluation (the same retrained models and bootstrap resamples, so each difference to
TRAK has a paired interval), beside its cost: build seconds and peak memory (each build in its
own process, one after the other), the store's size on disk, and a new query's seconds.

    python bench/bench_estimators.py --run demo-run/run [--name demo]

The run needs ``trakview eval lds RUN`` first. Variants go to RUN/../estimators/NAME/ and are
reused when there (delete the folder to rebuild).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bench_common import arguments, machine, md_table, run_child, write_section
from engine.evaluate import stats
from engine.evaluate.lds import load_lds_cache
from engine.evaluate.methods import TrakScores
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest

VARIANTS = {  # name -> BuildConfig changes against the run's own settings
    "trak": {},
    "trak, output loss": {"output": "loss"},
    "trak, proj 2048, lambda 1": {"proj_dim": 2048, "lambda_rel": 1.0},
    "trak, output loss, proj 2048, lambda 1": {
        "output": "loss",
        "proj_dim": 2048,
        "lambda_rel": 1.0,
    },
    "modules 128, output loss": {"estimator": "modules", "module_dim": 128, "output": "loss"},
    "modules 256": {"estimator": "modules", "module_dim": 256},
    "modules 256, output loss": {"estimator": "modules", "module_dim": 256, "output": "loss"},
    "modules 256, output loss, lambda 0.1": {
        "estimator": "modules",
        "module_dim": 256,
        "output": "loss",
        "lambda_rel": 0.1,
    },
    "trak, unit": {"normalize": "unit"},
    "trak, output batch-loss": {"output": "batch-loss"},
    "trak, output loss, proj 2048, lambda 1, unit": {
        "output": "loss",
        "proj_dim": 2048,
        "lambda_rel": 1.0,
        "normalize": "unit",
    },
    "trak, output batch-loss, proj 2048, lambda 1": {
        "output": "batch-loss",
        "proj_dim": 2048,
        "lambda_rel": 1.0,
    },
}

BUILD = """
import json, sys
from pathlib import Path
from engine.assemble.orchestrate import build
from engine.attribution.settings import BuildConfig
from engine.data.pairs import read_pairs
run, out, changes = Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
cfg = json.loads((run / "manifest.json").read_text())["config"]
cfg["checkpoints"] = [str((run / c["path"]).resolve()) for c in json.loads((run / "manifest.json").read_text())["checkpoints"]]
cfg = BuildConfig(**{**cfg, **changes})
build(read_pairs(run / "train.jsonl"), read_pairs(run / "val.jsonl"), cfg, out)
"""

QUERY = """
import statistics, sys, time
from engine.explore.query import QueryEngine
from engine.data.images import open_image
eng = QueryEngine.load(sys.argv[2]); eng.warm()
times = []
for rec in eng.val[:6]:
    t0 = time.perf_counter(); eng.query(open_image(str(eng.run / rec["image"])), rec["caption"], k=10)
    times.append(time.perf_counter() - t0)
result["query_s"] = statistics.median(times[1:])
"""


def disk_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--run", type=Path, required=True, help="a run with `eval lds` done")
    parser.add_argument("--name", default="demo", help="the world's name in BENCHMARKS.md")
    parser.add_argument("--variants", default="", help="names separated by ; (default: all)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    run = args.run.resolve()
    masks, outputs = load_lds_cache(run)
    wanted = [v.strip() for v in args.variants.split(";") if v.strip()] or list(VARIANTS)
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    folder = run.parent / "estimators"
    results, predictions = {}, {}
    load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    for name in wanted:
        changes = VARIANTS[name]
        out = folder / name.replace(", ", "-").replace(" ", "")
        saved = out / "bench_cost.json"  # the build's own measurement, kept with it
        if not RunLayout(out).manifest.is_file():  # TRAK too: timed beside the others
            saved.unlink(missing_ok=True)
            cost = run_child(BUILD, str(run), str(out), json.dumps(changes))
            saved.write_text(json.dumps(cost))
        cost = json.loads(saved.read_text()) if saved.is_file() else {}
        manifest = open_manifest(out)
        seconds = sum(v for v in manifest.timings_seconds.values() if isinstance(v, (int, float)))
        query = run_child(QUERY, str(out))
        predictions[name] = TrakScores(out).predict(masks)
        results[name] = {
            "build_s": cost.get("seconds"),
            "stage_s": seconds,
            "peak_mib": max(cost.get("main_mib", 0), cost.get("worker_mib", 0)) or None,
            "store_mib": disk_mib(out / "trak"),
            "dims": manifest.counts.proj_dim,
            "query_s": query["query_s"],
            "config": {
                k: v
                for k, v in asdict(manifest.config).items()
                if k in ("estimator", "output", "module_dim", "proj_dim", "lambda_rel", "normalize")
            },
        }
        print(name, results[name], flush=True)
    lds = stats.bootstrap_lds(predictions, outputs, args.bootstrap, 0, 0.95, reference="trak")
    rows = []
    ref = results["trak"]
    for name in wanted:
        r, v = results[name], lds[name]
        diff = v.get("reference_minus_this")
        rows.append(
            [
                name,
                f"{v['lds']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]",
                ""
                if diff is None
                else f"{-diff['mean']:+.3f} [{-diff['ci'][1]:+.3f}, {-diff['ci'][0]:+.3f}]",
                r["dims"],
                f"{r['stage_s']:.0f}",
                f"{r['stage_s'] / ref['stage_s']:.2f}x",
                f"{r['peak_mib']:.0f}" if r["peak_mib"] else "(reused)",
                f"{r['store_mib']:.0f}",
                f"{r['query_s'] * 1000:.0f}",
            ]
        )
    table = md_table(
        [
            "estimator",
            "LDS [95%]",
            "minus TRAK [paired 95%]",
            "dims per checkpoint",
            "build s (stages)",
            "vs TRAK",
            "peak MiB",
            "store MiB",
            "query ms",
        ],
        rows,
    )
    body = (
        f"### Estimators on the {args.name} ({run})\n\n"
        f"{len(masks)} LDS subsets of the run's own `eval lds` (1 model each), {args.bootstrap} bootstrap "
        f"resamples shared by every estimator; every variant built from the run's data and {manifest.counts.n_checkpoints} "
        f"checkpoints, one build after another, each in its own process (peak: the larger of the process and its "
        f"largest worker; `trak` rebuilt beside the others, its scores identical to the run's). Build seconds are "
        f"the stages' unit seconds summed; the query is a new query's median over 5 with the engine loaded. "
        f"{machine()}. Load average before: {load}. `python bench/bench_estimators.py --run {run} --name {args.name}`\n\n"
        + table
    )
    print(body)
    if not args.no_write:
        write_section(f"bench_estimators_{args.name}", body)
    (folder / "results.json").write_text(
        json.dumps(
            {
                "results": results,
                "lds": {
                    k: {kk: vv for kk, vv in v.items() if kk != "per_target"}
                    for k, v in lds.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
