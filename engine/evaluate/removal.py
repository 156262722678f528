"""Removal (TRAK paper, Section 5, counterfactual evaluation): retrain without the top-k
positive influencers of a target (and, as controls, without the top-k by CLIP similarity and
without k random pairs) and measure how the target's margin changes against a model trained on
every pair with the same seed. Results go to ``RUN/eval/remove.json``."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import files
from engine.errors import EvalError
from engine.evaluate import common, retrain, stats
from engine.evaluate.methods import column, method_scores
from engine.evaluate.results import read_removal
from engine.evaluate.stats import REFERENCE
from engine.models import train
from engine.run.layout import RunLayout
from engine.run.lock import run_lock
from engine.run.manifest import open_manifest


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
    open_manifest(run)  # a missing or unfinished run is refused before anything is written
    with run_lock(run):
        return _evaluate_removal(run, cfg, train_cfg, device, overwrite, train_source)


def _evaluate_removal(
    run: str | os.PathLike,
    cfg: RemoveConfig,
    train_cfg: train.TrainConfig,
    device: str,
    overwrite: bool,
    train_source: str,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    run = Path(run)
    layout = RunLayout(run)
    manifest = open_manifest(run)
    n_train = manifest.counts.n_train
    val = files.read_jsonl(layout.pairs("val"))
    val_ids = [str(r["id"]) for r in val]
    if not cfg.targets:
        raise EvalError("no targets: pass --val ID (repeatable) or --targets N")
    rows = removal_targets(val_ids, cfg.targets)
    if not cfg.ks or min(cfg.ks) < 1 or max(cfg.ks) >= n_train:
        raise EvalError(f"-k must be between 1 and {n_train - 1}, got {cfg.ks}")
    if not 1 <= cfg.models <= 99:
        raise EvalError(f"--models must be 1..99, got {cfg.models}")
    common.check_trainable(n_train - max(cfg.ks), train_cfg, "a removal model")
    scored = [m for m in cfg.methods if m != "random"]
    scores = method_scores(run, list(dict.fromkeys([*scored, "trak"])), seed=cfg.seed)

    cache = layout.eval_cache("remove")
    identity = {
        **common.identity(manifest, train_cfg),
        "train_seed": train_cfg.seed,
        "seed": cfg.seed,
    }
    common.open_cache(cache, identity, overwrite)
    everyone = np.arange(n_train)
    removed: dict[tuple[str, int, int], np.ndarray] = {}
    jobs = [retrain.Job(f"full-r{r:02d}", everyone, train_cfg.seed + r) for r in range(cfg.models)]
    for j in rows:
        for method in cfg.methods:
            for k in cfg.ks:
                gone = (
                    random_rows(n_train, k, cfg.seed, j)
                    if method == "random"
                    else top_rows(column(scores[method], j), k)
                )
                removed[(method, k, j)] = gone
                kept = np.setdiff1d(everyone, gone)
                jobs += [
                    retrain.Job(f"{method}-k{k}-v{j:05d}-r{r:02d}", kept, train_cfg.seed + r)
                    for r in range(cfg.models)
                ]
    todo = [j for j in jobs if not cache.output(j.key).is_file()]
    work = {"trained": 0, "reused": len(jobs), "seconds": 0.0}
    if todo:
        work = retrain.run_jobs(
            common.retrain_context(run, manifest, train_cfg, device),
            jobs,
            cache,
            workers=common.workers(cfg.workers),
            keep_models=cfg.keep_models,
            desc="training removal models",
        )

    def out(key: str) -> np.ndarray:
        return retrain.load_outputs(cache, [key])[0]  # (n_val,)

    full = np.mean([out(f"full-r{r:02d}") for r in range(cfg.models)], axis=0)  # (n_val,)
    train_ids = [str(r["id"]) for r in files.read_jsonl(layout.pairs("train"))]

    previous = read_removal(run)
    same = previous is not None and previous.get("identity") == identity
    targets = dict(previous["targets"]) if same and previous.get("models") == cfg.models else {}
    run_margin = files.load_npy(layout.margin("val"))
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
                    "trak_score_sum": float(column(scores["trak"], j)[gone].sum()),
                    "removed_ids": [train_ids[i] for i in gone.tolist()],
                }
        targets[val_ids[j]] = entry
    result = {
        "format": common.FORMAT,
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
    files.write_json(layout.removal_result, result)
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
            "ci": stats.mean_ci(values, n_boot, seed, level),
            "median_delta": float(np.median(values)),
            "share_dropped": float((values < 0).mean()),
        }
        trak = deltas.get((REFERENCE, k), {})
        common = [t for t in by_target if t in trak]
        if method != REFERENCE and common:
            diff = np.array([by_target[t] - trak[t] for t in common])  # > 0: TRAK dropped more
            row["this_minus_trak"] = {
                "mean": float(diff.mean()),
                "ci": stats.mean_ci(diff, n_boot, seed, level),
            }
        rows.append(row)
    return rows
