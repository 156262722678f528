"""`trakview build`: CLIP embeddings and TRAK scores of every training pair for every val pair.

Stages (each resumable; a finished stage leaves a marker in ``RUN/stages/``):
pairs -> embed-M (per checkpoint) -> featurize-M -> finalize-M -> score-M -> scores -> topk ->
diagnose -> index -> manifest. traker's ``TRAKer`` (with trakview's extension points from
``engine.trak``) does featurize / finalize / score in ``RUN/trak/``; its memmaps record which
pairs are featurized, so a build killed mid-featurize restarts at the first unfinished batch.
"""

from __future__ import annotations

import functools
import hashlib
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
from tqdm.auto import tqdm
from trak import TRAKer

from engine import data, embed, index, models, store
from engine.trak import (
    ClipMargin,
    KeyedProjector,
    RegularizedScoreComputer,
    SelectiveGradientComputer,
    SimulatedBatch,
    cuda_dense_projector,
    select_parameters,
)

log = logging.getLogger(__name__)
EXPERIMENT = "val"
# --projector choices for the dense parameters (token rows always use keyed Gaussian blocks):
PROJECTORS = {
    "gaussian": "dense Gaussian JL matrix, float32 (traker's CudaProjector on CUDA with fast_jl)",
    "gaussian-bf16": "the same matrix, multiplied in bfloat16 (about 2x faster on CPUs with BF16)",
    "sketch": "count sketch to 4 x proj_dim buckets, then a Gaussian: O(D) per pair (CPU default)",
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


def resolve(cfg: BuildConfig, n_train: int) -> BuildConfig:
    """Fills in the data-dependent defaults and checks the settings."""
    if not cfg.checkpoints:
        raise ValueError("no checkpoints given: pass --checkpoint PATH (repeatable)")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
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
        projector = "sketch" if cfg.device == "cpu" else "gaussian"
    if projector not in PROJECTORS:
        raise ValueError(
            f"--projector must be one of {', '.join(PROJECTORS)} or auto, got {projector!r}"
        )
    return replace(
        cfg,
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
            if have.get("config", {}).get(k) != v
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
    """Records for the run's jsonl: image paths relative to the run directory."""
    rows = []
    for i, rec in enumerate(pairs.records):
        rel = _relative_to_run(pairs.image_path(i), out)
        rows.append({**rec, "id": str(rec["id"]), "image": rel})
    return rows


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
) -> Path:
    """Builds (or resumes) an attribution run and returns its directory.

    Args:
        train: the training pairs the checkpoints were trained on.
        val: the pairs whose matches are explained.
        cfg: settings; data-dependent defaults are resolved and recorded.
        out: the run directory.
        overwrite: start again from scratch if ``out`` holds a run with other settings.
    """
    out = Path(out)
    cfg = resolve(cfg, len(train))
    ckpt_hashes = [models.file_sha256(p) for p in cfg.checkpoints]
    identity = {"train": _fingerprint(train), "val": _fingerprint(val), "checkpoints": ckpt_hashes}
    _open_run(out, cfg, identity, overwrite)
    started = time.perf_counter()
    if not store.stage_done(out, "pairs"):
        t = _Timer()
        store.write_jsonl(store.pairs_path(out, "train"), _run_pairs(train, out))
        store.write_jsonl(store.pairs_path(out, "val"), _run_pairs(val, out))
        store.mark_stage(out, "pairs", {"seconds": t.seconds()})

    bundle = models.create(cfg.model, device=cfg.device)
    model = bundle.model
    t = _Timer()
    train_x = data.image_tensors(train, bundle.preprocess)
    val_x = data.image_tensors(val, bundle.preprocess)
    train_t = data.tokenize(bundle.tokenizer, train.captions)
    val_t = data.tokenize(bundle.tokenizer, val.captions)
    load_seconds = t.seconds()

    states = [models.read_state_dict(p) for p in cfg.checkpoints]
    for m, state in enumerate(states):
        models.check_fits(model, state, cfg.checkpoints[m])
        _embed_stage(out, m, model, state, train_x, train_t, val_x, val_t, cfg.device)

    names = select_parameters(model, cfg.grad_params)
    task = ClipMargin()
    scorer = functools.partial(RegularizedScoreComputer, lambda_rel=cfg.lambda_rel)
    projector = projector_for(model, cfg, names)
    traker = TRAKer(
        model=model,
        task=task,
        train_set_size=len(train),
        save_dir=str(store.trak_dir(out)),
        device=cfg.device,
        gradient_computer=SelectiveGradientComputer,
        projector=projector,
        score_computer=scorer,
        use_half_precision=cfg.half,
        grad_wrt=names,
        lambda_reg=cfg.lambda_reg,
        logging_level=logging.WARNING,
    )
    sim = SimulatedBatch(len(train), cfg.sim_batch_size, seed=cfg.seed)

    for m, state in enumerate(states):
        _set_embeddings(task, out, m)
        if not store.stage_done(out, f"featurize-{m}"):
            t = _Timer()
            featurize_checkpoint(traker, state, m, train_x, train_t, sim, cfg.batch_size)
            store.mark_stage(out, f"featurize-{m}", {"seconds": t.seconds()})
        if not store.stage_done(out, f"finalize-{m}"):
            t = _Timer()
            traker.finalize_features(model_ids=[m])
            diag = (
                traker.score_computer.diagnostics[-1] if traker.score_computer.diagnostics else {}
            )
            store.mark_stage(out, f"finalize-{m}", {"seconds": t.seconds(), **diag})
        if not store.stage_done(out, f"score-{m}"):
            t = _Timer()
            traker.start_scoring_checkpoint(EXPERIMENT, state, model_id=m, num_targets=len(val))
            for s in tqdm(range(0, len(val), cfg.batch_size), desc=f"scoring ckpt {m}"):
                inds = np.arange(s, min(len(val), s + cfg.batch_size))
                batch = (val_x[inds], val_t[inds], sim.for_targets(len(inds), m))
                traker.score(batch=batch, inds=inds)
            store.mark_stage(out, f"score-{m}", {"seconds": t.seconds()})

    if not store.stage_done(out, "scores"):
        t = _Timer()
        scores = np.asarray(traker.finalize_scores(exp_name=EXPERIMENT), dtype=np.float32)
        store.save_npy(store.scores_path(out), scores)  # (n_train, n_val)
        store.mark_stage(out, "scores", {"seconds": t.seconds()})

    from engine import diagnose  # after scores: it reads what the stages above stored

    diagnose.finish_run(out, cfg, traker, len(states))
    if not store.stage_done(out, "index"):
        t = _Timer()
        meta = index.build_run_indexes(out, n_models=len(states))
        summary = {
            n: {k: i.get(k) for k in ("kind", "n", "dim", "recall_at_10")}
            for n, i in meta["indexes"].items()
        }
        store.mark_stage(out, "index", {"seconds": t.seconds(), "indexes": summary})
    projection = (
        f"traker {type(projector.dense_projector).__name__} (fast_jl) + keyed token blocks"
        if projector.dense_projector is not None
        else f"trakview KeyedProjector ({cfg.projector})"
    )
    _write_manifest(
        out, cfg, train, val, ckpt_hashes, load_seconds, time.perf_counter() - started, projection
    )
    return out


def _embed_stage(
    out: Path,
    m: int,
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    train_x: torch.Tensor,
    train_t: torch.Tensor,
    val_x: torch.Tensor,
    val_t: torch.Tensor,
    device: str,
) -> None:
    if store.stage_done(out, f"embed-{m}"):
        return
    t = _Timer()
    model.load_state_dict(state)
    for split, x, tok in (("train", train_x, train_t), ("val", val_x, val_t)):
        img, txt = embed.encode(model, x, tok, device=device, desc=f"embedding {split} ckpt {m}")
        store.save_npy(store.checkpoint_embeddings_path(out, split, "image", m), img.numpy())
        store.save_npy(store.checkpoint_embeddings_path(out, split, "text", m), txt.numpy())
    store.mark_stage(out, f"embed-{m}", {"seconds": t.seconds()})


def _set_embeddings(task: ClipMargin, out: Path, m: int) -> None:
    img = store.load_npy(store.checkpoint_embeddings_path(out, "train", "image", m))
    txt = store.load_npy(store.checkpoint_embeddings_path(out, "train", "text", m))
    task.set_embeddings(torch.from_numpy(img), torch.from_numpy(txt))


def featurize_checkpoint(
    traker: TRAKer,
    state: dict[str, torch.Tensor],
    model_id: int,
    images: torch.Tensor,
    tokens: torch.Tensor,
    sim: SimulatedBatch,
    batch_size: int,
) -> None:
    """Featurizes every training pair for one checkpoint, skipping batches already stored."""
    traker.load_checkpoint(state, model_id=model_id)
    done = traker.saver.current_store["is_featurized"]
    n = images.shape[0]
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=f"featurizing ckpt {model_id}", unit="batch"):
        inds = np.arange(s, min(n, s + batch_size))
        if bool(np.all(done[inds] == 1)):
            continue
        batch = (images[inds], tokens[inds], sim.for_train(inds.tolist(), model_id))
        traker.featurize(batch=batch, inds=inds)


def _write_manifest(
    out: Path,
    cfg: BuildConfig,
    train: data.PairSet,
    val: data.PairSet,
    ckpt_hashes: list[str],
    load_seconds: float,
    total_seconds: float,
    projection: str,
) -> None:
    import open_clip
    import trak

    import engine

    stages = sorted(p.stem for p in (out / "stages").glob("*.json"))
    timings = {s: store.read_stage(out, s).get("seconds") for s in stages}
    timings["load_images"] = load_seconds
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
        "projection": projection,
        "indexes": store.read_stage(out, "index").get("indexes", {}),
        "conditioning": [
            {k: f[k] for k in ("rank", "proj_dim", "lambda", "condition") if k in f}
            for f in finalize
        ],
        "timings_seconds": timings,
        "build_seconds_this_session": round(total_seconds, 3),
    }
    store.write_json(store.manifest_path(out), manifest)
