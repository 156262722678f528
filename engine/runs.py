"""Opening a finished run directory: the manifest check and a human-readable summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import store


def read_manifest(run: str | Path) -> dict[str, Any]:
    """Reads a run's manifest, refusing a missing, incomplete or other-version run."""
    run = Path(run)
    if not run.is_dir():
        raise store.RunError(f"run directory {run} does not exist; build one with `trakview build`")
    path = store.manifest_path(run)
    if not path.is_file():
        hint = (
            "the build has not finished: run the same `trakview build` again to resume it"
            if store.config_path(run).is_file()
            else "it is not a trakview run (create one with `trakview build` or `trakview demo`)"
        )
        raise store.RunError(f"{run} has no manifest.json: {hint}")
    manifest = store.read_json(path)
    version = manifest.get("format_version")
    if version != store.FORMAT_VERSION:
        raise store.RunError(
            f"run {run} has format version {version}, this trakview reads version "
            f"{store.FORMAT_VERSION}; rebuild it with this version's `trakview build`"
        )
    return manifest


def summary(manifest: dict[str, Any]) -> str:
    """A few lines describing a run, for ``trakview info``."""
    cfg, counts = manifest["config"], manifest["counts"]
    timings = manifest.get("timings_seconds", {})
    lines = [
        f"model        {cfg['model']} x {counts['n_checkpoints']} checkpoints",
        f"pairs        {counts['n_train']} train, {counts['n_val']} val",
        f"TRAK         proj_dim {counts['proj_dim']}, grad params {cfg['grad_params']}, "
        f"simulated batch {cfg['sim_batch_size']}, device {cfg['device']}",
    ]
    for m, cond in enumerate(manifest.get("conditioning", [])):
        lines.append(
            f"  ckpt {m}     X^T X rank {cond.get('rank')}/{cond.get('proj_dim')}, "
            f"lambda {cond.get('lambda', 0):.3g}, condition {cond.get('condition', 0):.3g}"
        )
    for name, idx in manifest.get("indexes", {}).items():
        recall = idx.get("recall_at_10")
        lines.append(
            f"  index      {name}: {idx.get('kind')} over {idx.get('n')} x {idx.get('dim')}"
            + (f", recall@10 {recall:.3f}" if recall is not None else "")
        )
    total = sum(v for v in timings.values() if isinstance(v, (int, float)))
    lines.append(f"build time   {total:.1f} s over {len(timings)} stages")
    v = manifest.get("versions", {})
    lines.append(
        f"versions     trakview {v.get('trakview')}, torch {v.get('torch')}, "
        f"open_clip {v.get('open_clip')}, traker {v.get('traker')}"
    )
    return "\n".join(lines)
