"""``trakview eval``: are a run's attributions right? Counterfactual checks with retrained models.

Two checks of the TRAK paper (Park et al. 2023):

- **LDS**, the linear datamodeling score (Section 2): draw N random training subsets S_s (each a
  fraction alpha of the pairs), train models on each with the run's trainer, and measure the
  model output y_s,j (the attributed CLIP margin, ``engine.retrain.model_output``) of every
  validation pair j. A method with scores tau predicts g_s,j = sum_{i in S_s} tau_ij; its LDS for
  target j is the Spearman correlation over subsets of g_.,j and y_.,j, and the LDS is the mean
  over targets. The confidence interval is a bootstrap over subsets and targets jointly, paired
  across methods (the same resamples), so differences between methods get their own interval.
- **Removal** (Section 5, counterfactual evaluation): retrain without the top-k positive
  influencers of a target (and, as controls, without the top-k by CLIP similarity and without k
  random pairs) and measure how the target's margin changes against a model trained on every
  pair with the same seed.

The statistics (ranks, Spearman, predictions, bootstrap, score matrices) live in
``engine.evalstats``; ``evaluate_lds`` / ``evaluate_removal`` read the run, train what is not
cached under ``RUN/eval/`` and write ``RUN/eval/lds.json`` / ``RUN/eval/remove.json``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import evalstats, retrain, runs, store, train
from engine.evalstats import REFERENCE

log = logging.getLogger(__name__)

FORMAT = 1  # version of eval/lds.json and eval/remove.json
METHODS = {
    "trak": "trakview's TRAK scores (scores.npy)",
    "clip-image": "cosine similarity of the training image to the target image (ensemble CLIP)",
    "clip-text": "cosine similarity of the training caption to the target caption (ensemble CLIP)",
    "clip-pair": "mean of the image-image and caption-caption CLIP similarities",
    "grad-dot": "gradient dot product of the training pair and the target at each of the run's "
    "M checkpoints, averaged (TracIn-style; TracIn's sum over training when the checkpoints are "
    "epochs of one run), in the run's projected gradients",
    "random": "independent standard normal scores (seeded)",
}


class EvalError(ValueError):
    """An evaluation that cannot run as asked (bad settings, a run without what it needs)."""


class EvalMismatchError(ValueError):
    """Cached evaluation models were made with other settings than the ones given now."""


@dataclass
class LdsConfig:
    """Settings of ``trakview eval lds`` (recorded in lds.json)."""

    subsets: int = 64  # random training subsets, one or more models trained on each
    fraction: float = 0.5  # share of the training pairs in each subset
    models_per_subset: int = 1  # models per subset (their outputs are averaged)
    seed: int = 0  # seeds the subsets, the models' seeds, the random baseline and the bootstrap
    bootstrap: int = 1000  # bootstrap resamples of the confidence interval
    level: float = 0.95  # confidence level
    workers: int = 0  # models trained side by side, one CPU thread each; 0 = one per core
    keep_models: bool = False  # keep the subset models' checkpoints (13 MB each for tiny)
    methods: list[str] = field(default_factory=lambda: list(METHODS))


@dataclass
class RemoveConfig:
    """Settings of ``trakview eval remove`` (recorded in remove.json)."""

    targets: list[str] = field(default_factory=list)  # validation ids
    ks: list[int] = field(default_factory=lambda: [10, 50])  # pairs removed per target
    methods: list[str] = field(default_factory=lambda: ["trak", "clip-pair", "random"])
    models: int = 1  # models per (target, method, k): seeds train seed + 0..models-1
    seed: int = 0  # seeds the random removals and the bootstrap
    bootstrap: int = 1000
    level: float = 0.95
    workers: int = 0
    keep_models: bool = False


# --- scores of the methods ---------------------------------------------------------------------


def method_scores(run: Path, names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """(n_train, n_val) scores of each named method (``METHODS``) for a run."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise EvalError(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    run = Path(run)
    n_models = runs.read_manifest(run)["counts"]["n_checkpoints"]
    emb = {
        (s, m): store.load_npy(store.embeddings_path(run, s, m))
        for s in ("train", "val")
        for m in ("image", "text")
    }
    out = {}
    for name in names:
        if name == "trak":
            out[name] = store.load_npy(store.scores_path(run))
        elif name in ("clip-image", "clip-text"):
            mod = name.split("-")[1]
            out[name] = emb[("train", mod)] @ emb[("val", mod)].T
        elif name == "clip-pair":
            image = emb[("train", "image")] @ emb[("val", "image")].T
            out[name] = (image + emb[("train", "text")] @ emb[("val", "text")].T) / 2
        elif name == "grad-dot":
            out[name] = evalstats.grad_dot_scores(
                *trak_store_arrays(run, range(n_models), ("grads", "val"))
            )
        else:
            n_train, n_val = emb[("train", "image")].shape[0], emb[("val", "image")].shape[0]
            out[name] = evalstats.random_scores(n_train, n_val, seed)
    return out


def trak_store_arrays(run: Path, model_ids: Any, kinds: tuple[str, ...]) -> list[list[np.ndarray]]:
    """Per kind, the arrays of checkpoints ``model_ids`` in the run's traker store (memmaps):
    ``grads`` (X_m), ``features`` (phi_m), ``val`` (target gradients), ``out_to_loss``."""
    paths = {
        "features": store.trak_features_path,
        "out_to_loss": store.trak_out_to_loss_path,
        "val": store.trak_target_grads_path,
        "grads": lambda r, m: store.trak_dir(r) / str(m) / "grads.mmap",
    }
    result = []
    for kind in kinds:
        arrays = []
        for m in model_ids:
            path = paths[kind](run, m)
            if not path.is_file():
                raise EvalError(f"{path} is missing: the run's trak/ store is needed for this")
            arrays.append(np.load(path, mmap_mode="r"))
        result.append(arrays)
    return result


def store_trak_scores(run: Path, model_ids: list[int]) -> np.ndarray:
    """TRAK scores from the run's traker store using only checkpoints ``model_ids``."""
    return evalstats.trak_scores(
        *trak_store_arrays(Path(run), model_ids, ("features", "val", "out_to_loss"))
    )


# --- where results live ------------------------------------------------------------------------


def eval_dir(run: Path) -> Path:
    return Path(run) / "eval"


def lds_path(run: Path) -> Path:
    """Results of ``trakview eval lds``."""
    return eval_dir(run) / "lds.json"


def removal_path(run: Path) -> Path:
    """Results of ``trakview eval remove``."""
    return eval_dir(run) / "remove.json"


def read_lds(run: Path) -> dict[str, Any] | None:
    path = lds_path(run)
    return store.read_json(path) if path.is_file() else None


def read_removal(run: Path) -> dict[str, Any] | None:
    path = removal_path(run)
    return store.read_json(path) if path.is_file() else None


def _open_cache(folder: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Creates a cache folder, or checks that an existing one was made with the same settings."""
    path = folder / "config.json"
    if path.is_file() and not overwrite:
        have = store.read_json(path)
        diffs = [f"{k}: {have.get(k)!r} -> {v!r}" for k, v in identity.items() if have.get(k) != v]
        if diffs:
            raise EvalMismatchError(
                f"{folder} holds models made with other settings ({'; '.join(diffs[:3])}). "
                "Pass --overwrite to delete them and start again, or use the same settings"
            )
        return
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    store.write_json(path, identity)


def _context(
    run: Path, manifest: dict[str, Any], train_cfg: train.TrainConfig, device: str
) -> retrain.RetrainContext:
    cfg = manifest["config"]
    n_train = manifest["counts"]["n_train"]
    draws = retrain.target_draws(
        n_train, cfg["sim_batch_size"], cfg["seed"], manifest["counts"]["n_checkpoints"]
    )
    inputs = retrain.load_inputs(run, cfg["model"])
    return retrain.RetrainContext(*inputs, draws=draws, train_cfg=train_cfg, device=device)


def _identity(manifest: dict[str, Any], train_cfg: train.TrainConfig) -> dict[str, Any]:
    cfg, counts = manifest["config"], manifest["counts"]
    return {
        "format": FORMAT,
        "n_train": counts["n_train"],
        "n_val": counts["n_val"],
        "train": retrain.train_settings(train_cfg),
        "model_output": {
            "sim_batch_size": cfg["sim_batch_size"],
            "seed": cfg["seed"],
            "draws": counts["n_checkpoints"],
        },
    }


def _workers(requested: int) -> int:
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


def _check_trainable(n_rows: int, train_cfg: train.TrainConfig, what: str) -> None:
    if n_rows < train_cfg.batch_size:
        raise EvalError(
            f"{what} has {n_rows} training pairs, fewer than one batch ({train_cfg.batch_size}); "
            "raise --fraction or lower --batch-size"
        )


# --- LDS ---------------------------------------------------------------------------------------


def evaluate_lds(
    run: str | os.PathLike,
    cfg: LdsConfig,
    train_cfg: train.TrainConfig,
    device: str = "cpu",
    overwrite: bool = False,
    train_source: str = "defaults",
) -> dict[str, Any]:
    """LDS of the run's scores and the baselines; trains the subset models not cached yet.

    Args:
        run: a finished run directory.
        cfg: subsets, fraction, models per subset, seed, bootstrap, workers.
        train_cfg: the trainer of the run's checkpoints (model, epochs, lr, batch size, ...).
        overwrite: delete cached subset models made with other settings.
        train_source: where ``train_cfg`` came from (recorded).

    Returns:
        The content of ``RUN/eval/lds.json`` (also written there).
    """
    t0 = time.perf_counter()
    run = Path(run)
    manifest = runs.read_manifest(run)
    n_train = manifest["counts"]["n_train"]
    if not 0 < cfg.fraction < 1:
        raise EvalError(f"--fraction must be between 0 and 1 (exclusive), got {cfg.fraction}")
    if cfg.subsets < 3:
        raise EvalError(f"--subsets must be at least 3 (a rank correlation), got {cfg.subsets}")
    if not 1 <= cfg.models_per_subset <= 99:
        raise EvalError(f"--models-per-subset must be 1..99, got {cfg.models_per_subset}")
    _check_trainable(int(round(cfg.fraction * n_train)), train_cfg, "each subset")
    scores = method_scores(run, cfg.methods, seed=cfg.seed)

    folder = eval_dir(run) / "lds"
    identity = {**_identity(manifest, train_cfg), "fraction": cfg.fraction, "seed": cfg.seed}
    _open_cache(folder, identity, overwrite)
    masks = evalstats.subset_masks(n_train, cfg.subsets, cfg.fraction, cfg.seed)
    store.save_npy(folder / "subsets.npy", masks)
    keys = [[f"s{s:05d}-r{r:02d}" for r in range(cfg.models_per_subset)] for s in range(len(masks))]
    jobs = [
        retrain.Job(
            keys[s][r], np.flatnonzero(masks[s]), evalstats.subset_model_seed(cfg.seed, s, r)
        )
        for s in range(len(masks))
        for r in range(cfg.models_per_subset)
    ]
    todo = [j for j in jobs if not retrain.output_path(folder / "outputs", j.key).is_file()]
    work = {"trained": 0, "reused": len(jobs), "seconds": 0.0}
    if todo:
        ctx = _context(run, manifest, train_cfg, device)
        work = retrain.run_jobs(
            ctx,
            jobs,
            folder / "outputs",
            folder / "checkpoints",
            workers=_workers(cfg.workers),
            keep_models=cfg.keep_models,
            desc="training subset models",
        )
    per_model = np.stack([retrain.load_outputs(folder / "outputs", row) for row in keys])
    outputs = per_model.mean(axis=1)  # (N, n_val): (N, R, n_val) averaged over each subset's models
    store.save_npy(folder / "outputs.npy", outputs.astype(np.float32))
    # How much the seed noise caps every method's LDS: the rank agreement, over subsets, of two
    # models per subset. A method predicting the expected output perfectly reaches only about the
    # square root of this per model (of R r / (1 + (R - 1) r) for the mean of R models).
    reliability = (
        float(np.nanmean(evalstats.spearman_columns(per_model[:, 0], per_model[:, 1])))
        if cfg.models_per_subset >= 2
        else None
    )

    t_score = time.perf_counter()
    predictions = {k: evalstats.subset_predictions(v, masks) for k, v in scores.items()}
    methods = evalstats.bootstrap_lds(predictions, outputs, cfg.bootstrap, cfg.seed, cfg.level)
    for name in methods:
        methods[name]["description"] = METHODS[name]
    result = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": asdict(cfg),
        "train": asdict(train_cfg),
        "train_source": train_source,
        "model_output": identity["model_output"],
        "counts": {"subsets": len(masks), "models": len(jobs), "n_val": outputs.shape[1]},
        "split_half_reliability": reliability,
        "methods": methods,
        "timings": {
            "models_trained": work["trained"],
            "models_reused": work["reused"],
            "training_seconds": work["seconds"],
            "scoring_seconds": round(time.perf_counter() - t_score, 3),
            "total_seconds": round(time.perf_counter() - t0, 3),
        },
    }
    store.write_json(lds_path(run), result)
    return result


def load_lds_cache(run: Path, subsets: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(masks (N, n_train), outputs (N, n_val)) of the run's last LDS evaluation, to score other
    methods against the same retrained models."""
    folder = eval_dir(Path(run)) / "lds"
    if not (folder / "outputs.npy").is_file():
        raise EvalError(f"{run} has no LDS evaluation yet: run `trakview eval lds {run}` first")
    masks, outputs = store.load_npy(folder / "subsets.npy"), store.load_npy(folder / "outputs.npy")
    return masks[:subsets], outputs[:subsets]


# --- removal -----------------------------------------------------------------------------------


def top_rows(column: np.ndarray, k: int) -> np.ndarray:
    """The k training rows with the largest scores, largest first (ties by row)."""
    return np.argsort(-np.asarray(column, dtype=np.float64), kind="stable")[:k]


def random_rows(n_train: int, k: int, seed: int, target: int) -> np.ndarray:
    """k training rows drawn at random for one target (seeded by (seed, target, k))."""
    return np.random.default_rng([seed, target, k, 1]).choice(n_train, k, replace=False)


def removal_targets(val_ids: list[str], wanted: list[str]) -> list[int]:
    """Rows of the wanted validation ids, with a clear error for an unknown one."""
    index = {v: j for j, v in enumerate(val_ids)}
    missing = [w for w in wanted if w not in index]
    if missing:
        raise EvalError(
            f"unknown validation id(s) {missing[:3]}; ids look like {val_ids[:3]} (see val.jsonl)"
        )
    return [index[w] for w in dict.fromkeys(wanted)]


def sample_targets(val_ids: list[str], count: int, seed: int) -> list[str]:
    """``count`` validation ids drawn at random (seeded), in val.jsonl order."""
    count = min(count, len(val_ids))
    rows = np.sort(np.random.default_rng([seed, 3]).choice(len(val_ids), count, replace=False))
    return [val_ids[j] for j in rows]


def evaluate_removal(
    run: str | os.PathLike,
    cfg: RemoveConfig,
    train_cfg: train.TrainConfig,
    device: str = "cpu",
    overwrite: bool = False,
    train_source: str = "defaults",
) -> dict[str, Any]:
    """Retrains without each target's top-k pairs (per method) and measures its margin change.

    The change of target j is mean_r(margin of the model without the pairs, seed r) minus
    (margin of the model trained on every pair, seed r), r = 0..models-1 with the seeds of the
    run's members (train seed + r). Results for other targets already in remove.json (same
    settings) are kept, so targets can be added over several calls.

    Returns:
        The content of ``RUN/eval/remove.json`` (also written there).
    """
    t0 = time.perf_counter()
    run = Path(run)
    manifest = runs.read_manifest(run)
    n_train = manifest["counts"]["n_train"]
    val = store.read_jsonl(store.pairs_path(run, "val"))
    val_ids = [str(r["id"]) for r in val]
    if not cfg.targets:
        raise EvalError("no targets: pass --val ID (repeatable) or --targets N")
    rows = removal_targets(val_ids, cfg.targets)
    if not cfg.ks or min(cfg.ks) < 1 or max(cfg.ks) >= n_train:
        raise EvalError(f"-k must be between 1 and {n_train - 1}, got {cfg.ks}")
    if not 1 <= cfg.models <= 99:
        raise EvalError(f"--models must be 1..99, got {cfg.models}")
    _check_trainable(n_train - max(cfg.ks), train_cfg, "a removal model")
    scored = [m for m in cfg.methods if m != "random"]
    scores = method_scores(run, list(dict.fromkeys([*scored, "trak"])), seed=cfg.seed)

    folder = eval_dir(run) / "remove"
    identity = {**_identity(manifest, train_cfg), "train_seed": train_cfg.seed, "seed": cfg.seed}
    _open_cache(folder, identity, overwrite)
    everyone = np.arange(n_train)
    removed: dict[tuple[str, int, int], np.ndarray] = {}
    jobs = [retrain.Job(f"full-r{r:02d}", everyone, train_cfg.seed + r) for r in range(cfg.models)]
    for j in rows:
        for method in cfg.methods:
            for k in cfg.ks:
                gone = (
                    random_rows(n_train, k, cfg.seed, j)
                    if method == "random"
                    else top_rows(scores[method][:, j], k)
                )
                removed[(method, k, j)] = gone
                kept = np.setdiff1d(everyone, gone)
                jobs += [
                    retrain.Job(f"{method}-k{k}-v{j:05d}-r{r:02d}", kept, train_cfg.seed + r)
                    for r in range(cfg.models)
                ]
    todo = [j for j in jobs if not retrain.output_path(folder / "outputs", j.key).is_file()]
    work = {"trained": 0, "reused": len(jobs), "seconds": 0.0}
    if todo:
        work = retrain.run_jobs(
            _context(run, manifest, train_cfg, device),
            jobs,
            folder / "outputs",
            folder / "checkpoints",
            workers=_workers(cfg.workers),
            keep_models=cfg.keep_models,
            desc="training removal models",
        )

    def out(key: str) -> np.ndarray:
        return retrain.load_outputs(folder / "outputs", [key])[0]  # (n_val,)

    full = np.mean([out(f"full-r{r:02d}") for r in range(cfg.models)], axis=0)  # (n_val,)
    train_ids = [str(r["id"]) for r in store.read_jsonl(store.pairs_path(run, "train"))]

    previous = read_removal(run)
    same = previous is not None and previous.get("identity") == identity
    targets = dict(previous["targets"]) if same and previous.get("models") == cfg.models else {}
    run_margin = store.load_npy(run / "val_margin.npy")
    for j in rows:
        entry = targets.get(val_ids[j], {"removed": {}})
        entry.update(
            id=val_ids[j],
            row=int(j),
            caption=val[j]["caption"],
            margin_full=float(full[j]),
            margin_run=float(run_margin[j]),
        )
        for method in cfg.methods:
            for k in cfg.ks:
                after = np.mean(
                    [out(f"{method}-k{k}-v{j:05d}-r{r:02d}")[j] for r in range(cfg.models)]
                )
                gone = removed[(method, k, j)]
                entry["removed"].setdefault(method, {})[str(k)] = {
                    "margin": float(after),
                    "delta": float(after - full[j]),
                    "trak_score_sum": float(scores["trak"][gone, j].sum()),
                    "removed_ids": [train_ids[i] for i in gone.tolist()],
                }
        targets[val_ids[j]] = entry
    result = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "identity": identity,
        "models": cfg.models,
        "settings": asdict(cfg),
        "train": asdict(train_cfg),
        "train_source": train_source,
        "summary": summarize_removal(targets, cfg.bootstrap, cfg.seed, cfg.level),
        "targets": targets,
        "timings": {
            "models_trained": work["trained"],
            "models_reused": work["reused"],
            "training_seconds": work["seconds"],
            "total_seconds": round(time.perf_counter() - t0, 3),
        },
    }
    store.write_json(removal_path(run), result)
    return result


def summarize_removal(
    targets: dict[str, Any], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> list[dict[str, Any]]:
    """Per (method, k): mean margin change over targets with a bootstrap interval, the share of
    targets whose margin dropped, and the paired difference to TRAK's removal."""
    deltas: dict[tuple[str, int], dict[str, float]] = {}
    for tid, entry in targets.items():
        for method, by_k in entry["removed"].items():
            for k, res in by_k.items():
                deltas.setdefault((method, int(k)), {})[tid] = res["delta"]
    rows = []
    for (method, k), by_target in sorted(deltas.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        values = np.array(list(by_target.values()))
        row = {
            "method": method,
            "k": k,
            "targets": len(values),
            "mean_delta": float(values.mean()),
            "ci": evalstats.mean_ci(values, n_boot, seed, level),
            "median_delta": float(np.median(values)),
            "share_dropped": float((values < 0).mean()),
        }
        trak = deltas.get((REFERENCE, k), {})
        common = [t for t in by_target if t in trak]
        if method != REFERENCE and common:
            diff = np.array([by_target[t] - trak[t] for t in common])  # > 0: TRAK dropped more
            row["this_minus_trak"] = {
                "mean": float(diff.mean()),
                "ci": evalstats.mean_ci(diff, n_boot, seed, level),
            }
        rows.append(row)
    return rows
