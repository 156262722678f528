"""Where a source's images are, and what its pairs are called.

**Image root.** Paths in a listing are relative to the folder they start from: the listing's own
folder, ``--image-root DIR`` when given, or, for COCO as downloaded
(``annotations/captions_train2017.json`` beside ``train2017/``), the folder named after the JSON's
split. When none of a sample of the listed images exists under any candidate, the source is
refused with the folders tried and the flag that fixes it.

**Ids.** A pair keeps the id of its id column (``--id-key``) as it is. Without one, its id is its
image path relative to the deepest folder common to the source's images, without the extension
(``/data/coco/train2017/000000391895.jpg`` -> ``000000391895`` when every image is in
``train2017/``; ``cats/01.jpg`` and ``dogs/01.jpg`` keep their folders). Two pairs of the same
image (COCO's other captions) get ``#1``, ``#2``, ... appended: ids are unique by construction.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from engine.data.images import TAR_SEPARATOR
from engine.errors import DataError

ROOT_SAMPLE = 64  # listed images probed to decide where a source's images are


def _sample(records: Sequence[dict[str, Any]], size: int = ROOT_SAMPLE) -> list[str]:
    """Image paths of up to ``size`` records spread over the listing."""
    paths = [str(r.get("image") or "") for r in records]
    paths = [p for p in paths if p]
    step = max(1, len(paths) // size)
    return paths[::step][:size]


def found_under(root: Path, records: Sequence[dict[str, Any]]) -> int:
    """How many of the sampled image paths exist under ``root`` (absolute paths as they are)."""
    return sum((root / p).is_file() for p in _sample(records))


def coco_split_folders(listing: Path) -> list[Path]:
    """Where COCO as downloaded keeps the images of a captions JSON: ``captions_train2017.json``
    in ``annotations/`` -> ``../train2017/`` (and ``train2017/`` beside the JSON)."""
    match = re.fullmatch(r"(?:captions|instances|person_keypoints)_(\w+)", listing.stem)
    if not match:
        return []
    split = match.group(1)
    return [listing.parent.parent / split, listing.parent / split]


def image_root(
    listing: Path,
    records: Sequence[dict[str, Any]],
    image_root_flag: str | os.PathLike | None,
    candidates: Sequence[Path] = (),
) -> Path:
    """The folder the listed image paths start from.

    Args:
        listing: the file that lists the pairs.
        records: its records (``image`` holds each path as listed).
        image_root_flag: ``--image-root``, when given: used as it is (it must exist).
        candidates: other folders to try after the listing's own (COCO's split folder).

    Raises:
        DataError: ``--image-root`` is not a folder, or no sampled image exists under any folder
            tried; the message names the folders and the flag.
    """
    if image_root_flag is not None:
        root = Path(image_root_flag).expanduser()
        if not root.is_dir():
            raise DataError(f"--image-root {root} does not exist or is not a folder")
        tried = [root.resolve()]
    else:
        tried = [listing.parent.resolve(), *(c.resolve() for c in candidates)]
    sample = _sample(records)
    if not sample:
        return tried[0]
    for root in tried:
        if found_under(root, records):
            return root
    if all(os.path.isabs(p) for p in sample):
        looked = "at the absolute paths listed"
    else:
        looked = "in " + ", ".join(str(r) for r in tried)
    raise DataError(
        f"none of the images listed in {listing} were found (looked {looked}; first path "
        f"{sample[0]!r}). Pass --image-root DIR: the folder the image paths of {listing.name} "
        "start from"
    )


def readable_ids(
    records: list[dict[str, Any]], id_key: str, root: Path, names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Gives every record a unique string id (see the module docstring).

    Args:
        names: per record, the path its id is made from (default: its image; a WebDataset
            sample's ``SHARD.tar::KEY``).
    """
    names = names if names is not None else [str(r.get("image") or "") for r in records]
    paths = [_full_path(root, name) for name in names]
    folders = [os.path.dirname(p) for p in paths if p]
    common = os.path.commonpath(folders) if folders else ""
    seen: dict[str, int] = {}
    out = []
    for rec, path in zip(records, paths, strict=True):
        if rec.get(id_key) not in (None, ""):
            base = str(rec.pop(id_key))
        elif path:
            base = PurePosixPath(os.path.relpath(path, common)).with_suffix("").as_posix()
        else:
            base = f"pair-{len(out)}"
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append({"id": base if n == 0 else f"{base}#{n}", **rec})
    return out


def _full_path(root: Path, image: str) -> str:
    """The image's normalised path (a shard member: its path inside the shard's folder)."""
    if not image:
        return ""
    shard, sep, member = image.partition(TAR_SEPARATOR)
    if sep:
        return os.path.normpath(os.path.join(root, os.path.dirname(shard), member))
    return os.path.normpath(os.path.join(root, image))
