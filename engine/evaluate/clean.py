"""``trakview eval clean``: did removing a basket help? Retrain and measure.

The run's ensemble is retrained (the run's trainer, member r with seed train seed + r, as
``engine.evaluate.retrain`` trains every model) on every training pair (``full``), without the
basket's pairs (``basket``) and, as controls, without as many pairs of the lowest CLIP
image-caption similarity (``clip-low``) and without as many random pairs (``random``). Every
condition uses the same seeds, so condition minus ``full`` is paired model by model.

Measured on a held-out part of the validation set (``measure``): ``auto`` takes the validation
pairs whose scores chose none of the basket's pairs (all of them for a basket chosen without
validation scores, such as the suspects); ``a`` / ``b`` one half (``select.val_halves``). Per
model: every measured pair's CLIP margin (the attributed model output, ``retrain.model_output``)
and image->text / text->image R@1 and R@5 among the measured pairs. Intervals are a bootstrap
over models (seeds) and measured pairs jointly, the same resample for every condition, so the
intervals of differences are paired. TRAK's prediction of each removal, the mean over the
measured pairs of -sum(scores of the removed pairs), is reported beside the measurement.

Each model's output is cached in ``RUN/eval/clean/outputs/KEY.npy``: (n_val, 1 + 2d) float32,
its margins then its validation image and text embeddings; keys name the removal (the basket's
by a hash of its rows), so a basket measured again, or another basket of the same size, reuses
what was trained. The result is recorded in the basket (``verification``).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import files
from engine.curate import baskets, select
from engine.curate.effect import held_out_mask, summed_rows
from engine.errors import EvalError
from engine.evaluate import common, retrain
from engine.evaluate.choices import CONTROLS
from engine.evaluate.clean_train import run_models
from engine.explore.scores import StoredScores
from engine.models import train
from engine.models.embed import caption_ranks
from engine.models.retrieval import retrieval_ranks
from engine.run.layout import RunLayout
from engine.run.lock import run_lock
from engine.run.manifest import open_manifest

METRICS = {
    "margin": "CLIP margin of the measured validation pairs (the model output TRAK attributes)",
    "i2t_r1": "image->text R@1 among the measured pairs",
    "i2t_r5": "image->text R@5",
    "t2i_r1": "text->image R@1",
    "t2i_r5": "text->image R@5",
    "r5_all": "image->text R@5 among every validation caption (the run's caption rank <= 5)",
}
MEASURES = ("auto", "all", "a", "b")
# A basket chosen for a group (``basket add --causes N --for GROUP``) is measured on two sets:
GROUP_SETS = {
    "group": "the half of the group that did not choose the basket",
    "rest": "every validation pair outside the group (a fix that breaks them is no fix)",
}


@dataclass
class CleanConfig:
    """Settings of ``trakview eval clean`` (recorded with the result)."""

    basket: str  # the basket to verify
    ensembles: int = 1  # ensembles of the run's members per condition (seeds seed + 0 .. E*M-1)
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    measure: str = "auto"  # auto | all | a | b: which validation pairs are measured
    split_seed: int = 0  # seed of the validation halves (measure a / b)
    seed: int = 0  # seeds the random control and the bootstrap
    bootstrap: int = 1000
    level: float = 0.95
    workers: int = 0  # models trained side by side, one CPU thread each; 0 = one per core
    keep_models: bool = False


def evaluate_clean(
    run: str | os.PathLike,
    cfg: CleanConfig,
    train_cfg: train.TrainConfig,
    device: str = "cpu",
    overwrite: bool = False,
    train_source: str = "defaults",
) -> dict[str, Any]:
    """Retrains the run's ensemble with and without a basket (and the controls) and measures
    the held-out validation pairs; trains only what is not cached.

    Returns:
        The result, also recorded in the basket's file (``verification``).
    """
    open_manifest(run)  # a missing or unfinished run is refused before anything is written
    with run_lock(run):
        return _evaluate_clean(Path(run), cfg, train_cfg, device, overwrite, train_source)


def group_sets(basket: baskets.Basket, val_ids: list[str]) -> dict[str, np.ndarray]:
    """The validation rows of ``GROUP_SETS`` for a basket chosen for a group."""
    group = basket.group or {}
    index = {v: j for j, v in enumerate(val_ids)}
    missing = [v for v in group.get("val_ids", []) if v not in index]
    if missing:
        raise EvalError(
            f"basket {basket.name!r} was chosen for group {group.get('spec')!r}, whose pairs "
            f"{missing[:3]} this run does not have"
        )
    chose = set(basket.chosen_with_val)
    held = np.array(sorted(index[v] for v in group.get("held_out", []) if v not in chose), np.int64)
    members = np.array(sorted(index[v] for v in group["val_ids"]), np.int64)
    rest = np.setdiff1d(np.arange(len(val_ids)), members)
    if held.size == 0:
        raise EvalError(f"basket {basket.name!r} has no held-out half of its group to measure")
    return {"group": held, "rest": rest}


def measured_rows(basket: baskets.Basket, val_ids: list[str], measure: str, split_seed: int):
    """(rows, held_out): the validation rows to measure, and whether none chose the basket."""
    if measure not in MEASURES:
        raise EvalError(f"--measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    held = held_out_mask(basket, val_ids)
    if measure == "all":
        return np.arange(len(val_ids)), bool(held.all())
    if measure == "auto":
        if not held.any():
            raise EvalError(
                f"basket {basket.name!r} was chosen with every validation pair's scores: none is "
                "held out. Choose it on one half (trakview basket add --harmful N --val-half a) "
                "or pass --measure all (an optimistic measurement)"
            )
        return np.flatnonzero(held), True
    rows = select.val_halves(len(val_ids), split_seed)[measure == "b"]
    if not held[rows].all():
        raise EvalError(
            f"basket {basket.name!r} was chosen with {int((~held[rows]).sum())} pairs of "
            f"validation half {measure}: measure the other half"
        )
    return rows, True


def removals(
    n_train: int,
    rows: np.ndarray,
    clip_sim: np.ndarray,
    controls: list[str],
    seed: int,
    suspect: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The training rows each condition removes (``full``: none)."""
    n = len(rows)
    out = {"full": np.zeros(0, np.int64), "basket": np.sort(rows)}
    for name in controls:
        if name == "clip-low":
            out[name] = np.sort(np.argsort(clip_sim, kind="stable")[:n])
        elif name == "suspects":
            if suspect is None:
                raise EvalError("the run has no suspect ranking: drop the suspects control")
            out[name] = np.sort(select.top_suspects(suspect, n))
        elif name == "random":
            out[name] = np.sort(np.random.default_rng([seed, n, 5]).choice(n_train, n, False))
        else:
            raise EvalError(f"unknown control {name!r}; controls: {', '.join(CONTROLS)}")
    return out


def condition_key(name: str, removed: np.ndarray, seed: int) -> str:
    """Cache key stem of a condition: what it removes, not the basket's name."""
    if name == "full":
        return "full"
    if name == "basket":
        return f"basket-{retrain.rows_digest(removed)}"
    if name == "random":
        return f"random-n{len(removed)}-s{seed}"
    return f"{name}-n{len(removed)}"


def _evaluate_clean(
    run: Path,
    cfg: CleanConfig,
    train_cfg: train.TrainConfig,
    device: str,
    overwrite: bool,
    train_source: str,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    layout, manifest = RunLayout(run), open_manifest(run)
    n_train = manifest.counts.n_train
    train_records = files.JsonLines(layout.pairs("train"))
    val_ids = [str(r["id"]) for r in files.read_jsonl(layout.pairs("val"))]
    basket = baskets.read_basket(layout, cfg.basket)
    rows = baskets.basket_rows(basket, train_records)
    if rows.size == 0:
        raise EvalError(f"basket {cfg.basket!r} is empty: add pairs first")
    if cfg.ensembles < 1:
        raise EvalError(f"--ensembles must be at least 1, got {cfg.ensembles}")
    common.check_trainable(n_train - rows.size, train_cfg, "the cleaned training set")
    if basket.group and cfg.measure == "auto":
        sets = group_sets(basket, val_ids)
        held_out = True
    else:
        measured, held_out = measured_rows(basket, val_ids, cfg.measure, cfg.split_seed)
        sets = {"measured": measured}
    suspect = files.load_npy(layout.suspect) if layout.suspect.is_file() else None
    gone = removals(
        n_train, rows, files.load_npy(layout.clip_sim("train")), cfg.controls, cfg.seed, suspect
    )

    cache = layout.eval_cache("clean")
    identity = {**common.identity(manifest, train_cfg), "train_seed": train_cfg.seed}
    common.open_cache(cache, identity, overwrite)
    n_models = cfg.ensembles * train_cfg.members
    seeds = [train_cfg.seed + r for r in range(n_models)]
    everyone = np.arange(n_train)
    keys = {
        c: [f"{condition_key(c, g, cfg.seed)}-r{r:02d}" for r in range(n_models)]
        for c, g in gone.items()
    }
    jobs = [  # seed by seed: an interrupted evaluation leaves whole paired sets
        retrain.Job(keys[c][r], np.setdiff1d(everyone, gone[c]), seeds[r])
        for r in range(n_models)
        for c in gone
    ]
    work = run_models(jobs, cache, run, manifest, train_cfg, device, cfg.workers, cfg.keep_models)

    outputs = {c: retrain.load_outputs(cache, keys[c]) for c in gone}
    scores = StoredScores(layout, manifest)
    predicted = {c: -summed_rows(scores, g) if g.size else None for c, g in gone.items()}
    pairs = [(c, "full") for c in gone if c != "full"] + [("basket", c) for c in cfg.controls]
    results = {}
    for name, measured in sets.items():
        values = {c: measure(out, measured) for c, out in outputs.items()}
        means, diffs = paired_bootstrap(values, pairs, cfg.bootstrap, cfg.seed, cfg.level)
        conditions: dict[str, dict[str, Any]] = {}
        for c, g in gone.items():
            # TRAK's prediction: minus the removed pairs' scores, mean over the measured pairs
            change = predicted[c]
            conditions[c] = {
                "removed": int(g.size),
                "predicted_margin_change": None
                if change is None
                else float(change[measured].mean()),
                "metrics": means[c],
            }
            if c != "full":
                conditions[c]["minus_full"] = diffs[(c, "full")]
        results[name] = {
            "n_val": int(measured.size),
            "conditions": conditions,
            "basket_minus": {c: diffs[("basket", c)] for c in cfg.controls},
        }
    main = next(iter(results))
    conditions, measured = results[main]["conditions"], sets[main]
    result = {
        "format": common.FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "basket": cfg.basket,
        "basket_digest": basket.digest,
        "pairs": int(rows.size),
        "settings": asdict(cfg),
        "train": asdict(train_cfg),
        "train_source": train_source,
        "seeds": seeds,
        "measured": {
            "n_val": int(measured.size),
            "held_out": held_out,
            "rule": "group" if basket.group and cfg.measure == "auto" else cfg.measure,
        },
        "metrics": METRICS,
        "conditions": conditions,
        "basket_minus": results[main]["basket_minus"],
        "sets": results,
        "group": basket.group and {"spec": basket.group.get("spec"), "sets": GROUP_SETS},
        "summary": summary_line(conditions, results[main]["basket_minus"]),
        "notes": caveats(n_train, int(rows.size), n_models, train_cfg.batch_size),
        "timings": {**work, "total_seconds": round(time.perf_counter() - t0, 3)},
    }
    baskets.set_verification(layout, cfg.basket, result)
    return result


def measure(outputs: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per metric, (models, measured pairs) values from cached outputs (models, n_val, 1 + 2d):
    the margins, 0/1 retrieval hits among the measured pairs, and image->text R@5 among every
    validation caption (``r5_all``)."""
    d = (outputs.shape[2] - 1) // 2
    out = {"margin": outputs[:, rows, 0].astype(np.float64)}
    hits: dict[str, list[np.ndarray]] = {k: [] for k in METRICS if k != "margin"}
    for model, every in zip(outputs[:, rows], outputs, strict=True):
        i2t, t2i = retrieval_ranks(model[:, 1 : 1 + d], model[:, 1 + d :])
        for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
            for k in (1, 5):
                hits[f"{direction}_r{k}"].append((ranks <= k).astype(np.float64))
        all_ranks = caption_ranks(every[:, 1 : 1 + d], every[:, 1 + d :])[rows]
        hits["r5_all"].append((all_ranks <= 5).astype(np.float64))
    return {**out, **{k: np.stack(v) for k, v in hits.items()}}


def paired_bootstrap(
    values: dict[str, dict[str, np.ndarray]],
    pairs: list[tuple[str, str]],
    n_boot: int,
    seed: int,
    level: float,
) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
    """Means per condition and metric, and differences of condition pairs, with bootstrap
    intervals over models and measured pairs (the same resamples for every condition).

    Args:
        values: condition -> metric -> (models, pairs) values; model r of every condition has
            the same seed.
        pairs: (a, b) condition pairs whose difference a - b gets an interval.
    """
    first = next(iter(values.values()))
    n_models, n_pairs = next(iter(first.values())).shape
    rng = np.random.default_rng([seed, 11])
    weights = [
        (
            np.bincount(rng.integers(0, n_models, n_models), minlength=n_models),
            np.bincount(rng.integers(0, n_pairs, n_pairs), minlength=n_pairs),
        )
        for _ in range(n_boot)
    ]
    tails = [(1 - level) / 2, 1 - (1 - level) / 2]

    def stats(v: np.ndarray) -> dict[str, Any]:  # v: (models, pairs)
        reps = np.array([wm @ v @ wp for wm, wp in weights]) / (n_models * n_pairs)
        return {"mean": float(v.mean()), "ci": [float(x) for x in np.quantile(reps, tails)]}

    means = {c: {m: stats(v) for m, v in by_metric.items()} for c, by_metric in values.items()}
    diffs = {(a, b): {m: stats(values[a][m] - values[b][m]) for m in values[a]} for a, b in pairs}
    return means, diffs


def summary_line(conditions: dict[str, Any], basket_minus: dict[str, Any]) -> str:
    """One sentence: did removing the basket change the measured margins, and by more than the
    controls?"""
    effect = conditions["basket"]["minus_full"]["margin"]
    low, high = effect["ci"]
    decided = "excludes zero" if low > 0 or high < 0 else "includes zero"
    text = (
        f"removing the basket changed the measured mean margin by {effect['mean']:+.4f} "
        f"[{low:+.4f}, {high:+.4f}] (interval {decided})"
    )
    for control, diff in basket_minus.items():
        lo, hi = diff["margin"]["ci"]
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
        text += (
            f"; against {control}: {diff['margin']['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}], {verdict}"
        )
    return text


def caveats(n_train: int, removed: int, n_models: int, batch_size: int) -> list[str]:
    """What to keep in mind when reading a verification."""
    notes = []
    if n_models < 4:
        notes.append(
            f"{n_models} models per condition: intervals over so few seeds are optimistic; "
            "add --ensembles"
        )
    steps, fewer = n_train // batch_size, (n_train - removed) // batch_size
    if fewer < steps:
        notes.append(
            f"removing {removed} pairs also shortens each epoch from {steps} to {fewer} steps "
            f"(batch {batch_size}), in every removal alike: compare the basket with the controls, "
            "which remove as many pairs"
        )
    return notes
