"""The run's manifest (``manifest.json``): read and written here only, as a ``Manifest``.

The manifest is written last and atomically by the build: its presence means the run is
finished. ``open_manifest`` refuses a missing, unfinished or other-version run with a message
saying what to do.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine import files
from engine.attribution.settings import BuildConfig
from engine.errors import RunError
from engine.run.layout import FORMAT_VERSION, READABLE_VERSIONS, RunLayout


@dataclass
class Counts:
    """Sizes of a run."""

    n_train: int
    n_val: int
    n_checkpoints: int
    proj_dim: int
    ensemble_embedding_dim: int


@dataclass
class CheckpointEntry:
    """One checkpoint of the ensemble: its path relative to the run directory, and its hash."""

    path: str
    sha256: str


@dataclass
class Manifest:
    """What a finished run holds and how it was made (README, "The run directory")."""

    config: BuildConfig
    counts: Counts
    checkpoints: list[CheckpointEntry]
    versions: dict[str, str] = field(default_factory=dict)
    projection: str | None = None  # which projector made the features
    indexes: dict[str, Any] = field(default_factory=dict)  # name -> kind, n, dim, recall@10
    conditioning: list[dict[str, Any]] = field(default_factory=list)  # per checkpoint
    skipped: dict[str, int] = field(default_factory=dict)  # per split
    timings_seconds: dict[str, float | None] = field(default_factory=dict)  # per stage
    build_seconds_this_session: float = 0.0
    executor: dict[str, Any] = field(default_factory=dict)
    units: list[dict[str, Any]] = field(default_factory=list)
    invocation: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)  # retrieval per split vs chance
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``manifest.json`` (``format_version`` first)."""
        out = asdict(self)
        return {"format_version": out.pop("format_version"), **out}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        rest = {k: v for k, v in doc.items() if k in known}
        rest.pop("config", None)
        rest.pop("counts", None)
        rest.pop("checkpoints", None)
        return cls(
            config=build_config(doc["config"]),
            counts=Counts(**doc["counts"]),
            checkpoints=[CheckpointEntry(**c) for c in doc["checkpoints"]],
            **rest,
        )

    @property
    def n_models(self) -> int:
        return self.counts.n_checkpoints

    def checkpoint_paths(self, run: str | os.PathLike) -> list[Path]:
        """The checkpoint files (the manifest stores them relative to the run directory)."""
        return [Path(run) / c.path for c in self.checkpoints]

    @property
    def dense(self) -> bool:
        """The run keeps every score (``scores.npy``); else only the top-k form."""
        return self.config.scores == "dense"

    @property
    def projected_with_fast_jl(self) -> bool:
        """traker's CudaProjector (fast_jl) made the features: new queries need CUDA."""
        return "fast_jl" in (self.projection or "")


def build_config(record: dict[str, Any]) -> BuildConfig:
    """A run's ``BuildConfig`` as its manifest records it. Runs built before ``--projector``
    existed were projected with the dense Gaussian matrix."""
    known = {f.name for f in fields(BuildConfig)}
    return BuildConfig(
        **{"projector": "gaussian", **{k: v for k, v in record.items() if k in known}}
    )


def write_manifest(layout: RunLayout, manifest: Manifest) -> None:
    files.write_json(layout.manifest, manifest.to_json())


def open_manifest(run: str | os.PathLike) -> Manifest:
    """Reads a run's manifest, refusing a missing, incomplete or other-version run."""
    layout = RunLayout(run)
    if not layout.root.is_dir():
        raise RunError(
            f"run directory {layout.root} does not exist; build one with `trakview build`"
        )
    if not layout.manifest.is_file():
        hint = (
            "the build has not finished: run the same `trakview build` again to resume it"
            if layout.config.is_file()
            else "it is not a trakview run (create one with `trakview build` or `trakview demo`)"
        )
        raise RunError(f"{layout.root} has no manifest.json: {hint}")
    doc = files.read_json(layout.manifest)
    version = doc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise RunError(
            f"run {layout.root} has format version {version}, this trakview reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild it with this version's "
            "`trakview build`"
        )
    return Manifest.from_json(doc)


def summary(manifest: Manifest) -> str:
    """A few lines describing a run, for ``trakview info``."""
    cfg, counts = manifest.config, manifest.counts
    lines = [
        f"model        {cfg.model} x {counts.n_checkpoints} checkpoints",
        f"pairs        {counts.n_train} train, {counts.n_val} val",
        f"estimator    {cfg.estimator}"
        + (f" ({cfg.module_dim} dimensions per module)" if cfg.estimator == "modules" else "")
        + f", training output {cfg.output}"
        + (f", {cfg.normalize}-normalised features" if cfg.normalize != "none" else ""),
        f"TRAK         proj_dim {counts.proj_dim}, grad params {cfg.grad_params}, "
        f"simulated batch {cfg.sim_batch_size}, device {cfg.device}",
        f"scores       {cfg.scores}: top {cfg.topk} per validation pair and sign"
        + (", every score in scores.npy" if manifest.dense else ", no scores.npy"),
    ]
    for m, cond in enumerate(manifest.conditioning):
        lines.append(
            f"  ckpt {m}     X^T X rank {cond.get('rank')}/{cond.get('proj_dim')}, "
            f"lambda {cond.get('lambda', 0):.3g}, condition {cond.get('condition', 0):.3g}"
        )
    for name, idx in manifest.indexes.items():
        recall = idx.get("recall_at_10")
        lines.append(
            f"  index      {name}: {idx.get('kind')} over {idx.get('n')} x {idx.get('dim')}"
            + (f", recall@10 {recall:.3f}" if recall is not None else "")
        )
    timings = manifest.timings_seconds
    total = sum(v for v in timings.values() if isinstance(v, (int, float)))
    lines.append(f"build time   {total:.1f} s over {len(timings)} stages")
    v = manifest.versions
    lines.append(
        f"versions     trakview {v.get('trakview')}, torch {v.get('torch')}, "
        f"open_clip {v.get('open_clip')}, traker {v.get('traker')}"
    )
    return "\n".join(lines)
