"""Cleaning the default demo by removal, verified by retraining (`trakview eval clean`).

Two baskets of as many pairs as the world's planted mislabeled pairs: the run's top suspects
(self-influence + caption rank: chosen without validation scores), and the training pairs most
harmful to validation half a (their TRAK scores summed over half a, most negative first). Each is
verified on validation half b: the demo's 4-member ensemble is retrained E times (seeds 0 ..
4E - 1, the demo's trainer, one CPU thread per model) on every pair, without each basket, without
as many pairs of the lowest CLIP image-caption similarity and without as many random pairs.
Intervals: bootstrap over seeds and the measured validation pairs, paired across conditions.

Models are cached in RUN/eval/clean/ (shared by both baskets: same size, same controls), so a
larger --ensembles continues where a smaller one stopped.

    python bench/bench_clean.py [--demo DIR] [--ensembles E] [--workers N] [--no-write]
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from bench_common import arguments, fill_basket, machine, md_table, write_section
from engine import demo
from engine.cli.eval_cmds import train_config
from engine.curate import select
from engine.evaluate.clean import CleanConfig, evaluate_clean
from engine.explore.run_data import RunData

LABELS = {
    "basket": "the basket",
    "clip-low": "lowest CLIP similarity",
    "random": "random pairs",
    "full": "nothing (every pair)",
}
METRICS = ("margin", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")


def cell(value: dict, digits: int = 3) -> str:
    lo, hi = value["ci"]
    bold = "**" if lo > 0 or hi < 0 else ""
    return f"{bold}{value['mean']:+.{digits}f}{bold} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def table(results: dict[str, dict], mislabeled: dict[str, int]) -> str:
    rows = []
    first = next(iter(results.values()))
    full = first["conditions"]["full"]["metrics"]
    rows.append(
        # its own values (a margin, R@k), in the columns of the changes
        ["every pair (reference)", "-", "-"] + [f"{full[m]['mean']:.3f}" for m in METRICS]
    )
    for basket, result in results.items():
        for condition in ("basket", "clip-low", "random"):
            if condition != "basket" and basket != next(iter(results)):
                continue  # the controls are the same models for both baskets
            c = result["conditions"][condition]
            label = f"**{basket}**" if condition == "basket" else LABELS[condition]
            predicted = c["predicted_margin_change"]
            rows.append(
                [
                    f"{label} ({c['removed']})",
                    str(mislabeled[basket if condition == "basket" else condition]),
                    f"{predicted:+.3f}",
                ]
                + [cell(c["minus_full"][m], 3) for m in METRICS]
            )
    header = [
        "removed (pairs)",
        "planted mislabeled among them",
        "TRAK predicted margin change",
        "margin change",
        "i→t R@1 change",
        "t→i R@1 change",
        "i→t R@5 change",
        "t→i R@5 change",
    ]
    return md_table(header, rows)


def versus(results: dict[str, dict]) -> str:
    rows = []
    for basket, result in results.items():
        for control, diff in result["basket_minus"].items():
            rows.append([f"{basket} minus {LABELS[control]}"] + [cell(diff[m]) for m in METRICS])
    return md_table(["paired difference", *METRICS], rows)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--demo", type=Path, default=Path("/tmp/clean-demo"))
    parser.add_argument("--ensembles", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = args.demo / "run"
    if not run.is_dir():
        demo.run_demo(demo.DemoConfig(), args.demo)
    data = RunData(run)
    planted = np.array([bool(r.get("mislabeled")) for r in data.train])
    n = int(planted.sum())
    half_a, half_b = select.val_halves(len(data.val), 0)
    suspects = select.top_suspects(data.suspect, n)
    harmful = select.most_harmful(select.column_sum(data.scores, half_a), n)
    fill_basket(data, "suspects", suspects, "suspects", f"among the {n} most suspect")
    val_ids = [str(data.val[j]["id"]) for j in half_a]
    fill_basket(
        data, "harmful-a", harmful, "harmful", f"among the {n} most harmful to half a", val_ids
    )
    tcfg, where = train_config(run, {})
    load_before, t0 = os.getloadavg(), time.perf_counter()
    results = {}
    for name, measure in (("suspects", "b"), ("harmful-a", "auto")):
        cfg = CleanConfig(
            basket=name,
            ensembles=args.ensembles,
            measure=measure,
            workers=args.workers,
            bootstrap=args.bootstrap,
        )
        results[name] = evaluate_clean(run, cfg, tcfg, train_source=where)
        print(results[name]["summary"])
    seconds, load_after = time.perf_counter() - t0, os.getloadavg()
    removed_rows = {
        "suspects": suspects,
        "harmful-a": harmful,
        "clip-low": np.argsort(np.load(data.layout.clip_sim("train")), kind="stable")[:n],
        "random": np.random.default_rng([0, n, 5]).choice(len(data.train), n, False),
    }
    mislabeled = {k: int(planted[v].sum()) for k, v in removed_rows.items()}
    trained = sum(r["timings"]["models_trained"] for r in results.values())
    first = results["suspects"]
    body = f"""## Cleaning the demo: removal verified by retraining (`bench_clean`)

`python bench/bench_clean.py --ensembles {args.ensembles}` on the default demo ({len(data.train)} training pairs, {n} of them planted mislabeled; {len(data.val)} validation pairs), {time.strftime("%Y-%m-%d %H:%M")}. Two baskets of {n} pairs (as many as the planted mislabeled pairs): **suspects**, the run's top {n} of the suspect ranking (self-influence + caption rank; no validation scores used), and **harmful-a**, the {n} pairs with the most negative TRAK scores summed over validation half a ({len(half_a)} pairs, `select.val_halves(300, 0)`). Both measured on the other half, b ({len(half_b)} pairs). Per condition {len(first["seeds"])} models: the demo's 4-member ensemble retrained {args.ensembles} times (seeds {first["seeds"][0]}..{first["seeds"][-1]}, {where}), the same seeds in every condition (paired). Changes are against the models trained on every pair with the same seed; 95% bootstrap intervals over seeds and measured pairs ({args.bootstrap} resamples); **bold**: the interval excludes zero. R@k: retrieval among the {len(half_b)} measured pairs, per model, averaged. *TRAK predicted*: the linear datamodel's mean change of the measured margins, minus the removed pairs' scores summed.

{table(results, mislabeled)}

Paired differences between a basket and each control (positive: the basket's removal raised the metric more):

{versus(results)}

- suspects: {results["suspects"]["summary"]}.
- harmful-a: {results["harmful-a"]["summary"]}.

Cost: {trained} models trained in this call ({seconds:.0f} s; {len(first["seeds"]) * 5} models in all, the rest cached), {common_workers(args.workers)} workers of one thread; {machine()}. Load average (1/5/15 min) {fmt_load(load_before)} before, {fmt_load(load_after)} after; {"other jobs shared the cores" if max(load_before[0], load_after[0]) > 2.5 else "no other jobs to speak of"} (the evaluation's own workers make a load of about 2).
"""
    print(body)
    if not args.no_write:
        write_section("bench_clean", body)


def common_workers(workers: int) -> int:
    from engine.evaluate.common import workers as resolve

    return resolve(workers)


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in load)


if __name__ == "__main__":
    main()
