"""`trakview build`: CLIP embeddings and TRAK scores of every training pair for every val pair.

Stages: pairs (check every image and caption, ``engine.assemble.pairs``) -> the graph of units
(``engine.assemble.graph``: per checkpoint, embeddings, featurize and X^T X per shard of the pairs,
features, target gradients; then the scores per block of validation pairs), run by an executor
(``engine.assemble.executors``: in this process, or on Ray) -> ensemble, diagnose
(``engine.assemble.derive``) -> index -> manifest. Every stage and every unit leaves a marker
(``RUN/stages/``, ``RUN/units/``): a build that is stopped resumes at the first unit that had not
finished.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from engine import files
from engine.assemble import derive, executors, graph
from engine.assemble.pairs import check_pairs, fingerprint, relative_to_run
from engine.attribution.settings import NOT_IDENTITY, BuildConfig, resolve
from engine.data.pairs import PairSet, read_pairs
from engine.errors import RunMismatchError
from engine.models.checkpoints import check_fits, file_sha256, read_state_dict
from engine.models.factory import create
from engine.run import invocation as run_invocation
from engine.run.layout import FORMAT_VERSION, RunLayout
from engine.run.lock import run_lock
from engine.run.manifest import CheckpointEntry, Counts, Manifest, write_manifest
from engine.search.run_indexes import build_run_indexes

log = logging.getLogger(__name__)


def _open_run(
    layout: RunLayout, cfg: BuildConfig, identity: dict[str, Any], overwrite: bool
) -> None:
    """Creates the run directory, or checks that an existing one was started the same way."""
    wanted = {"format_version": FORMAT_VERSION, "config": asdict(cfg), **identity}
    have = files.claim_folder(layout.root, layout.config, wanted, overwrite, keep=(layout.lock,))
    if have is None:
        return
    # a setting added since the run started has its default there
    before = {**asdict(BuildConfig()), **have.get("config", {})}
    diffs = [
        f"{k}: {before.get(k)!r} -> {v!r}"
        for k, v in wanted["config"].items()
        if before.get(k) != v and k not in NOT_IDENTITY
    ] + [f"{k} differs" for k in identity if have.get(k) != identity[k]]
    if have.get("format_version") != FORMAT_VERSION:
        diffs.insert(0, f"format version {have.get('format_version')} != {FORMAT_VERSION}")
    if diffs:
        raise RunMismatchError(
            f"run {layout.root} was started with other settings ({'; '.join(diffs[:4])}). "
            "Pass --overwrite to start it again from scratch, or choose another --out"
        )


class _Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 3)


def build(
    train: PairSet,
    val: PairSet,
    cfg: BuildConfig,
    out: str | Path,
    overwrite: bool = False,
    strict: bool = False,
    invocation: dict[str, Any] | None = None,
    executor: executors.Executor | None = None,
) -> Path:
    """Builds (or resumes) an attribution run and returns its directory.

    The work is a graph of units over shards of the pairs (``engine.assemble.graph``), run by
    ``executor``: in this process by default, or on a Ray cluster (``executors.RayExecutor``).
    Images are streamed in batches through DataLoader workers, so memory is bounded by the batch
    and shard sizes and the arrays the run keeps, not by the number of images.

    Args:
        train: the training pairs the checkpoints were trained on.
        val: the pairs whose matches are explained.
        cfg: settings; data-dependent defaults are resolved and recorded.
        out: the run directory (on a cluster: a path every worker sees).
        overwrite: start again from scratch if ``out`` holds a run with other settings.
        strict: fail on an unusable pair (broken image, empty caption) instead of skipping it.
        invocation: the command line's settings (recorded in the manifest and ``run.toml``).
        executor: what runs the units (default: ``executors.LocalExecutor``).

    Raises:
        RunBusyError: another live process is building or evaluating into ``out``.
    """
    out = Path(out)
    with run_lock(out):
        return _build(train, val, cfg, out, overwrite, strict, invocation, executor)


def _build(
    train: PairSet,
    val: PairSet,
    cfg: BuildConfig,
    out: Path,
    overwrite: bool,
    strict: bool,
    invocation: dict[str, Any] | None,
    executor: executors.Executor | None,
) -> Path:
    layout = RunLayout(out)
    executor = executor or executors.LocalExecutor()
    # On a cluster the workers compute: the driver needs no GPU of its own.
    cfg = resolve(cfg, len(train), check_device=executor.name == "local", n_val=len(val))
    ckpt_hashes = [file_sha256(p) for p in cfg.checkpoints]
    identity = {"train": fingerprint(train), "val": fingerprint(val), "checkpoints": ckpt_hashes}
    _open_run(layout, cfg, identity, overwrite)
    started = time.perf_counter()
    if not layout.stage_done("pairs"):
        t = _Timer()
        counts = check_pairs(train, val, layout, cfg.workers, strict)
        layout.mark_stage("pairs", {"seconds": t.seconds(), **counts})
    # From here on the run's own pair lists: the usable pairs, paths relative to the run.
    train = read_pairs(layout.pairs("train"))
    val = read_pairs(layout.pairs("val"))
    cfg = replace(cfg, topk=min(cfg.topk, len(train)))

    graph_seconds = 0.0
    if not layout.stage_done("scores"):
        _check_checkpoints(cfg)
        plan = graph.plan(len(train), len(val), len(cfg.checkpoints), cfg.shard_size)
        t = _Timer()
        executor.run(plan, out, cfg)
        graph_seconds = t.seconds()

    derive.finish_run(layout, cfg, len(cfg.checkpoints))
    if not layout.stage_done("index"):
        t = _Timer()
        meta = build_run_indexes(out)
        summary = {
            n: {k: i.get(k) for k in ("kind", "n", "dim", "recall_at_10")}
            for n, i in meta["indexes"].items()
        }
        layout.mark_stage("index", {"seconds": t.seconds(), "indexes": summary})
    manifest = _manifest(
        layout,
        cfg,
        (len(train), len(val)),
        ckpt_hashes,
        time.perf_counter() - started,
        {**executor.describe(), "graph_seconds_this_session": graph_seconds},
        invocation,
    )
    write_manifest(layout, manifest)
    if invocation:
        run_invocation.write_toml(
            layout.run_toml,
            invocation,
            out,
            "The settings this run was built with; repeat it with\n"
            f"  trakview build --config RUN/{layout.run_toml.name}",
        )
    return out


def _check_checkpoints(cfg: BuildConfig) -> None:
    """Every checkpoint fits the architecture, checked before any work is handed out."""
    model = create(cfg.model, device="cpu", pretrained=cfg.pretrained).model
    for path in cfg.checkpoints:
        check_fits(model, read_state_dict(path), path)


def _versions() -> dict[str, str]:
    import numpy as np
    import open_clip
    import torch
    import trak

    import engine

    return {
        "trakview": engine.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "traker": getattr(trak, "__version__", "0.3.2"),
        "numpy": np.__version__,
    }


def _manifest(
    layout: RunLayout,
    cfg: BuildConfig,
    sizes: tuple[int, int],
    ckpt_hashes: list[str],
    total_seconds: float,
    executor: dict[str, Any],
    invocation: dict[str, Any] | None,
) -> Manifest:
    n_train, n_val = sizes
    n_models = len(cfg.checkpoints)
    units = [
        files.read_json(layout.unit(u.id))
        for u in graph.plan(n_train, n_val, n_models, cfg.shard_size)
        if layout.unit_done(u.id)
    ]
    finalize = [layout.read_stage(f"finalize-{m}") for m in range(n_models)]
    emb_dim = files.load_npy(layout.embeddings("train", "image"), mmap=True).shape[1]
    return Manifest(
        versions=_versions(),
        config=cfg,
        checkpoints=[
            CheckpointEntry(relative_to_run(Path(p), layout.root), h)
            for p, h in zip(cfg.checkpoints, ckpt_hashes, strict=True)
        ],
        counts=Counts(
            n_train=n_train,
            n_val=n_val,
            n_checkpoints=n_models,
            # the features' width: proj_dim, or the sum of the modules' blocks (modules)
            proj_dim=int(files.load_npy(layout.trak_features(0), mmap=True).shape[1]),
            ensemble_embedding_dim=int(emb_dim),
        ),
        projection=next((u["projection"] for u in units if "projection" in u), None),
        indexes=layout.read_stage("index").get("indexes", {}),
        conditioning=[
            {k: f[k] for k in ("rank", "proj_dim", "lambda", "condition") if k in f}
            for f in finalize
        ],
        skipped=layout.read_stage("pairs").get("skipped", {}),
        timings_seconds={s: layout.read_stage(s).get("seconds") for s in layout.stages()},
        build_seconds_this_session=round(total_seconds, 3),
        executor=executor,
        units=[
            {k: u.get(k) for k in ("unit", "seconds", "host", "pid", "pairs") if k in u}
            for u in units
        ],
        invocation=invocation or {},
        health=layout.read_stage("health"),
    )
