"""Counterfactual evaluation of the default demo: LDS (with 95% intervals) of trakview's TRAK,
traker's stock pipeline, CLIP similarity, gradient dot product and random scores; the removal
experiment; LDS against the number of checkpoints M, proj_dim and lambda; and the wall time of
the default evaluation (`trakview eval lds` with its defaults).

Everything is cached (the evaluation's models under RUN/eval/, the variant runs and stock scores
under --work), so an interrupted benchmark continues where it stopped; --fresh deletes the LDS
cache first so that the evaluation is timed from scratch.

traker's stock pipeline is run as the seed tutorial does, with only the fixes it needs to run on
CPU (as bench_featurize.py): the embeddings are set per checkpoint without ``get_embeddings``
(which calls ``.cuda()``), the out-to-loss term is reshaped to (B, 1), float32 on CPU; same
checkpoints, proj_dim, attributed parameters and simulated batch size as trakview's run.

    python bench/bench_eval.py [--demo DIR] [--fresh] [--quick]
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench_common import (
    QUICK_DEMO,
    QUICK_DEMO_DIR,
    arguments,
    demo_pairs,
    machine,
    md_table,
    read_section,
    set_stock_embeddings,
    stock_traker,
    train_on,
    write_section,
)
from engine import demo, files
from engine.assemble.orchestrate import build
from engine.attribution.gradients import select_parameters
from engine.attribution.scoring import RegularizedScoreComputer
from engine.attribution.settings import BuildConfig
from engine.evaluate import stats
from engine.evaluate.lds import LdsConfig, evaluate_lds, load_lds_cache
from engine.evaluate.methods import (
    METHODS,
    method_scores,
    predict,
    store_trak_scores,
    trak_store_arrays,
)
from engine.evaluate.removal import RemoveConfig, evaluate_removal, sample_targets
from engine.evaluate.retrain import load_inputs
from engine.models import train
from engine.models.checkpoints import read_state_dict
from engine.models.factory import create
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest


def _set_stock_embeddings(run: Path, m: int) -> None:
    """Checkpoint m's training embeddings, as the stock pipeline reads them."""
    layout = RunLayout(run)
    img, txt = (
        torch.from_numpy(files.load_npy(layout.checkpoint_embeddings("train", modality, m)))
        for modality in ("image", "text")
    )
    set_stock_embeddings(img, txt)


def stock_scores(run: Path, save_dir: Path, batch: int = 50) -> tuple[np.ndarray, float]:
    """(n_train, n_val) scores of traker's stock CLIP pipeline on the run's checkpoints, seconds."""
    manifest = open_manifest(run)
    cfg = manifest.config
    torch.manual_seed(cfg.seed)  # the stock simulated batch draws from torch's global RNG
    tr_x, tr_t, va_x, va_t = (torch.from_numpy(a) for a in load_inputs(run, cfg.model))
    model = create(cfg.model).model
    ckpts = manifest.checkpoint_paths(run)
    t0 = time.perf_counter()
    traker = stock_traker(
        model,
        select_parameters(model, cfg.grad_params),
        len(tr_x),
        save_dir,
        cfg.proj_dim,
        cfg.sim_batch_size,
    )
    for m, path in enumerate(ckpts):
        _set_stock_embeddings(run, m)
        traker.load_checkpoint(read_state_dict(path), model_id=m)
        for s in range(0, len(tr_x), batch):
            n = min(batch, len(tr_x) - s)
            traker.featurize(batch=(tr_x[s : s + n], tr_t[s : s + n]), num_samples=n)
    traker.finalize_features()
    for m, path in enumerate(ckpts):
        _set_stock_embeddings(run, m)
        traker.start_scoring_checkpoint(
            exp_name="val",
            checkpoint=read_state_dict(path),
            model_id=m,
            num_targets=len(va_x),
        )
        for s in range(0, len(va_x), batch):
            n = min(batch, len(va_x) - s)
            traker.score(batch=(va_x[s : s + n], va_t[s : s + n]), num_samples=n)
    scores = np.asarray(traker.finalize_scores(exp_name="val"), dtype=np.float32)
    return scores, time.perf_counter() - t0


def lambda_scores(run: Path, n_models: int, lambda_rel: float) -> np.ndarray:
    """TRAK scores of the run's store, re-finalized with another relative ridge term."""
    grads, val, otl = trak_store_arrays(run, range(n_models), ("grads", "val", "out_to_loss"))
    computer = RegularizedScoreComputer(torch.float32, "cpu", lambda_rel=lambda_rel)
    features = []
    for x in grads:
        x = torch.from_numpy(np.array(x))  # a writable copy of the memmap
        features.append(computer.get_x_xtx_inv(x, computer.get_xtx(x)).numpy())
    return stats.trak_scores(features, val, otl)


def variant_run(demo_dir: Path, out: Path, checkpoints: list[Path], seed: int, **kw) -> Path:
    """A run of the demo's pairs with other checkpoints or settings (built once, then cached)."""
    if not RunLayout(out).manifest.is_file():
        cfg = BuildConfig(checkpoints=[str(p) for p in checkpoints], seed=seed, **kw)
        build(*demo_pairs(demo_dir), cfg, out)
    return out


def more_members(demo_dir: Path, work: Path, dcfg: demo.DemoConfig, members: int) -> list[Path]:
    """The demo's members plus new ones (the demo's trainer, seeds seed + K) up to ``members``."""
    folder = work / f"models{members}"
    for m in range(dcfg.members):
        link = folder / f"member-{m}"
        if not link.exists():
            folder.mkdir(parents=True, exist_ok=True)
            link.symlink_to((demo_dir / "models" / f"member-{m}").resolve())
    init = demo.train_base(dcfg, demo_dir / "base")
    tcfg = replace(demo.train_config(dcfg, init), members=members, save_epochs=[])
    return train_on(demo_pairs(demo_dir)[0], tcfg, folder)


def trajectory_members(demo_dir: Path, work: Path, dcfg: demo.DemoConfig, epochs: list[int]):
    """The demo's members trained again (same seeds, same weights) keeping ``epochs``; cached."""
    init = demo.train_base(dcfg, demo_dir / "base")
    tcfg = replace(demo.train_config(dcfg, init), save_epochs=sorted(set(epochs) - {dcfg.epochs}))
    folder = work / "traj"
    train_on(demo_pairs(demo_dir)[0], tcfg, folder)  # finished members are kept
    return folder


def final_ids(run: Path) -> list[int]:
    """Indices of the run's checkpoints that end a training run (the highest epoch_N.pt of each
    member folder)."""
    last: dict[Path, tuple[int, int]] = {}
    for i, p in enumerate(open_manifest(run).checkpoint_paths(run)):
        epoch = int(p.stem.split("_")[-1])
        if p.parent not in last or epoch > last[p.parent][0]:
            last[p.parent] = (epoch, i)
    return sorted(i for _, i in last.values())


def fmt_lds(m: dict) -> tuple[str, str, str]:
    diff = m.get("reference_minus_this")
    return (
        f"{m['lds']:+.3f}",
        f"[{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}] (±{m['half_width']:.3f})",
        f"{diff['mean']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]" if diff else "",
    )


def shared_cores(timing: dict, workers: int) -> str:
    """Whether other jobs ran beside a timed call: its own workers make a load of about
    ``workers``; more than that by half a core, at the start or the end, means company."""
    loads = [v for key in ("load_before", "load_after") for v in (timing.get(key) or [])[:1]]
    if loads and max(loads) > workers + 0.5:
        return "other jobs shared the cores"
    return f"no other jobs to speak of (its own {workers} workers make a load of about {workers})"


def load_text(load: list[float] | None) -> str:
    return "/".join(f"{v:.1f}" for v in load) if load else "not recorded"


def timed(path: Path, call: Callable[[], dict]) -> tuple[dict, float, dict | None]:
    """Runs an evaluation; records it in ``path`` when it trained every model (a from-scratch
    timing). Returns its result, its seconds and the last from-scratch timing (or None)."""
    before = os.getloadavg()
    t0 = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - t0
    timings = result["timings"]
    models = timings["models_trained"] + timings["models_reused"]
    if timings["models_trained"] == models:
        files.write_json(
            path,
            {
                "seconds": seconds,
                "load_before": before,
                "load_after": os.getloadavg(),
                "timings": timings,
                "models": models,
                "date": time.strftime("%Y-%m-%d %H:%M"),
            },
        )
    return result, seconds, files.read_json(path) if path.is_file() else None


def reliability(run: Path, lcfg: LdsConfig, tcfg: train.TrainConfig, n: int) -> float:
    """Split-half reliability of one model's outputs: a second model for the first n subsets
    (cached like the rest), then the default evaluation again (cached) to restore lds.json."""
    twice = replace(lcfg, subsets=n, models_per_subset=2, methods=["trak"])
    value = evaluate_lds(run, twice, tcfg, train_source="the demo's trainer")
    evaluate_lds(run, lcfg, tcfg, train_source="the demo's trainer")
    return value["split_half_reliability"]


LABELS = {
    "trak": "trakview TRAK",
    "stock": "traker 0.3.2 stock pipeline",
    "grad-dot": "gradient dot product (TracIn-style, every checkpoint)",
    "grad-dot-final": "gradient dot product (final checkpoints only)",
    "clip-image": "CLIP image similarity",
    "clip-text": "CLIP caption similarity",
    "clip-pair": "CLIP pair similarity (mean of both)",
    "random": "random",
}
REMOVED = {"trak": "top-k TRAK", "clip-pair": "top-k CLIP pair similarity", "random": "k random"}


def pending_removal() -> str:
    """While the removal experiment runs: the last finished one's table, marked as such."""
    text = read_section("bench_eval")
    head, tail = (
        "\n\n#### Removal: retrained without k training pairs",
        "\n\nWhat these figures say",
    )
    start = text.find(head)
    end = text.find(tail, start)
    last = text[start + len(head) : end] if start >= 0 and end > start else ""
    if last.startswith(" (the last finished run"):  # already a pending copy
        last = last.split("\n\n", 2)[-1]
    return (
        f"{head} (the last finished run, at earlier settings)\n\nThe removal experiment has "
        "not finished at the settings above (skipped with `--skip-removal`, or stopped: it "
        "trains 121 models of 3000 pairs, 86 min the last time); `python bench/bench_eval.py` "
        "runs it, continuing from its cached models. Until then, the table of the last finished "
        "run, with the TRAK scores of the demo's earlier default (the final checkpoint of each "
        "model, M = 4)." + ("\n\n" + last.lstrip("\n") if last else "")
    )


def against_zero(ci: list[float]) -> str:
    """Where an interval of a difference lies: above 0, below 0, or across it."""
    return "above 0" if ci[0] > 0 else "below 0" if ci[1] < 0 else "includes 0"


def verdicts(result: dict, name: str) -> list[str]:
    """Per baseline: is TRAK above it by more than the intervals (paired, and not overlapping)?"""
    trak = result["trak"]
    out = []
    for k, m in result.items():
        if k == "trak" or k not in LABELS:
            continue
        diff = m["reference_minus_this"]
        apart = trak["ci"][0] > m["ci"][1] or m["ci"][0] > trak["ci"][1]
        out.append(
            f"{name}: TRAK {trak['lds']:+.3f} vs {LABELS[k]} {m['lds']:+.3f}: difference "
            f"{diff['mean']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}] "
            f"(paired interval {against_zero(diff['ci'])}"
            + ("; the two intervals do not overlap)" if apart else "; the intervals overlap)")
        )
    return out


def removal_section(run: Path, args, tcfg: train.TrainConfig, work: Path) -> tuple[str, list[str]]:
    """The removal experiment (cached, timed when it trains everything) as markdown."""
    val_ids = [str(r["id"]) for r in files.read_jsonl(RunLayout(run).pairs("val"))]
    targets = sample_targets(val_ids, args.targets, seed=0)
    rcfg = RemoveConfig(
        targets=targets,
        ks=[int(k) for k in args.ks.split(",")],
        workers=args.workers,
        bootstrap=args.bootstrap,
    )
    removal, _, t = timed(
        work / f"removal-timing-{args.targets}.json",
        lambda: evaluate_removal(run, rcfg, tcfg, train_source="the demo's trainer"),
    )
    trak_change = {r["k"]: r["mean_delta"] for r in removal["summary"] if r["method"] == "trak"}
    rows, lines = [], []
    for r in removal["summary"]:
        diff = r.get("this_minus_trak")
        rows.append(
            (
                r["k"],
                REMOVED.get(r["method"], r["method"]),
                r["targets"],
                f"{r['mean_delta']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]",
                f"{r['median_delta']:+.3f}",
                f"{r['share_dropped']:.0%}",
                f"{diff['mean']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]" if diff else "",
            )
        )
        if diff:
            lines.append(
                f"Removal, k = {r['k']}: the target's margin changes by {r['mean_delta']:+.3f} "
                f"without {REMOVED.get(r['method'], r['method'])} and by {trak_change[r['k']]:+.3f}"
                f" without the top-k TRAK influencers: difference {diff['mean']:+.3f} "
                f"[{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}] (interval {against_zero(diff['ci'])})"
            )
    header = (
        "k",
        "removed",
        "targets",
        "mean change of the target's margin [95%]",
        "median",
        "margin dropped",
        "change minus TRAK's change [95%]",
    )
    print(md_table(header, rows))
    sums, deltas = [], []
    for entry in removal["targets"].values():
        for by_k in entry["removed"].values():
            for res in by_k.values():
                sums.append(res["trak_score_sum"])
                deltas.append(res["delta"])
    corr = float(np.corrcoef(sums, deltas)[0, 1])
    cost = "not timed from scratch"
    if t:
        load = (
            f"load average {load_text(t['load_before'])} before, {load_text(t['load_after'])} after"
            if t["load_before"]
            else t.get("note", "load average not recorded")
        )
        cost = (
            f"{t['models']} models trained from scratch in **{t['seconds']:.0f} s** ({t['date']}, "
            f"{args.workers or os.cpu_count()} workers of one thread; {load})"
        )
    md = (
        "\n\n#### Removal: retrained without k training pairs\n\n"
        f"{len(targets)} validation pairs drawn at random (seed 0). Per target and k, one model "
        "(the seed of the demo's member 0, the demo's trainer) trained without the target's top-k "
        "positive TRAK influencers, one without its top-k by CLIP pair similarity and one without "
        "k random pairs; change = the target's margin minus that of a model trained on every pair "
        "with the same seed (negative: the removed pairs helped). Intervals: bootstrap over "
        f"targets. Cost: {cost}; each model trains on ~3000 pairs (about twice a subset model). "
        "Correlation, over all removals, between the removed pairs' summed TRAK score for the "
        f"target and the actual change: {corr:+.3f} (TRAK predicts a larger drop for a larger "
        "sum: the expected sign is negative).\n\n" + md_table(header, rows)
    )
    return md, lines


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--demo", type=Path, default=Path("/tmp/trakview-bench/demo"))
    parser.add_argument("--work", type=Path, default=None, help="default: DEMO/bench-eval")
    parser.add_argument("--subsets", type=int, default=LdsConfig.subsets)
    parser.add_argument("--models-per-subset", type=int, default=1)
    parser.add_argument("--reliability-subsets", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--ks", default="10,50")
    parser.add_argument("--ms", default="1,2,4,8")
    parser.add_argument("--snapshots", default="1,2,3,4", help="checkpoints per model to compare")
    parser.add_argument(
        "--more-subsets",
        type=int,
        default=128,
        help="then extend the evaluation to this many subsets (narrower intervals, and the "
        "subsets past --subsets as a held-out check of the defaults chosen on the first ones); "
        "0: no",
    )
    parser.add_argument("--proj-dims", default="128,256,512,1024,2048")
    parser.add_argument("--lambdas", default="1e-4,1e-3,1e-2,1e-1,1")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--fresh", action="store_true", help="time the LDS evaluation from scratch")
    parser.add_argument("--skip-removal", action="store_true")
    parser.add_argument("--skip-variants", action="store_true", help="no M / proj_dim / stock")
    parser.add_argument(
        "--quick", action="store_true", help="a small world, minutes (implies --no-write)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads outside the retraining workers"
    )
    args = parser.parse_args()
    dcfg = demo.DemoConfig()
    if args.quick:
        dcfg, args.no_write = QUICK_DEMO, True
        args.demo = QUICK_DEMO_DIR if args.demo == parser.get_default("demo") else args.demo
        args.subsets, args.targets, args.ks, args.reliability_subsets = 8, 3, "5,20", 4
        args.ms, args.proj_dims, args.bootstrap = "1,2,4", "64,128", 200
        args.snapshots, args.more_subsets = "1,2", 12
    work = args.work or args.demo / "bench-eval"
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    run = demo.run_demo(dcfg, args.demo)
    manifest = open_manifest(run)
    proj_default, n_default = manifest.counts.proj_dim, manifest.counts.n_checkpoints
    tcfg = demo.train_config(dcfg, demo.train_base(dcfg, args.demo / "base"))
    finals = final_ids(run)

    # 1. the default evaluation, timed (the last from-scratch timing is kept in WORK)
    if args.fresh:
        shutil.rmtree(RunLayout(run).eval_cache("lds").folder, ignore_errors=True)
    lcfg = LdsConfig(
        subsets=args.subsets,
        models_per_subset=args.models_per_subset,
        workers=args.workers,
        bootstrap=args.bootstrap,
    )
    lds, seconds, lds_time = timed(
        work / f"lds-timing-{args.subsets}x{args.models_per_subset}.json",
        lambda: evaluate_lds(run, lcfg, tcfg, train_source="the demo's trainer"),
    )
    print(f"LDS evaluation: {seconds:.0f} s, {lds['timings']}", flush=True)
    rel = (
        reliability(run, lcfg, tcfg, args.reliability_subsets) if args.reliability_subsets else None
    )
    masks, outputs = load_lds_cache(run, args.subsets)

    # 2. every score matrix, scored against the same subset models with paired resamples
    scores = method_scores(run, list(METHODS))
    scores["grad-dot-final"] = stats.grad_dot_scores(
        *trak_store_arrays(run, finals, ("grads", "val"))
    )
    costs: dict[str, str] = {}
    at_max_m: list[tuple] = []
    at_snap: list[tuple] = []
    if not args.skip_variants:
        path = work / f"stock-M{n_default}.npy"
        if not path.is_file():
            shutil.rmtree(work / "stock-store", ignore_errors=True)
            stock, stock_seconds = stock_scores(run, work / "stock-store")
            files.save_npy(path, stock)
            files.write_json(work / "stock-seconds.json", {"seconds": stock_seconds})
        scores["stock"] = files.load_npy(path)
        costs["stock"] = f"{files.read_json(work / 'stock-seconds.json')['seconds']:.0f} s"
        ms = [int(m) for m in args.ms.split(",")]
        ckpts = more_members(args.demo, work, dcfg, max(ms))
        run_m = variant_run(args.demo, work / f"run-M{max(ms)}", ckpts, dcfg.seed)
        for m in ms:
            scores[f"M={m}"] = store_trak_scores(run_m, list(range(m)))
        for k in [int(p) for p in args.proj_dims.split(",")]:
            if k == proj_default:  # the final checkpoints of the demo's models: M=members
                scores[f"proj_dim={k}"] = store_trak_scores(run_m, list(range(dcfg.members)))
                continue
            out = variant_run(
                args.demo, work / f"run-p{k}", ckpts[: dcfg.members], dcfg.seed, proj_dim=k
            )
            scores[f"proj_dim={k}"] = files.load_npy(RunLayout(out).scores)
        snaps = [int(v) for v in args.snapshots.split(",")]
        snap_runs: dict[int, Path] = {}
        traj = work / "traj"
        if set(snaps) - {dcfg.snapshots}:  # other snapshot counts: their epochs of the models
            traj = trajectory_members(
                args.demo,
                work,
                dcfg,
                sorted({e for n in snaps for e in train.snapshot_epochs(dcfg.epochs, n)}),
            )
        for n in snaps:
            epochs = train.snapshot_epochs(dcfg.epochs, n)
            name = f"snapshots={n} (epochs {','.join(map(str, epochs))})"
            if n == dcfg.snapshots:
                scores[name] = scores["trak"]
                continue
            paths = [
                train.member_dir(traj, m) / f"epoch_{e}.pt"
                for m in range(dcfg.members)
                for e in epochs
            ]
            out = variant_run(args.demo, work / f"run-S{n}", paths, dcfg.seed)
            scores[name] = files.load_npy(RunLayout(out).scores)
            snap_runs[n] = out
        for lam in [float(v) for v in args.lambdas.split(",")]:
            scores[f"lambda_rel={lam:g}"] = lambda_scores(run, n_default, lam)
    preds = {k: predict(v, masks) for k, v in scores.items()}
    result = stats.bootstrap_lds(preds, outputs, args.bootstrap, seed=0)
    lines = verdicts(result, f"M={n_default}")
    if not args.skip_variants:  # every method again with the larger ensemble's checkpoints
        big = method_scores(run_m, list(METHODS))
        preds_big = {k: predict(v, masks) for k, v in big.items()}
        res_big = stats.bootstrap_lds(preds_big, outputs, args.bootstrap, seed=0)
        order = sorted(res_big, key=lambda k: -res_big[k]["lds"])
        at_max_m = [(f"{LABELS[k]} (M={max(ms)})", *fmt_lds(res_big[k])) for k in order]
        lines += verdicts(res_big, f"M={max(ms)}")
        if snap_runs and max(snap_runs) > dcfg.snapshots:  # every method again, more snapshots
            n_s = max(snap_runs)
            srun = snap_runs[n_s]
            big_s = method_scores(srun, list(METHODS))
            big_s["grad-dot-final"] = stats.grad_dot_scores(
                *trak_store_arrays(srun, final_ids(srun), ("grads", "val"))
            )
            preds_s = {k: predict(v, masks) for k, v in big_s.items()}
            res_s = stats.bootstrap_lds(preds_s, outputs, args.bootstrap, seed=0)
            n_ck = open_manifest(srun).counts.n_checkpoints
            tag = f"{dcfg.members} models x {n_s} snapshots (M={n_ck})"
            at_snap = [
                (f"{LABELS[k]} ({tag})", *fmt_lds(res_s[k]))
                for k in sorted(res_s, key=lambda k: -res_s[k]["lds"])
            ]
            lines += verdicts(res_s, tag)

    main_rows = [
        (
            LABELS[k]
            + (f" (M={n_default}, proj_dim {proj_default})" if k in ("trak", "stock") else ""),
            *fmt_lds(result[k]),
        )
        for k in sorted((k for k in LABELS if k in result), key=lambda k: -result[k]["lds"])
    ]
    print(md_table(("method", "LDS", "95% interval", "TRAK minus method"), main_rows))
    sweep_rows = [
        (k, *fmt_lds(result[k]))
        for k in result
        if k.startswith(("M=", "snapshots=", "proj_dim=", "lambda_rel="))
    ]

    # 2b. more subsets: narrower intervals, and a held-out check on the subsets added
    more_md = ""
    if args.more_subsets > args.subsets:
        before = os.getloadavg()
        t0 = time.perf_counter()
        more = evaluate_lds(
            run, replace(lcfg, subsets=args.more_subsets), tcfg, train_source="the demo's trainer"
        )
        more_seconds = time.perf_counter() - t0
        print(f"extended to {args.more_subsets} subsets: {more_seconds:.0f} s", flush=True)
        masks_all, outputs_all = load_lds_cache(run, args.more_subsets)
        main_keys = [k for k in LABELS if k in scores]
        blocks = {
            f"all {args.more_subsets} subsets": slice(None),
            f"held out: subsets {args.subsets}-{args.more_subsets - 1}": slice(args.subsets, None),
        }
        more_scores = {k: scores[k] for k in main_keys}
        for k in scores:  # the other snapshot counts: was the default's choice made on noise?
            if k.startswith("snapshots=") and not k.startswith(f"snapshots={dcfg.snapshots} "):
                more_scores[k] = scores[k]
        if at_snap:  # the snapshot run and its own gradient dot product, on the new subsets too
            more_scores[f"TRAK, {tag}"] = big_s["trak"]
            more_scores[f"gradient dot product, {tag}"] = big_s["grad-dot"]
        more_rows = []
        for label, rows_ in blocks.items():
            preds_m = {k: predict(v, masks_all[rows_]) for k, v in more_scores.items()}
            res_m = stats.bootstrap_lds(preds_m, outputs_all[rows_], args.bootstrap, seed=0)
            order = sorted(res_m, key=lambda k: -res_m[k]["lds"])
            more_rows += [(label, LABELS.get(k, k), *fmt_lds(res_m[k])) for k in order]
            if at_snap:
                a, b = f"TRAK, {tag}", f"gradient dot product, {tag}"
                pair = stats.bootstrap_lds(
                    {"trak": preds_m[a], "grad-dot": preds_m[b], "trak-m4": preds_m["trak"]},
                    outputs_all[rows_],
                    args.bootstrap,
                    seed=0,
                )
                d, d4 = pair["grad-dot"]["reference_minus_this"], pair["trak-m4"]
                lines.append(
                    f"{label}: TRAK with {tag} {pair['trak']['lds']:+.3f} minus its gradient dot "
                    f"product {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]; minus the "
                    f"default's TRAK {d4['reference_minus_this']['mean']:+.3f} "
                    f"[{d4['reference_minus_this']['ci'][0]:+.3f}, "
                    f"{d4['reference_minus_this']['ci'][1]:+.3f}]"
                )
            lines += verdicts(res_m, f"{label}, M={n_default}")
        trained = more["timings"]["models_trained"]
        more_md = (
            f"\n\n#### {args.more_subsets} subsets\n\nThe evaluation extended from "
            f"{args.subsets} to {args.more_subsets} subsets ("
            + (
                f"{trained} models trained in {more_seconds:.0f} s, load average "
                f"{load_text(list(before))} before, {load_text(list(os.getloadavg()))} after"
                if trained
                else "every model cached from an earlier call; about 10 s per model with 2 "
                "workers at load 2-3"
            )
            + "). The demo's defaults (checkpoints, "
            f"snapshots) were chosen by LDS on the first {args.subsets} subsets; subsets "
            f"{args.subsets}-{args.more_subsets - 1} are new models, so their rows are a check "
            "free of that choice.\n\n"
            + md_table(
                ("subsets", "method", "LDS", "95% interval", "TRAK minus method [95%]"), more_rows
            )
        )

    # 3. BENCHMARKS.md, written now and again with the removal experiment (which takes longest)
    note = (
        f"Default demo (`trakview demo`: {manifest.counts.n_train} train / "
        f"{manifest.counts.n_val} val pairs, {dcfg.members} x {dcfg.model} fine-tuned "
        f"{dcfg.epochs} epochs from the demo's base model, {dcfg.snapshots} checkpoints of each (epochs "
        f"{', '.join(map(str, train.snapshot_epochs(dcfg.epochs, dcfg.snapshots)))}): "
        f"M = {n_default} checkpoints, proj_dim {proj_default}). `trakview eval lds` defaults: {args.subsets} random "
        f"halves of the training set x {args.models_per_subset} model (the demo's trainer), the "
        f"CLIP margin of all {manifest.counts.n_val} validation pairs; every method is "
        f"scored against the same models and the same {args.bootstrap} bootstrap resamples "
        f"(subsets and validation pairs), so 'TRAK minus method' is a paired interval. "
        f"{machine()}. `python bench/bench_eval.py --fresh`"
    )
    if lds_time:
        workers = lcfg.workers or os.cpu_count()
        wall = (
            f"Wall time of the LDS evaluation from scratch ({lds_time['models']} models trained, "
            f"{lds_time['date']}): **{lds_time['seconds']:.0f} s** (training "
            f"{lds_time['timings']['training_seconds']:.0f} s, {workers} "
            f"workers of one thread); target < 1800 s. Load average (1/5/15 min) "
            f"{load_text(lds_time['load_before'])} before, {load_text(lds_time['load_after'])} "
            f"after: {shared_cores(lds_time, workers)}. Stock traker "
            f"scores: {costs.get('stock', 'not run')}."
        )
    else:
        wall = "The LDS evaluation was not timed from scratch here (run with --fresh)."
    if rel is not None:
        wall += (
            f"\n\nHow far seed noise limits the values: two models trained on the same subset "
            f"with different seeds agree on the ranking of the subsets with a Spearman "
            f"correlation of {rel:.2f} (mean over validation pairs; the first "
            f"{args.reliability_subsets} "
            f"subsets, a second model each). The seed noise of one model caps the LDS that even "
            f"a perfect predictor of the expected margin could reach at about "
            f"sqrt({rel:.2f}) = {rel**0.5:.2f}; more models per subset "
            "(`--models-per-subset`) raise every method's LDS, more subsets narrow the intervals."
        )
    body = f"### Counterfactual evaluation: LDS and removal\n\n{note}\n\n{wall}\n\n" + md_table(
        ("method", "LDS", "95% interval", "TRAK minus method [95%]"), main_rows
    )
    if sweep_rows:
        body += (
            "\n\n#### LDS of trakview TRAK against M, proj_dim and lambda\n\n"
            f"M=1..{max(ms)}: the final checkpoints of the first M of {max(ms)} independently "
            f"trained models (the demo's {dcfg.members} and {max(ms) - dcfg.members} more, "
            f"the demo's trainer, seeds {dcfg.members}-{max(ms) - 1}), proj_dim {proj_default}. "
            f"snapshots=S: the demo's {dcfg.members} models with S checkpoints of each along "
            f"training (S={dcfg.snapshots}, {n_default} checkpoints: the default). proj_dim: the final checkpoints "
            f"of the demo's {dcfg.members} models (compare with M={dcfg.members}). lambda_rel: "
            "the demo run's store re-finalized (default 1e-3). Same subset models and resamples as above; the last column is the default "
            "minus the variant.\n\n"
            + md_table(
                ("variant", "LDS", "95% interval", "default minus variant [95%]"), sweep_rows
            )
        )
    if at_max_m:
        body += (
            f"\n\n#### Every method with the {max(ms)}-checkpoint ensemble\n\n"
            f"The same subset models and resamples; TRAK, the gradient dot product and the CLIP "
            f"embeddings of the {max(ms)} checkpoints of the M sweep.\n\n"
            + md_table(("method", "LDS", "95% interval", "TRAK minus method [95%]"), at_max_m)
        )
    if at_snap:
        body += (
            "\n\n#### Every method with several checkpoints along each training run\n\n"
            "The same subset models and resamples; the run with the most snapshots per model "
            "of the sweep above (no more training than the demo: its models' earlier epochs). "
            "Gradient dot product: over all its checkpoints (TracIn's sum along training) and over "
            "the final ones.\n\n"
            + md_table(("method", "LDS", "95% interval", "TRAK minus method [95%]"), at_snap)
        )
    body += more_md

    def section(removal_md: str, more_lines: list[str]) -> str:
        return (
            body
            + removal_md
            + "\n\nWhat these figures say (generated from them):\n\n"
            + "\n".join(f"- {line}" for line in lines + more_lines)
        )

    if not args.no_write:
        pending = pending_removal()  # read before the write replaces it
        write_section("bench_eval", section(pending, []))

    # 4. removal
    if args.skip_removal:  # the section keeps the last finished removal table, marked as such
        print("\n".join(lines))
        return
    removal_md, removal_lines = removal_section(run, args, tcfg, work)
    print("\n".join(lines + removal_lines))
    if not args.no_write:
        write_section("bench_eval", section(removal_md, removal_lines))


if __name__ == "__main__":
    main()
