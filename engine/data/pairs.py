"""Image–caption pairs: a split's records and the folder their image paths start from.

A pair list is a JSONL file, one record per pair with at least ``id``, ``caption`` and ``image``
(a path, absolute or relative to the JSONL file, or ``SHARD.tar::MEMBER`` for an image inside a
WebDataset shard); every other field is kept as it is (the demo world's ground-truth fields, for
example). Other source formats are read by ``engine.data.sources``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import files
from engine.errors import DataError

REQUIRED_FIELDS = ("id", "caption", "image")


@dataclass
class PairSet:
    """The pairs of one split, with the folder their relative image paths start from."""

    records: list[dict[str, Any]]
    root: Path

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.records]

    @property
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.records]

    def image_path(self, i: int) -> Path:
        """The image's path (for an image in a tar shard: ``SHARD.tar::MEMBER`` as a Path)."""
        return self.root / self.records[i]["image"]

    def image_ref(self, i: int) -> str:
        """The image as ``open_image`` takes it: a path or ``SHARD.tar::MEMBER``."""
        return str(self.image_path(i))


def read_pairs(path: str | os.PathLike) -> PairSet:
    """Reads a JSONL pair list and checks that every record has an id, a caption and an image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pair list {path} does not exist; expected a .jsonl file of pairs")
    records = files.read_jsonl(path)
    if not records:
        raise DataError(f"pair list {path} is empty; expected one JSON record per line")
    seen: set[str] = set()
    for n, rec in enumerate(records, 1):
        missing = [f for f in REQUIRED_FIELDS if f not in rec]
        if missing:
            raise DataError(
                f"{path}: record {n} lacks {missing}; every record needs "
                f"{list(REQUIRED_FIELDS)}, got keys {sorted(rec)}"
            )
        rid = str(rec["id"])
        if rid in seen:
            raise DataError(f"{path}: id {rid!r} appears twice; ids must be unique")
        seen.add(rid)
    return PairSet(records, path.parent.resolve())


def save_pairs(
    root: str | os.PathLike,
    split: str,
    records: list[dict[str, Any]],
    images: Any,
) -> Path:
    """Writes one split of a generated data set: PNGs under ``images/SPLIT/`` and ``SPLIT.jsonl``.

    The jsonl holds each record with ``image`` set to the PNG's path relative to ``root``.
    """
    root = Path(root)
    out = []
    for rec, pixels in zip(records, images, strict=True):
        rel = Path("images") / split / f"{rec['id']}.png"
        files.save_png(root / rel, pixels)
        out.append({"id": rec["id"], "caption": rec["caption"], "image": rel.as_posix(), **rec})
    jsonl = pair_list_path(root, split)
    files.write_jsonl(jsonl, out)
    return jsonl


def pair_list_path(root: str | os.PathLike, split: str) -> Path:
    """Where ``save_pairs`` writes a split's pair list: ``ROOT/SPLIT.jsonl``."""
    return Path(root) / f"{split}.jsonl"
