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

import concurrent.futures as cf
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from engine import files, parallel
from engine.curate import baskets, select
from engine.curate.effect import held_out_mask, summed_rows
from engine.errors import EvalError
from engine.evaluate import common, retrain
from engine.explore.scores import StoredScores
from engine.models import train
from engine.models.checkpoints import load_into
from engine.models.embed import encode
from engine.models.factory import create
from engine.models.retrieval import retrieval_ranks
from engine.run.layout import EvalCache, RunLayout
from engine.run.lock import run_lock
from engine.run.manifest import open_manifest

CONTROLS = {
    "clip-low": "as many pairs of the lowest CLIP image-caption similarity (the run's ensemble)",
    "random": "as many pairs drawn at random (seeded)",
}
METRICS = {
    "margin": "CLIP margin of the measured validation pairs (the model output TRAK attributes)",
    "i2t_r1": "image->text R@1 among the measured pairs",
    "i2t_r5": "image->text R@5",
    "t2i_r1": "text->image R@1",
    "t2i_r5": "text->image R@5",
}
MEASURES = ("auto", "all", "a", "b")


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
    n_train: int, rows: np.ndarray, clip_sim: np.ndarray, controls: list[str], seed: int
) -> dict[str, np.ndarray]:
    """The training rows each condition removes (``full``: none)."""
    n = len(rows)
    out = {"full": np.zeros(0, np.int64), "basket": np.sort(rows)}
    for name in controls:
        if name == "clip-low":
            out[name] = np.sort(np.argsort(clip_sim, kind="stable")[:n])
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
    measured, held_out = measured_rows(basket, val_ids, cfg.measure, cfg.split_seed)
    gone = removals(n_train, rows, files.load_npy(layout.clip_sim("train")), cfg.controls, cfg.seed)

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
    work = run_models(jobs, cache, run, manifest, train_cfg, device, cfg)

    values = {c: measure(retrain.load_outputs(cache, keys[c]), measured) for c in gone}
    scores = StoredScores(layout, manifest)
    conditions: dict[str, dict[str, Any]] = {
        c: {  # TRAK's prediction: minus the removed pairs' scores, mean over the measured pairs
            "removed": int(g.size),
            "predicted_margin_change": (
                float(-summed_rows(scores, g)[measured].mean()) if g.size else None
            ),
        }
        for c, g in gone.items()
    }
    means, diffs = paired_bootstrap(
        values,
        [(c, "full") for c in gone if c != "full"] + [("basket", c) for c in cfg.controls],
        cfg.bootstrap,
        cfg.seed,
        cfg.level,
    )
    for c in gone:
        conditions[c]["metrics"] = means[c]
        if c != "full":
            conditions[c]["minus_full"] = diffs[(c, "full")]
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
        "measured": {"n_val": int(measured.size), "held_out": held_out, "rule": cfg.measure},
        "metrics": METRICS,
        "conditions": conditions,
        "basket_minus": {c: diffs[("basket", c)] for c in cfg.controls},
        "summary": summary_line(conditions, {c: diffs[("basket", c)] for c in cfg.controls}),
        "notes": caveats(n_train, int(rows.size), n_models, train_cfg.batch_size),
        "timings": {**work, "total_seconds": round(time.perf_counter() - t0, 3)},
    }
    baskets.set_verification(layout, cfg.basket, result)
    return result


def measure(outputs: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per metric, (models, measured pairs) values from cached outputs (models, n_val, 1 + 2d):
    the margins, and 0/1 retrieval hits among the measured pairs."""
    d = (outputs.shape[2] - 1) // 2
    out = {"margin": outputs[:, rows, 0].astype(np.float64)}
    hits: dict[str, list[np.ndarray]] = {k: [] for k in METRICS if k != "margin"}
    for model in outputs[:, rows]:
        i2t, t2i = retrieval_ranks(model[:, 1 : 1 + d], model[:, 1 + d :])
        for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
            for k in (1, 5):
                hits[f"{direction}_r{k}"].append((ranks <= k).astype(np.float64))
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


# --- training the models ------------------------------------------------------------------


def model_outputs(
    ctx: retrain.RetrainContext, job: retrain.Job, work: Path, keep_model: bool
) -> tuple[np.ndarray, float]:
    """Trains one model (``retrain.train_and_measure``) and returns (n_val, 1 + 2d) float32: its
    validation margins, image and text embeddings; and the seconds it took."""
    t0 = time.perf_counter()
    margin = retrain.train_and_measure(ctx, job, work, keep_model=True)  # (n_val,)
    bundle = create(ctx.train_cfg.model, device=ctx.device)
    load_into(bundle.model, train.final_checkpoint(work, 0, ctx.train_cfg.epochs))
    with retrain.torch_threads(1):
        images, texts = encode(
            bundle.model,
            torch.from_numpy(ctx.val_images),
            torch.from_numpy(ctx.val_tokens),
            device=ctx.device,
        )  # (n_val, d) each
    if not keep_model:
        shutil.rmtree(work, ignore_errors=True)
    out = np.concatenate([margin[:, None], images.numpy(), texts.numpy()], axis=1)
    return out.astype(np.float32), time.perf_counter() - t0


def run_models(
    jobs: list[retrain.Job],
    cache: EvalCache,
    run: Path,
    manifest: Any,
    train_cfg: train.TrainConfig,
    device: str,
    cfg: CleanConfig,
) -> dict[str, Any]:
    """Trains the jobs not cached yet (side by side, one CPU thread each, as
    ``retrain.run_jobs``) and caches each model's outputs the moment it is measured."""
    todo = [j for j in jobs if not cache.output(j.key).is_file()]
    t0 = time.perf_counter()
    if todo:
        ctx = common.retrain_context(run, manifest, train_cfg, device)
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="training", unit="model")

        def save(job: retrain.Job, out: np.ndarray, seconds: float) -> None:
            meta = {
                "seed": job.seed,
                "n_rows": len(job.rows),
                "rows_sha256": retrain.rows_digest(job.rows),
            }
            files.write_json(cache.output_info(job.key), {**meta, "seconds": round(seconds, 3)})
            files.save_npy(cache.output(job.key), out)  # last: its presence means "done"
            bar.update(1)

        workers = common.workers(cfg.workers)
        if workers <= 1 or len(todo) <= 1 or device != "cpu":
            for job in todo:
                save(
                    job, *model_outputs(ctx, job, cache.checkpoints_dir / job.key, cfg.keep_models)
                )
        else:
            with parallel.Pool(min(workers, len(todo)), 1) as pool:
                futures = {
                    pool.submit(
                        model_outputs, ctx, job, cache.checkpoints_dir / job.key, cfg.keep_models
                    ): job
                    for job in todo
                }
                for future in cf.as_completed(futures):
                    save(futures[future], *future.result())
        bar.close()
    return {
        "models_trained": len(todo),
        "models_reused": len(jobs) - len(todo),
        "training_seconds": round(time.perf_counter() - t0, 3),
    }
