"""A planted failure traced to its cause (`trakview explain`, `basket add --causes`, `basket grow`,
`eval clean`), on a run whose pairs carry the ground truth ``planted_failure`` (the demo's
watermark, the second world's swapped colours).

(1) Finding the cause: the group of failing validation pairs (``--group``, as a user picks it) is
split in two halves; the training pairs are ranked on half a by trakview (the confusion: help to
the wrong matches; and harm to the group's margins) and by the baselines (lowest CLIP
similarity, the suspect ranking, self-influence, CLIP neighbours of the group's images, random).
Precision and recall of each ranking's top N (N = the cause's size); and of trakview's basket
grown by what its top causes share (``basket grow --by auto``, the demo's ground-truth columns
never offered).

(2) Fixing it: removing trakview's basket, the true cause, the CLIP filter's, the suspects' and a
random basket of the same size, retraining the run's ensemble (paired seeds), measured on the
held-out half of the group and on the rest of the validation set (`eval clean`).

    python bench/bench_failure.py --run demo-run/run --group column:source=stockshots --name demo
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench_common import arguments, machine, md_table, write_section
from engine import files
from engine.attribution.summaries import top_rows
from engine.cli.eval_cmds import train_config
from engine.curate import baskets, grow, select
from engine.errors import CurateError
from engine.evaluate.clean import CleanConfig, evaluate_clean
from engine.explain import report
from engine.explain.groups import select_group
from engine.explain.rules import GroupSpec
from engine.explore.view import RunView


def precision_recall(order: np.ndarray, truth: np.ndarray, n: int) -> tuple[float, float]:
    picked = np.asarray(order)[:n]
    hits = int(truth[picked].sum())
    return hits / max(1, len(picked)), hits / max(1, int(truth.sum()))


def fill(view: RunView, name: str, rows: np.ndarray, why: str, group: dict | None) -> None:
    have = baskets.find_basket(view.layout, name)
    if have is not None:
        (view.layout.basket(name)).unlink()
    chosen = group["chosen_with"] if group else []
    baskets.add_rows(view.layout, name, view.train, rows, why, "causes", "bench", chosen)
    if group:
        baskets.set_group(view.layout, name, group)


def cell(v: dict, digits: int = 3) -> str:
    lo, hi = v["ci"]
    bold = "**" if lo > 0 or hi < 0 else ""
    return f"{bold}{v['mean']:+.{digits}f}{bold} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--group", required=True, help="the failing group, RULE:VALUE")
    parser.add_argument("--name", default="demo")
    parser.add_argument("--ensembles", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--skip-retrain", action="store_true")
    args = parser.parse_args()
    t0, load_before = time.perf_counter(), os.getloadavg()
    view = RunView.load(args.run)
    truth = np.array([str(r.get("planted_failure")).lower() == "true" for r in view.train])
    n = int(truth.sum())
    spec = GroupSpec.parse(args.group)
    rows = select_group(report.group_source(view), spec)
    half_a, half_b = select.group_halves(rows, 0)
    victims = np.array([str(r.get("planted_failure")).lower() == "true" for r in view.val])
    t1 = time.perf_counter()
    found = report.attribute_confusion(view, half_a)
    confusion_s = time.perf_counter() - t1
    features = report.training_features(view)
    ranks = {"trakview: confusion (help to the wrong matches)": top_rows(found.causes, len(truth))}
    ranks["trakview: harm to the group's margins"] = top_rows(
        -view.scores.column_sum(half_a), len(truth)
    )
    clip = files.load_npy(view.layout.clip_sim("train"))
    ranks["lowest CLIP similarity (the CLIP filter)"] = np.argsort(clip, kind="stable")
    ranks["suspect ranking"] = top_rows(view.suspect, len(truth))
    ranks["self-influence"] = top_rows(files.load_npy(view.layout.self_influence), len(truth))
    train_img = files.load_npy(view.layout.embeddings("train", "image"))
    near = train_img @ view.val_image_emb[half_a].mean(0)
    ranks["CLIP: nearest training images to the group's"] = top_rows(near, len(truth))
    ranks["random"] = np.random.default_rng(0).permutation(len(truth))
    top100 = top_rows(found.causes, 100)
    shared = report.describe.describe(features, top100)
    try:
        growth = grow.grow("auto", top100, features, min_share=0.5)
        grown, grown_label, grown_why = growth.rows, growth.rule, f"grown: {growth.why}"
    except CurateError as exc:  # nothing shared enough: the confusion's own top N is the basket
        print(f"basket grow --by auto: {exc}", flush=True)
        grown = ranks["trakview: confusion (help to the wrong matches)"][:n]
        grown_label = f"nothing shared enough to grow by: the confusion's top {n}"
        grown_why = grown_label
    grown_order = np.concatenate(
        [
            grown[np.argsort(-found.causes[grown], kind="stable")],
            np.setdiff1d(
                ranks["trakview: confusion (help to the wrong matches)"], grown, assume_unique=False
            ),
        ]
    )
    rows_table = []
    for name, order in [
        (f"trakview: top 100 causes grown by what they share ({grown_label})", grown_order),
        *ranks.items(),
    ]:
        p, r = precision_recall(order, truth, n)
        rows_table.append([name, f"{p:.2f}", f"{r:.2f}"])
    gp, gr = int(truth[grown].sum()) / max(1, len(grown)), int(truth[grown].sum()) / n
    rows_table.append([f"the grown basket itself ({len(grown)} pairs)", f"{gp:.2f}", f"{gr:.2f}"])
    part1 = md_table(
        ["ranking (chosen on half a of the group)", f"precision@{n}", f"recall@{n}"], rows_table
    )
    shared_lines = "; ".join(
        f"{f.label()} {f.count}/{f.picked} ({f.base_share:.0%} of all)" for f in shared[:5]
    )
    body = (
        f"### {args.name}: the planted failure traced to its cause (`bench_failure`)\n\n"
        f"Run `{args.run}`: {len(view.train)} training pairs, {n} of them the planted cause (base rate {n / len(truth):.3f}); "
        f"the failing group `{spec.param}`: {len(rows)} validation pairs ({int(victims[rows].sum())} planted victims), "
        f"median caption rank {np.median(view.val_caption_rank[rows]):g} against {np.median(np.delete(view.val_caption_rank, rows)):g} for the rest. "
        f"Rankings use half a ({len(half_a)} pairs); trakview's confusion: {len(found.matches)} wrong matches of {found.pairs_confused} pairs among the training captions, "
        f"attributed in {confusion_s:.0f} s. What its top 100 causes share: {shared_lines}.\n\n"
        + part1
    )
    print(body, flush=True)
    if not args.skip_retrain:
        group = {
            "spec": spec.param,
            "val_ids": [str(view.val[int(j)]["id"]) for j in rows],
            "chosen_with": [str(view.val[int(j)]["id"]) for j in half_a],
            "held_out": [str(view.val[int(j)]["id"]) for j in half_b],
            "split_seed": 0,
            "ranking": "confusion",
        }
        fill(view, "bench-failure-trakview", grown, grown_why, group)
        fill(view, "bench-failure-truth", np.flatnonzero(truth), "the planted cause", group)
        tcfg, where = train_config(args.run, {})
        results = {}
        for name in ("bench-failure-trakview", "bench-failure-truth"):
            cfg = CleanConfig(
                basket=name,
                ensembles=args.ensembles,
                workers=args.workers,
                bootstrap=args.bootstrap,
            )
            results[name] = evaluate_clean(args.run, cfg, tcfg, train_source=where)
        lines = []
        for set_name in ("group", "rest"):
            for label, res, cond in (
                ("trakview's grown basket", results["bench-failure-trakview"], "basket"),
                ("the true cause", results["bench-failure-truth"], "basket"),
                ("lowest CLIP similarity", results["bench-failure-trakview"], "clip-low"),
                ("suspects", results["bench-failure-trakview"], "suspects"),
                ("random", results["bench-failure-trakview"], "random"),
            ):
                part = res["sets"][set_name]["conditions"][cond]
                diff = part.get("minus_full", {})
                lines.append(
                    [
                        set_name,
                        label,
                        part["removed"],
                        cell(diff["margin"]),
                        cell(diff["r5_all"], 2),
                        cell(diff["i2t_r5"], 2),
                    ]
                )
        t = results["bench-failure-trakview"]["sets"]["group"]["conditions"]
        truth_full = results["bench-failure-truth"]["sets"]["group"]["conditions"]["basket"][
            "minus_full"
        ]["margin"]["mean"]
        ratio = (
            t["basket"]["minus_full"]["margin"]["mean"] / truth_full if truth_full else float("nan")
        )
        vs_clip = results["bench-failure-trakview"]["sets"]["group"]["basket_minus"]["clip-low"][
            "margin"
        ]
        seeds = results["bench-failure-trakview"]["seeds"]
        body += (
            f"\n\nRemoving each basket and retraining the run's ensemble ({len(seeds)} models per condition, seeds {seeds[0]}..{seeds[-1]}, {where}); "
            f"changes against the models trained on every pair with the same seed, 95% bootstrap intervals over seeds and pairs, **bold**: excludes zero. "
            f"`group`: the {len(half_b)} held-out pairs of the group; `rest`: the validation pairs outside the group. R@5 (all): among every validation caption.\n\n"
            + md_table(
                [
                    "measured",
                    "removed",
                    "pairs",
                    "margin change",
                    "R@5 (all) change",
                    "R@5 (among measured) change",
                ],
                lines,
            )
            + f"\n\ntrakview's basket recovers {ratio:.0%} of the true cause's margin gain on the held-out half; against the CLIP filter's basket: {cell(vs_clip)}."
        )
    seconds, load_after = time.perf_counter() - t0, os.getloadavg()
    body += f"\n\n{seconds:.0f} s; {machine()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after."
    print(body)
    if not args.no_write:
        write_section(f"bench_failure_{args.name}", body)


if __name__ == "__main__":
    main()
