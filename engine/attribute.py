"""`trakview build`: CLIP embeddings and TRAK scores of every training pair for every val pair.

Stages: pairs (check every image and caption) -> the graph of units (``engine.graph``: per
checkpoint, embeddings, featurize and X^T X per shard of the pairs, features, target gradients;
then the scores per block of validation pairs), run by an executor (``engine.executors``: in this
process, or on Ray) -> topk, ensemble, diagnose -> index -> manifest. Every stage and every unit
leaves a marker (``RUN/stages/``, ``RUN/units/``): a build that is stopped resumes at the first
unit that had not finished.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import data, diagnose, executors, graph, index, models, runconfig, store
from engine.trak import KeyedProjector, cuda_dense_projector

log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 20_000  # pairs per unit; traker's score computer works in blocks of 20,000
# --projector choices for the dense parameters (token rows always use keyed Gaussian blocks):
PROJECTORS = {
    "gaussian": "dense Gaussian JL matrix, float32 (traker's CudaProjector on CUDA with fast_jl)",
    "gaussian-bf16": "the same matrix, multiplied in bfloat16 (about 2x faster on CPUs with BF16)",
    "sketch": "count sketch to 4 x proj_dim buckets, then a Gaussian: O(D) per pair (default)",
}


@dataclass
class BuildConfig:
    """Settings of an attribution run (all recorded in the manifest)."""

    model: str = "trakview-tiny"  # open_clip architecture of the checkpoints
    checkpoints: list[str] = field(default_factory=list)  # one path per ensemble member
    proj_dim: int = 0  # JL projection dimension; 0 = from the data (n_train/4, 64..1024)
    grad_params: str = (
        "auto"  # attributed parameters; auto = no-token-embedding on CPU, all on CUDA
    )
    lambda_reg: float | None = None  # ridge term of X^T X; None = lambda_rel * mean eigenvalue
    lambda_rel: float = 1e-3  # relative ridge term used when lambda_reg is None
    sim_batch_size: int = 256  # simulated batch of the CLIP margin (capped at n_train - 1)
    batch_size: int = 50  # pairs per per-sample-gradient batch
    seed: int = 0  # seeds the simulated batches and the projection
    device: str = "cpu"  # "cpu" or "cuda"
    half: bool = False  # float16 TRAK features (CUDA only: on CPU it ruins the scores)
    projector: str = "auto"  # JL projection of the dense parameters' gradients, see PROJECTORS
    topk: int = 50  # influencers stored per validation pair and sign
    pretrained: str | None = None  # open_clip pretrained tag: its preprocessing and activation
    workers: int = -1  # DataLoader workers reading images; -1 = 0 below 1000 images, else <= 4
    shard_size: int = 0  # pairs per unit of work (embed, featurize, targets); 0 = 20,000


# Settings that do not change a run's results: a resume may change them.
NOT_IDENTITY = ("workers", "checkpoints")  # checkpoints are compared by content hash instead


def resolve(cfg: BuildConfig, n_train: int, check_device: bool = True) -> BuildConfig:
    """Fills in the data-dependent defaults and checks the settings (``check_device``: that
    this machine has the device; a cluster's driver may have none)."""
    if not cfg.checkpoints:
        raise ValueError("no checkpoints given: pass --checkpoint PATH (repeatable)")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {cfg.device!r}")
    if check_device and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use cpu")
    if cfg.half and cfg.device == "cpu":
        raise ValueError(
            "--half needs --device cuda: on CPU float16 X^T X loses the inverse "
            "(scores near random) and float16 matmul is ~100x slower"
        )
    proj_dim = cfg.proj_dim or int(min(1024, max(64, 2 ** math.floor(math.log2(n_train / 4)))))
    grad_params = cfg.grad_params
    if grad_params == "auto":
        grad_params = "no-token-embedding" if cfg.device == "cpu" else "all"
    topk = min(cfg.topk, n_train)
    projector = cfg.projector
    if projector == "auto":
        # The dense Gaussian only pays off on CUDA with fast_jl: without it, a ViT-B/32's matrix
        # (hundreds of GiB) is regenerated every batch (measured on an H100, BENCHMARKS.md).
        fast_jl = importlib.util.find_spec("fast_jl") is not None
        projector = "gaussian" if cfg.device != "cpu" and fast_jl else "sketch"
    if projector not in PROJECTORS:
        raise ValueError(
            f"--projector must be one of {', '.join(PROJECTORS)} or auto, got {projector!r}"
        )
    if cfg.shard_size < 0:
        raise ValueError(
            f"--shard-size must be 0 (auto) or a number of pairs, got {cfg.shard_size}"
        )
    return replace(
        cfg,
        shard_size=cfg.shard_size or DEFAULT_SHARD_SIZE,
        proj_dim=proj_dim,
        grad_params=grad_params,
        topk=topk,
        projector=projector,
    )


def projector_for(model: torch.nn.Module, cfg: BuildConfig, names: list[str]) -> KeyedProjector:
    """The run's projection (the build and every later query must use the same one): on CUDA
    with ``fast_jl`` installed, traker's CudaProjector for the dense parameters."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    token = next((n for n in names if n.endswith("token_embedding.weight")), None)
    dense_dim = sum(math.prod(s) for n, s in shapes.items() if n != token)
    return KeyedProjector(
        shapes,
        token,
        cfg.proj_dim,
        seed=cfg.seed,
        device=cfg.device,
        matmul_dtype=torch.bfloat16 if cfg.projector == "gaussian-bf16" else torch.float32,
        sketch_dim=4 * cfg.proj_dim if cfg.projector == "sketch" else 0,
        dense_projector=(
            cuda_dense_projector(dense_dim, cfg.proj_dim, cfg.seed, cfg.device)
            if cfg.projector == "gaussian"
            else None
        ),
    )


def _fingerprint(pairs: data.PairSet) -> str:
    digest = hashlib.sha256()
    for rec in pairs.records:
        digest.update(f"{rec['id']}\t{rec['caption']}\t{rec['image']}\n".encode())
    return digest.hexdigest()[:16]


def _open_run(out: Path, cfg: BuildConfig, identity: dict[str, Any], overwrite: bool) -> None:
    """Creates the run directory, or checks that an existing one was started the same way."""
    wanted = {"format_version": store.FORMAT_VERSION, "config": asdict(cfg), **identity}
    path = store.config_path(out)
    if path.is_file() and not overwrite:
        have = store.read_json(path)
        diffs = [
            f"{k}: {have.get('config', {}).get(k)!r} -> {v!r}"
            for k, v in wanted["config"].items()
            if have.get("config", {}).get(k) != v and k not in NOT_IDENTITY
        ] + [f"{k} differs" for k in identity if have.get(k) != identity[k]]
        if have.get("format_version") != store.FORMAT_VERSION:
            diffs.insert(
                0, f"format version {have.get('format_version')} != {store.FORMAT_VERSION}"
            )
        if diffs:
            raise store.RunMismatchError(
                f"run {out} was started with other settings ({'; '.join(diffs[:4])}). "
                "Pass --overwrite to start it again from scratch, or choose another --out"
            )
        return
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(path, wanted)


def _relative_to_run(path: Path, out: Path) -> str:
    """``path`` relative to the run directory, so that a folder holding both can be moved."""
    return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()


def _run_pairs(pairs: data.PairSet, out: Path) -> list[dict[str, Any]]:
    """Records for the run's jsonl: image paths (or tar shards) relative to the run directory."""
    rows = []
    for i, rec in enumerate(pairs.records):
        path, sep, member = pairs.image_ref(i).partition(data.TAR_SEPARATOR)
        rel = _relative_to_run(Path(path), out) + sep + member
        rows.append({**rec, "id": str(rec["id"]), "image": rel})
    return rows


def check_pairs(
    train: data.PairSet, val: data.PairSet, out: Path, workers: int, strict: bool
) -> dict[str, Any]:
    """The ``pairs`` stage: opens every image and checks every caption, then writes the run's
    train.jsonl, val.jsonl and skipped.jsonl (the unusable pairs, each with its reason).

    Raises:
        data.DataError: with ``strict``, any skipped pair; or too few usable pairs left.
    """
    kept, skipped = {}, []
    for split, pairs in (("train", train), ("val", val)):
        kept[split], bad = data.check_images(pairs, workers, desc=f"checking {split} images")
        skipped += [{"split": split, **row} for row in bad]
    store.write_jsonl(store.skipped_path(out), skipped)
    if skipped:
        first = "; ".join(f"{r['id']}: {r['reason']}" for r in skipped[:3])
        log.warning(
            "%d pairs skipped (listed in %s), e.g. %s",
            len(skipped),
            store.skipped_path(out),
            first,
        )
        if strict:
            raise data.DataError(
                f"{len(skipped)} pairs cannot be used ({first}); all are listed in "
                f"{store.skipped_path(out)}. Fix or remove them, or drop --strict to skip them"
            )
    if len(kept["train"]) < 2 or len(kept["val"]) < 1:
        raise data.DataError(
            f"after skipping unusable pairs, {len(kept['train'])} training and "
            f"{len(kept['val'])} validation pairs are left; see {store.skipped_path(out)}"
        )
    store.write_jsonl(store.pairs_path(out, "train"), _run_pairs(kept["train"], out))
    store.write_jsonl(store.pairs_path(out, "val"), _run_pairs(kept["val"], out))
    reasons: dict[str, int] = {}
    for row in skipped:
        kind = row["reason"].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "skipped": {s: sum(r["split"] == s for r in skipped) for s in ("train", "val")},
        "skipped_reasons": reasons,
    }


class _Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 3)


def build(
    train: data.PairSet,
    val: data.PairSet,
    cfg: BuildConfig,
    out: str | Path,
    overwrite: bool = False,
    strict: bool = False,
    invocation: dict[str, Any] | None = None,
    executor: executors.Executor | None = None,
) -> Path:
    """Builds (or resumes) an attribution run and returns its directory.

    The work is a graph of units over shards of the pairs (``engine.graph``), run by
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
    """
    out = Path(out)
    executor = executor or executors.LocalExecutor()
    # On a cluster the workers compute: the driver needs no GPU of its own.
    cfg = resolve(cfg, len(train), check_device=executor.name == "local")
    ckpt_hashes = [models.file_sha256(p) for p in cfg.checkpoints]
    identity = {"train": _fingerprint(train), "val": _fingerprint(val), "checkpoints": ckpt_hashes}
    _open_run(out, cfg, identity, overwrite)
    started = time.perf_counter()
    if not store.stage_done(out, "pairs"):
        t = _Timer()
        counts = check_pairs(train, val, out, cfg.workers, strict)
        store.mark_stage(out, "pairs", {"seconds": t.seconds(), **counts})
    # From here on the run's own pair lists: the usable pairs, paths relative to the run.
    train = data.read_pairs(store.pairs_path(out, "train"))
    val = data.read_pairs(store.pairs_path(out, "val"))
    cfg = replace(cfg, topk=min(cfg.topk, len(train)))

    graph_seconds = 0.0
    if not store.stage_done(out, "scores"):
        _check_checkpoints(cfg)
        plan = graph.plan(len(train), len(val), len(cfg.checkpoints), cfg.shard_size)
        t = _Timer()
        executor.run(plan, out, cfg)
        graph_seconds = t.seconds()

    diagnose.finish_run(out, cfg, len(cfg.checkpoints))
    if not store.stage_done(out, "index"):
        t = _Timer()
        meta = index.build_run_indexes(out, n_models=len(cfg.checkpoints))
        summary = {
            n: {k: i.get(k) for k in ("kind", "n", "dim", "recall_at_10")}
            for n, i in meta["indexes"].items()
        }
        store.mark_stage(out, "index", {"seconds": t.seconds(), "indexes": summary})
    _write_manifest(
        out,
        cfg,
        train,
        val,
        ckpt_hashes,
        time.perf_counter() - started,
        {**executor.describe(), "graph_seconds_this_session": graph_seconds},
        invocation,
    )
    if invocation:
        runconfig.write_toml(
            store.run_config_path(out),
            invocation,
            out,
            "The settings this run was built with; repeat it with\n"
            "  trakview build --config RUN/run.toml",
        )
    return out


def _check_checkpoints(cfg: BuildConfig) -> None:
    """Every checkpoint fits the architecture, checked before any work is handed out."""
    model = models.create(cfg.model, device="cpu", pretrained=cfg.pretrained).model
    for path in cfg.checkpoints:
        models.check_fits(model, models.read_state_dict(path), path)


def _write_manifest(
    out: Path,
    cfg: BuildConfig,
    train: data.PairSet,
    val: data.PairSet,
    ckpt_hashes: list[str],
    total_seconds: float,
    executor: dict[str, Any],
    invocation: dict[str, Any] | None,
) -> None:
    import open_clip
    import trak

    import engine

    stages = sorted(p.stem for p in (out / "stages").glob("*.json"))
    n_models = len(cfg.checkpoints)
    units = [
        store.read_json(store.unit_path(out, u.id))
        for u in graph.plan(len(train), len(val), n_models, cfg.shard_size)
        if store.unit_done(out, u.id)
    ]
    timings = {s: store.read_stage(out, s).get("seconds") for s in stages}
    finalize = [store.read_stage(out, f"finalize-{m}") for m in range(len(cfg.checkpoints))]
    emb_dim = store.load_npy(store.embeddings_path(out, "train", "image"), mmap=True).shape[1]
    manifest = {
        "format_version": store.FORMAT_VERSION,
        "versions": {
            "trakview": engine.__version__,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "traker": getattr(trak, "__version__", "0.3.2"),
            "numpy": np.__version__,
        },
        "config": asdict(cfg),
        "checkpoints": [
            {"path": _relative_to_run(Path(p), out), "sha256": h}
            for p, h in zip(cfg.checkpoints, ckpt_hashes, strict=True)
        ],
        "counts": {
            "n_train": len(train),
            "n_val": len(val),
            "n_checkpoints": len(cfg.checkpoints),
            "proj_dim": cfg.proj_dim,
            "ensemble_embedding_dim": int(emb_dim),
        },
        "projection": next((u["projection"] for u in units if "projection" in u), None),
        "indexes": store.read_stage(out, "index").get("indexes", {}),
        "conditioning": [
            {k: f[k] for k in ("rank", "proj_dim", "lambda", "condition") if k in f}
            for f in finalize
        ],
        "skipped": store.read_stage(out, "pairs").get("skipped", {}),
        "timings_seconds": timings,
        "build_seconds_this_session": round(total_seconds, 3),
        "executor": executor,
        "units": [
            {k: u.get(k) for k in ("unit", "seconds", "host", "pid", "pairs") if k in u}
            for u in units
        ],
        "invocation": invocation or {},
    }
    store.write_json(store.manifest_path(out), manifest)
