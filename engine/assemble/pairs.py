"""The build's first stage: check every pair and write the run's pair lists.

``check_pairs`` opens every image and checks every caption, then writes ``train.jsonl``,
``val.jsonl`` (image paths relative to the run directory, so a folder holding the run and its
data can be moved) and ``skipped.jsonl`` (the unusable pairs, each with its reason).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from engine import files
from engine.data.images import TAR_SEPARATOR
from engine.data.loading import check_images
from engine.data.pairs import PairSet
from engine.errors import DataError
from engine.run.layout import RunLayout

log = logging.getLogger(__name__)


def fingerprint(pairs: PairSet) -> str:
    """A short hash of a split's ids, captions and image paths (a resume must see the same)."""
    digest = hashlib.sha256()
    for rec in pairs.records:
        digest.update(f"{rec['id']}\t{rec['caption']}\t{rec['image']}\n".encode())
    return digest.hexdigest()[:16]


def relative_to_run(path: Path, out: Path) -> str:
    """``path`` relative to the run directory, so that a folder holding both can be moved."""
    return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()


def _run_pairs(pairs: PairSet, out: Path) -> list[dict[str, Any]]:
    """Records for the run's jsonl: image paths (or tar shards) relative to the run directory."""
    rows = []
    for i, rec in enumerate(pairs.records):
        path, sep, member = pairs.image_ref(i).partition(TAR_SEPARATOR)
        rel = relative_to_run(Path(path), out) + sep + member
        rows.append({**rec, "id": str(rec["id"]), "image": rel})
    return rows


def check_pairs(
    train: PairSet, val: PairSet, layout: RunLayout, workers: int, strict: bool
) -> dict[str, Any]:
    """The ``pairs`` stage: opens every image and checks every caption, then writes the run's
    train.jsonl, val.jsonl and skipped.jsonl (the unusable pairs, each with its reason).

    Raises:
        DataError: with ``strict``, any skipped pair; or too few usable pairs left.
    """
    kept, skipped = {}, []
    for split, pairs in (("train", train), ("val", val)):
        kept[split], bad = check_images(pairs, workers, desc=f"checking {split} images")
        skipped += [{"split": split, **row} for row in bad]
    files.write_jsonl(layout.skipped, skipped)
    if skipped:
        first = "; ".join(f"{r['id']}: {r['reason']}" for r in skipped[:3])
        log.warning("%d pairs skipped (listed in %s), e.g. %s", len(skipped), layout.skipped, first)
        if strict:
            raise DataError(
                f"{len(skipped)} pairs cannot be used ({first}); all are listed in "
                f"{layout.skipped}. Fix or remove them, or drop --strict to skip them"
            )
    if len(kept["train"]) < 2 or len(kept["val"]) < 1:
        raise DataError(
            f"after skipping unusable pairs, {len(kept['train'])} training and "
            f"{len(kept['val'])} validation pairs are left; see {layout.skipped}"
        )
    for split in ("train", "val"):
        files.write_jsonl(layout.pairs(split), _run_pairs(kept[split], layout.root))
    reasons: dict[str, int] = {}
    for row in skipped:
        kind = row["reason"].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "skipped": {s: sum(r["split"] == s for r in skipped) for s in ("train", "val")},
        "skipped_reasons": reasons,
    }
