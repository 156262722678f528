"""Everything trakview reads from or writes to disk: pair lists, arrays, stage markers, manifests.

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a process killed
at any point leaves either the old file or the new one, never half of one.

The run directory (format version ``FORMAT_VERSION``) is documented in the README; its paths are
the ``*_path`` functions below.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT_VERSION = 1


class RunError(ValueError):
    """A run directory that is missing, incomplete or of another format version."""


class RunMismatchError(ValueError):
    """A run directory was started with other settings than the ones given now."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; moves it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; runs are shared (other users, workers)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    records = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {err.msg}") from err
    return records


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    # through a handle: np.save adds ".npy" to a file name that lacks it
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None)


def save_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def save_pairs(
    root: str | os.PathLike,
    split: str,
    records: list[dict[str, Any]],
    images: np.ndarray,
) -> Path:
    """Writes one split of a generated data set: PNGs under ``images/SPLIT/`` and ``SPLIT.jsonl``.

    The jsonl holds each record with ``image`` set to the PNG's path relative to ``root``.
    """
    root = Path(root)
    out = []
    for rec, pixels in zip(records, images, strict=True):
        rel = Path("images") / split / f"{rec['id']}.png"
        save_png(root / rel, pixels)
        out.append({"id": rec["id"], "caption": rec["caption"], "image": rel.as_posix(), **rec})
    jsonl = root / f"{split}.jsonl"
    write_jsonl(jsonl, out)
    return jsonl


# --- the run directory -------------------------------------------------------------------------


def manifest_path(run: Path) -> Path:
    return run / "manifest.json"


def config_path(run: Path) -> Path:
    return run / "config.json"


def run_config_path(run: Path) -> Path:
    """The flags the run was built with (``trakview build --config RUN/run.toml`` repeats it)."""
    return run / "run.toml"


def skipped_path(run: Path) -> Path:
    """Pairs the build could not use (broken image, empty caption), one JSON line each."""
    return run / "skipped.jsonl"


def pairs_path(run: Path, split: str) -> Path:
    return run / f"{split}.jsonl"


def stage_path(run: Path, stage: str) -> Path:
    return run / "stages" / f"{stage}.json"


def embeddings_path(run: Path, split: str, modality: str) -> Path:
    """Ensemble embeddings: (n, M*d) float32, each checkpoint's unit embedding / sqrt(M)."""
    return run / f"{split}_{modality}_emb.npy"


def checkpoint_embeddings_path(run: Path, split: str, modality: str, model_id: int) -> Path:
    return run / "embeddings" / f"{split}_{modality}_{model_id}.npy"


def scores_path(run: Path) -> Path:
    return run / "scores.npy"


def trak_dir(run: Path) -> Path:
    return run / "trak"


def stage_done(run: Path, stage: str) -> bool:
    return stage_path(run, stage).is_file()


def mark_stage(run: Path, stage: str, info: dict[str, Any]) -> None:
    write_json(stage_path(run, stage), info)


def read_stage(run: Path, stage: str) -> dict[str, Any]:
    return read_json(stage_path(run, stage))


# --- search indexes (engine/index.py) ----------------------------------------------------------


def trak_features_path(run: Path, model_id: int) -> Path:
    """traker's finalized features of checkpoint ``model_id``: (n_train, proj_dim) npy memmap."""
    return trak_dir(run) / str(model_id) / "features.mmap"


def trak_out_to_loss_path(run: Path, model_id: int) -> Path:
    """traker's out-to-loss weights of checkpoint ``model_id``: (n_train, 1) npy memmap."""
    return trak_dir(run) / str(model_id) / "out_to_loss.mmap"


def trak_target_grads_path(run: Path, model_id: int, experiment: str = "val") -> Path:
    """traker's projected target gradients: (n_targets, proj_dim) npy memmap."""
    return trak_dir(run) / str(model_id) / f"{experiment}_grads.mmap"


def index_dir(run: Path) -> Path:
    return run / "index"


def index_path(run: Path, name: str) -> Path:
    """A faiss index of the run (``trak``, ``train_image``, ``val_text``, ...)."""
    return index_dir(run) / f"{name}.faiss"


def index_meta_path(run: Path) -> Path:
    """What each index of the run is: kind, parameters, sizes, recall, sources."""
    return index_dir(run) / "index.json"


def save_faiss_index(path: str | os.PathLike, index: Any) -> None:
    """Writes a (CPU) faiss index atomically."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_faiss_index(path: str | os.PathLike) -> Any:
    import faiss

    return faiss.read_index(str(path))


# --- build units and their shard files (engine/graph.py) --------------------------------------


def unit_path(run: Path, unit_id: str) -> Path:
    """Done-marker of one unit of the build graph: its timing and where it ran."""
    return run / "units" / f"{unit_id}.json"


def unit_done(run: Path, unit_id: str) -> bool:
    return unit_path(run, unit_id).is_file()


def shard_dir(run: Path, group: str) -> Path:
    """Shard files of one gather (``embed-M``, ``train-M``, ``val-M``, ``scores``); the gather
    that assembles them removes the folder."""
    return run / "shards" / group


def shard_path(run: Path, group: str, name: str, shard: int) -> Path:
    return shard_dir(run, group) / f"{name}_{shard:05d}.npy"


def trak_grads_path(run: Path, model_id: int) -> Path:
    """Projected training gradients X_m of checkpoint ``model_id``: (n_train, proj_dim) npy."""
    return trak_dir(run) / str(model_id) / "grads.mmap"


def trak_xtx_path(run: Path, model_id: int) -> Path:
    """X_m^T X_m of checkpoint ``model_id``: (proj_dim, proj_dim) float64 npy."""
    return trak_dir(run) / str(model_id) / "xtx.npy"
