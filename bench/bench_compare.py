"""Did the fix work? TRAK's predicted effect of a removal against what retraining did, per
validation pair (`trakview compare`).

On a demo run A: a basket of the run's top suspects and one of as many random training pairs
(seeded), and any existing basket given with --basket. Each is removed from the training set
(`trakview basket export`); the demo's ensemble is retrained on what is left with the demo's
trainer (train_config.json beside the run's checkpoints: the same members, seeds, epochs,
snapshots and base model); a run B is built with A's settings; and A and B are compared
(`trakview compare A B --basket NAME`): per validation pair, the predicted margin change (minus
the basket's scores in A, summed) against the actual one (B's margin minus A's, each run's own),
and at a fixed contrast batch (B's margin minus A's checkpoints' margin over B's batches).
Intervals: bootstrap over validation pairs. Everything is kept under --work (resumable: an
exported set, a trained member and a finished build are not made again).

    python bench/bench_compare.py [--run RUN] [--pairs N] [--basket NAME ...] [--skip-defaults]
        [--work DIR] [--bootstrap B] [--no-write]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np

from bench_common import (
    arguments,
    demo_pairs,
    fill_basket,
    machine,
    md_table,
    train_on,
    write_section,
)
from engine import demo, files
from engine.assemble.orchestrate import build
from engine.cli.eval_cmds import train_config
from engine.curate import baskets, select
from engine.curate.cleaned import SUMMARY, clean_run, export_cleaned
from engine.data.sources import SourceOptions, read_source
from engine.evaluate import compare_report
from engine.evaluate.compare import CompareConfig, compare_runs
from engine.explore.run_data import RunData
from engine.models import train
from engine.run.layout import RunLayout

DEFAULT_DEMO = Path("/tmp/clean-demo")  # bench_clean's demo: its run and baskets are shared


def make_baskets(data: RunData, n: int, seed: int) -> dict[str, np.ndarray]:
    """The two default baskets of ``n`` pairs, filled in run A (kept as they are when present)."""
    suspects = select.top_suspects(data.suspect, n)
    rand = np.random.default_rng([seed, n, 5]).choice(len(data.train), n, replace=False)
    fill_basket(data, "cmp-suspects", suspects, "suspects", f"among the {n} most suspect")
    fill_basket(data, "cmp-random", np.sort(rand), "cli", f"{n} random pairs (seed {seed})")
    return {"cmp-suspects": suspects, "cmp-random": rand}


def run_b(run: Path, name: str, work: Path) -> tuple[Path, dict[str, float]]:
    """Run B of basket ``name``: export, retrain, build (each step skipped when done)."""
    layout, seconds = RunData(run).layout, {}
    manifest = RunData(run).manifest
    cleaned = work / "cleaned"
    t0 = time.perf_counter()
    if not (cleaned / SUMMARY).is_file():
        export_cleaned(clean_run(layout, manifest, baskets.read_basket(layout, name)), cleaned)
    summary = files.read_json(cleaned / SUMMARY)
    source = summary["source"]
    options = SourceOptions(format=source["format"], image_root=summary["image_root"])
    pairs = read_source(cleaned / summary["files"]["cleaned"], options)
    seconds["export"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tcfg, where = train_config(run, {})
    logging.getLogger("bench").info("retraining for %s: %s", name, where)
    checkpoints = [
        p for m in range(tcfg.members) for p in train.member_checkpoints(work / "models", m, tcfg)
    ]
    trained_before = all(p.is_file() for p in checkpoints)
    train_on(pairs, tcfg, work / "models")
    seconds["train" + (" (reused)" if trained_before else "")] = time.perf_counter() - t0
    if len(checkpoints) != manifest.n_models:
        raise SystemExit(
            f"the retrained ensemble has {len(checkpoints)} checkpoints, run A {manifest.n_models}"
        )

    t0 = time.perf_counter()
    built_before = RunLayout(work / "run").manifest.is_file()
    cfg = dataclasses.replace(manifest.config, checkpoints=[str(p) for p in checkpoints])
    out = build(pairs, demo_pairs(run.parent)[1], cfg, work / "run")
    seconds["build" + (" (reused)" if built_before else "")] = time.perf_counter() - t0
    return out, seconds


def cell(value: dict, digits: int = 2, null: float = 0.0) -> str:
    """A value with its interval, bold when the interval excludes ``null``."""
    lo, hi = value["ci"]
    bold = "**" if lo > null or hi < null else ""
    return f"{bold}{value['value']:+.{digits}f}{bold} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def table(docs: dict[str, dict], planted: dict[str, int], kind: str) -> str:
    header = ["basket (pairs)", "planted mislabeled", "mean predicted", "mean actual [95%]"]
    header += ["Pearson r", "Spearman ρ", "sign agreement (chance)", "R² fit", "R² scaled (c)"]
    header += ["R² as predicted"]
    rows = []
    for name, doc in docs.items():
        check = doc["prediction"][kind]
        e, mean = check["explained"], doc["overall"]["margin_change"]
        actual = (
            f"{mean['mean']:+.3f} [{mean['ci'][0]:+.3f}, {mean['ci'][1]:+.3f}]"
            if kind == "actual"
            else f"{check['mean_actual']:+.3f}"
        )
        rows.append(
            [
                f"{name} ({doc['basket']['pairs']})",
                str(planted[name]),
                f"{check['mean_predicted']:+.3f}",
                actual,
                cell(check["pearson"]),
                cell(check["spearman"]),
                f"{cell(check['sign'], null=check['sign']['chance'])} ({check['sign']['chance']:.2f})",
                f"{e['fit']:.3f}",
                f"{e['scaled']:.3f} ({e['scale']:.2f})",
                f"{e['as_predicted']:.3f}",
            ]
        )
    return md_table(header, rows)


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in load)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--run", type=Path, default=DEFAULT_DEMO / "run")
    parser.add_argument("--pairs", type=int, default=90, help="pairs of each default basket")
    parser.add_argument("--basket", action="append", default=[], help="an existing basket of A")
    parser.add_argument("--skip-defaults", action="store_true", help="only the --basket ones")
    parser.add_argument("--work", type=Path, default=None, help="default: RUN/../compare")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = args.run.resolve()
    if not run.is_dir() and args.run == DEFAULT_DEMO / "run":
        demo.run_demo(demo.DemoConfig(), DEFAULT_DEMO)
    data = RunData(run)
    work = args.work or run.parent / "compare"
    removed = {} if args.skip_defaults else make_baskets(data, args.pairs, args.seed)
    for name in args.basket:
        removed[name] = baskets.basket_rows(baskets.read_basket(data.layout, name), data.train)
    is_planted = np.array([bool(r.get("mislabeled")) for r in data.train])
    planted = {name: int(is_planted[rows].sum()) for name, rows in removed.items()}
    load_before, t0 = os.getloadavg(), time.perf_counter()
    docs, timings = {}, {}
    for name in removed:
        b, timings[name] = run_b(run, name, work / name)
        t1 = time.perf_counter()
        comparison = compare_runs(run, b, CompareConfig(basket=name, bootstrap=args.bootstrap))
        docs[name] = compare_report.to_json(comparison)
        listed = [p["id"] for p in docs[name]["improved"] + docs[name]["regressed"]]
        page = compare_report.html_report(docs[name], compare_report.thumbnails(comparison, listed))
        files.write_text(work / name / "report.html", page)
        timings[name]["compare"] = time.perf_counter() - t1
        print(f"{name}: {timings[name]}")
    seconds, load_after = time.perf_counter() - t0, os.getloadavg()
    first = next(iter(docs.values()))
    costs = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
        for name, t in timings.items()
    )
    body = f"""## Did the fix work? Predicted against actual, per validation pair (`bench_compare`)

`python bench/bench_compare.py --run {args.run}` ({len(data.train)} training pairs, {int(is_planted.sum())} of them planted mislabeled; {len(data.val)} validation pairs; {data.n_models} checkpoints), {time.strftime("%Y-%m-%d %H:%M")}. Baskets of run A: {", ".join(f"**{n}**" for n in docs)} (`cmp-suspects`: the run's top {args.pairs} of the suspect ranking; `cmp-random`: {args.pairs} random training pairs, seed {args.seed}). Each removed with `basket export`, the demo's ensemble retrained on the rest with the demo's trainer (its train_config.json: same members, seeds, epochs, snapshots and base model), run B built with A's settings, then `trakview compare A B --basket NAME`. Per validation pair ({first["val"]["matched"]} matched): TRAK's predicted margin change (minus the basket's scores in A, summed) against the actual change; 95% bootstrap intervals over validation pairs ({args.bootstrap} resamples; **bold**: the interval excludes zero, for the sign agreement the agreement of independent signs). R² scaled: of the prediction times the least-squares factor c through the origin; as predicted: of the prediction itself (below 0: worse than predicting the mean).

Actual change = B's margin minus A's, each run's own (the margins over each run's own contrast batches):

{table(docs, planted, "actual")}

At a fixed contrast batch (B's margin minus A's checkpoints' margin over B's contrast batches: the change of the models alone):

{table(docs, planted, "fixed")}

Cost: {costs} ({seconds:.0f} s in all); {machine()}. Load average (1/5/15 min) {fmt_load(load_before)} before, {fmt_load(load_after)} after. Reports: `{work}/NAME/report.html`.
"""
    print(body)
    if not args.no_write:
        write_section("bench_compare", body)


if __name__ == "__main__":
    main()
