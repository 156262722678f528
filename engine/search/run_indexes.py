"""The run's search indexes (``RUN/index/``): built by the build, opened by the explorers.

``build_run_indexes`` makes one faiss index per kind of vector (``INDEX_NAMES``) and describes
each in ``index.json`` (kind, parameters, sizes, recall@10 when approximate, source files);
``load_index`` opens one with the nprobe chosen at build time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from engine import files
from engine.errors import ConfigError, RunError
from engine.run.layout import TARGETS, RunLayout
from engine.run.manifest import open_manifest
from engine.search.faiss_ops import IndexConfig, build_index, to_device, trak_vectors

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
EMBEDDING_INDEXES = {
    "train_image": ("train", "image"),
    "train_text": ("train", "text"),
    "val_image": ("val", "image"),
    "val_text": ("val", "text"),
}
# The build's indexes: CLIP neighbours. TRAK vectors are not indexed: a new query reads every
# training pair's features (engine.explore.scores), exactly, at the speed of a read of them
# (bench_scale); ``trak_train_vectors`` gives them to a notebook that wants an index.
INDEX_NAMES = tuple(EMBEDDING_INDEXES)


def _n_checkpoints(run: Path) -> int:
    return open_manifest(run).n_models


def _require(run: Path, paths: Sequence[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        names = ", ".join(str(p.relative_to(run)) for p in missing)
        raise RunError(
            f"run {run} has no {names} (needed for {what}); run `trakview build` on it to "
            "finish the run"
        )


def _trak_paths(run: Path, n_models: int) -> list[Path]:
    return [
        p
        for m in range(n_models)
        for p in (RunLayout(run).trak_features(m), RunLayout(run).trak_out_to_loss(m))
    ]


def trak_train_vectors(run: str | Path, n_models: int | None = None) -> np.ndarray:
    """(n_train, M*k) float32 training vectors of a run (see ``trak_vectors``)."""
    run = Path(run)
    n_models = _n_checkpoints(run) if n_models is None else n_models
    _require(run, _trak_paths(run, n_models), "the TRAK index")
    features = [files.load_npy(RunLayout(run).trak_features(m), mmap=True) for m in range(n_models)]
    weights = [
        files.load_npy(RunLayout(run).trak_out_to_loss(m), mmap=True) for m in range(n_models)
    ]
    return trak_vectors(features, weights)


def trak_query_vectors(
    run: str | Path, experiment: str = TARGETS, n_models: int | None = None
) -> np.ndarray:
    """(n_targets, M*k) float32 stored target gradients concat_m(g_m) of a run's experiment."""
    run = Path(run)
    n_models = _n_checkpoints(run) if n_models is None else n_models
    paths = [RunLayout(run).trak_target_grads(m, experiment) for m in range(n_models)]
    _require(run, paths, f"the {experiment} target gradients")
    return np.concatenate([files.load_npy(p) for p in paths], axis=1).astype(np.float32)


def _sources(run: Path, name: str) -> list[Path]:
    return [RunLayout(run).embeddings(*EMBEDDING_INDEXES[name])]


def _stamp(run: Path, paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Size and modification time of the source files: a changed source triggers a rebuild."""
    return [
        {
            "path": p.relative_to(run).as_posix(),
            "size": p.stat().st_size,
            "mtime_ns": p.stat().st_mtime_ns,
        }
        for p in paths
    ]


def _vectors(run: Path, name: str) -> np.ndarray:
    path = RunLayout(run).embeddings(*EMBEDDING_INDEXES[name])
    return np.ascontiguousarray(files.load_npy(path), dtype=np.float32)


def _recall_queries(run: Path, name: str, cfg: IndexConfig) -> tuple[np.ndarray | None, str]:
    """Realistic queries for measuring an approximate index's recall@10: the other split's
    image and text embeddings (a val pair looks for similar training pairs); None when the run
    holds none."""
    rng = np.random.default_rng(cfg.seed)
    split, _ = EMBEDDING_INDEXES[name]
    other = "val" if split == "train" else "train"
    pool = [
        files.load_npy(RunLayout(run).embeddings(other, modality), mmap=True)
        for modality in ("image", "text")
        if RunLayout(run).embeddings(other, modality).is_file()
    ]
    if not pool:
        return None, ""
    per = max(1, cfg.recall_queries // len(pool))
    queries = np.vstack(
        [a[np.sort(rng.choice(len(a), min(per, len(a)), replace=False))] for a in pool]
    )
    return queries, f"{len(queries)} {other} image and text embeddings"


def build_run_indexes(
    run: str | Path,
    approx_threshold: int = 200_000,
    *,
    nlist: int = 0,
    recall_target: float = 0.95,
    recall_queries: int = 200,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Builds the run's search indexes under ``RUN/index/`` and describes them in index.json.

    Idempotent: an index whose settings and source files (size, mtime) are unchanged is kept.

    Args:
        run: a finished run directory.
        approx_threshold: past this many vectors an index is IVF-Flat instead of exact.
        nlist: IVF lists (0 = about sqrt(n)).
        recall_target: nprobe is raised until recall@10 on the sample queries reaches this.
        recall_queries: sample queries for the recall measurement.
        seed: seeds k-means and the query sample.
        overwrite: rebuild every index even if it is up to date.

    Returns:
        The content of index.json: ``{"format_version", "faiss_version", "indexes": {name: info}}``.
    """
    run = Path(run)
    cfg = IndexConfig(approx_threshold, nlist, recall_target, recall_queries, 64, seed)
    _require(run, [p for name in INDEX_NAMES for p in _sources(run, name)], "indexes")
    meta_path = RunLayout(run).index_meta
    meta: dict[str, Any] = {"format_version": INDEX_FORMAT, "indexes": {}}
    if meta_path.is_file() and not overwrite:
        old = files.read_json(meta_path)
        if old.get("format_version") == INDEX_FORMAT:
            meta["indexes"] = old.get("indexes", {})
    meta["faiss_version"] = faiss.__version__
    built = 0
    for name in INDEX_NAMES:
        sources = _stamp(run, _sources(run, name))
        n = _n_rows(run, name)
        spec = _spec(cfg, n)
        have = meta["indexes"].get(name, {})
        if (
            have.get("spec") == spec
            and have.get("sources") == sources
            and RunLayout(run).index(name).is_file()
        ):
            log.info("index %s is up to date", name)
            continue
        queries, desc = _recall_queries(run, name, cfg) if n > approx_threshold else (None, "")
        index, info = build_index(_vectors(run, name), cfg, queries, desc)
        files.save_faiss_index(RunLayout(run).index(name), index)
        meta["indexes"][name] = {
            "file": RunLayout(run).index(name).name,
            **info,
            "spec": spec,
            "sources": sources,
        }
        files.write_json(meta_path, meta)  # after each index: an interrupted build keeps its work
        built += 1
        log.info("index %s: %s over %d x %d", name, info["kind"], info["n"], info["dim"])
    if not built:
        return files.read_json(meta_path)
    return meta


def _n_rows(run: Path, name: str) -> int:
    path = RunLayout(run).embeddings(*EMBEDDING_INDEXES[name])
    return int(files.load_npy(path, mmap=True).shape[0])


def _spec(cfg: IndexConfig, n: int) -> dict[str, Any]:
    """The settings an index depends on: none for an exact index, all but the threshold for IVF."""
    if n <= cfg.approx_threshold:
        return {"kind": "flat-ip"}
    return {
        "kind": "ivf-flat-ip",
        **{k: v for k, v in asdict(cfg).items() if k != "approx_threshold"},
    }


def read_index_meta(run: str | Path) -> dict[str, Any]:
    """The run's index.json; a ``RunError`` when the indexes were never built."""
    run = Path(run)
    path = RunLayout(run).index_meta
    if not path.is_file():
        raise RunError(
            f"run {run} has no {path.relative_to(run)}: its search indexes were not built; run "
            "`trakview build` on it (or engine.index.build_run_indexes)"
        )
    return files.read_json(path)


def load_index(run: str | Path, name: str, device: str = "cpu") -> faiss.Index:
    """Opens one of the run's indexes (see ``INDEX_NAMES``) on ``device``.

    The IVF nprobe chosen at build time is restored from index.json.
    """
    run = Path(run)
    if name not in INDEX_NAMES:
        raise ConfigError(f"unknown index {name!r}, expected one of {', '.join(INDEX_NAMES)}")
    info = read_index_meta(run).get("indexes", {}).get(name)
    path = RunLayout(run).index(name)
    if info is None or not path.is_file():
        raise RunError(
            f"run {run} has no {path.relative_to(run)}; run `trakview build` on it to build the "
            "search indexes"
        )
    index = files.load_faiss_index(path)
    if info.get("kind") == "ivf-flat-ip":
        faiss.extract_index_ivf(index).nprobe = int(info["params"]["nprobe"])
    return to_device(index, device)
