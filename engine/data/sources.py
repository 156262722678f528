"""Reading image–caption pairs in the formats open_clip users already have.

Every reader returns a :class:`engine.data.pairs.PairSet`: records with ``id``, ``caption`` and
``image`` (a path relative to the set's root, or ``SHARD.tar::MEMBER`` for an image inside a
WebDataset shard), plus every other column of the source as it is. Formats (``--format``, or
detected from the path):

========== ======================================================================================
format     what it reads
========== ======================================================================================
jsonl      one JSON object per line: image path and caption (keys ``image`` / ``caption``)
csv        open_clip_train's CSV/TSV (columns ``filepath`` / ``title``, tab-separated) or any
           CSV with an image path and a caption per line (``--img-key``, ``--caption-key``,
           ``--csv-separator``; a ``.csv`` whose header has no tab is read comma-separated)
coco       COCO captions JSON (``images`` + ``annotations``), one pair per image (its first
           caption) or, with ``coco_captions="all"``, one pair per caption
imagefolder a folder with ``metadata.jsonl`` or ``metadata.csv`` (Hugging Face image-folder:
           ``file_name`` + a caption column, ``text`` by default)
wds        WebDataset shards ``{000000..000009}.tar``: per key an image (jpg, png, ...) and a
           ``txt`` caption, read in shard order
========== ======================================================================================

Image paths are relative to the file that lists them, or to ``--image-root``; ids come from an
``id`` column, else from the image paths (``engine.data.naming`` has both rules).
"""

from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from engine.data.images import IMAGE_EXTENSIONS, TAR_SEPARATOR
from engine.data.naming import coco_split_folders, image_root, readable_ids
from engine.data.pairs import PairSet
from engine.errors import DataError

FORMATS = ("jsonl", "csv", "coco", "imagefolder", "wds")


@dataclass
class SourceOptions:
    """How a source's records are named; ``None`` = the format's own default."""

    format: str | None = None  # one of FORMATS; None = detect from the path
    img_key: str | None = None  # column of the image path (csv: filepath, jsonl: image, ...)
    caption_key: str | None = None  # column of the caption (csv: title, jsonl: caption, ...)
    id_key: str = "id"  # column of the pair id, used when present
    csv_separator: str | None = None  # None = tab, or comma for a .csv without a tab in its header
    coco_captions: str = "first"  # "first": one pair per image; "all": one pair per caption
    image_root: str | None = None  # folder the listed image paths start from (default: found)

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.coco_captions not in ("first", "all"):
            raise DataError(f"--coco-captions must be 'first' or 'all', got {self.coco_captions!r}")


DEFAULT_KEYS = {  # (image column, caption column) per format
    "jsonl": ("image", "caption"),
    "csv": ("filepath", "title"),  # open_clip_train's --csv-img-key / --csv-caption-key
    "imagefolder": ("file_name", "text"),
}


def expand_braces(spec: str) -> list[str]:
    """Expands WebDataset's shard notation: ``a/{000..002}.tar`` -> three paths (also ``::``-
    or space-separated lists of such specs, as open_clip_train accepts)."""
    out: list[str] = []
    for part in re.split(r"::|\s+", spec.strip()):
        if not part:
            continue
        match = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if not match:
            out.append(part)
            continue
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            out.extend(
                expand_braces(part[: match.start()] + f"{n:0{width}d}" + part[match.end() :])
            )
    return out


def detect_format(spec: str | os.PathLike) -> str:
    """The format of a source from its path (see the module docstring)."""
    text = str(spec)
    if "{" in text or text.endswith(".tar") or ".tar::" in text:
        return "wds"
    path = Path(text)
    if path.is_dir():
        if any((path / f"metadata.{ext}").is_file() for ext in ("jsonl", "csv")):
            return "imagefolder"
        raise DataError(
            f"{path} is a folder without metadata.jsonl or metadata.csv; an image folder needs "
            "one (Hugging Face convention: a file_name column and a caption column)"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".json":
        return "coco"
    raise DataError(
        f"cannot tell the format of {text}: expected .jsonl, .csv/.tsv, COCO .json, a folder "
        f"with metadata.jsonl/csv or WebDataset .tar shards; name it with --format "
        f"({', '.join(FORMATS)})"
    )


def read_source(spec: str | os.PathLike, options: SourceOptions | None = None) -> PairSet:
    """Reads the pairs of one source (path, folder or shard spec) in its own order.

    Captions are stripped; nothing is opened or checked here besides the listing itself (images
    are checked when the build first reads them, see ``engine.data.loading.check_images``).
    """
    options = options or SourceOptions()
    fmt = options.format or detect_format(spec)
    if fmt == "wds":
        return _read_wds(str(spec))
    path = Path(spec)
    if fmt == "imagefolder":
        if not path.is_dir():
            raise DataError(f"image folder {path} does not exist or is not a folder")
        meta = next(
            (
                path / f"metadata.{e}"
                for e in ("jsonl", "csv")
                if (path / f"metadata.{e}").is_file()
            ),
            None,
        )
        if meta is None:
            raise DataError(f"image folder {path} has no metadata.jsonl or metadata.csv")
        rows = _read_rows(meta, "jsonl" if meta.suffix == ".jsonl" else "csv", options)
        return _pairs_from_rows(rows, meta, "imagefolder", options)
    if not path.is_file():
        raise DataError(f"{fmt} source {path} does not exist or is not a file")
    if fmt == "coco":
        return _read_coco(path, options)
    return _pairs_from_rows(_read_rows(path, fmt, options), path, fmt, options)


def _read_rows(path: Path, fmt: str, options: SourceOptions) -> list[dict[str, Any]]:
    if fmt == "jsonl":
        rows = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{lineno} is not valid JSON: {err.msg}") from err
        return rows
    with open(path, encoding="utf-8", newline="") as fh:
        header = fh.readline()
        fh.seek(0)
        sep = options.csv_separator
        if sep is None:
            sep = "\t" if "\t" in header or path.suffix.lower() == ".tsv" else ","
        return list(csv.DictReader(fh, delimiter=sep))


def _pairs_from_rows(
    rows: list[dict[str, Any]], listing: Path, fmt: str, options: SourceOptions
) -> PairSet:
    if not rows:
        raise DataError(f"{listing} lists no pairs")
    img_key, cap_key = DEFAULT_KEYS[fmt]
    img_key, cap_key = options.img_key or img_key, options.caption_key or cap_key
    for key, flag in ((img_key, "--img-key"), (cap_key, "--caption-key")):
        if key not in rows[0]:
            raise DataError(
                f"{listing} has no column {key!r} (columns: {sorted(rows[0])}); name the "
                f"{'image path' if flag == '--img-key' else 'caption'} column with {flag}"
            )
    records = []
    for n, row in enumerate(rows, 1):
        if row.get(img_key) in (None, ""):
            raise DataError(f"{listing}: pair {n} has no image path in column {img_key!r}")
        rec = {k: v for k, v in row.items() if k not in (img_key, cap_key)}
        rec["image"] = PurePosixPath(str(row[img_key]).replace("\\", "/")).as_posix()
        rec["caption"] = _caption(row.get(cap_key))
        records.append(rec)
    root = image_root(listing, records, options.image_root)
    return PairSet(readable_ids(records, options.id_key, root), root)


def _read_coco(path: Path, options: SourceOptions) -> PairSet:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise DataError(
            f"{path} is not a COCO captions file: expected a JSON object with 'images' and "
            "'annotations' (use --format jsonl for one record per line)"
        )
    captions: dict[Any, list[dict[str, Any]]] = {}
    for ann in doc["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann)
    records = []
    for img in doc["images"]:
        anns = sorted(captions.get(img["id"], []), key=lambda a: a.get("id", 0))
        if options.coco_captions == "first":
            anns = anns[:1] or [{"caption": ""}]
        for ann in anns:
            rec = {"image": str(img[options.img_key or "file_name"]), "coco_image_id": img["id"]}
            if "id" in ann:
                rec["coco_annotation_id"] = ann["id"]
            rec["caption"] = _caption(ann.get(options.caption_key or "caption"))
            records.append(rec)
    if not records:
        raise DataError(f"{path} lists no images")
    # as downloaded, the images of annotations/captions_train2017.json are in ../train2017/
    root = image_root(path, records, options.image_root, coco_split_folders(path))
    return PairSet(readable_ids(records, options.id_key, root), root)


def _read_wds(spec: str) -> PairSet:
    shards = expand_braces(spec)
    if not shards:
        raise DataError(f"no WebDataset shards in {spec!r}")
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(shards)} WebDataset shards are missing, first {missing[0]}"
        )
    root = Path(os.path.commonpath([str(Path(s).resolve().parent) for s in shards]))
    records = []
    for shard in shards:
        shard_path = Path(shard).resolve()
        rel = Path(os.path.relpath(shard_path, root)).as_posix()
        for key, members in _wds_samples(shard_path):
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            rec: dict[str, Any] = {"key": key, "shard": rel}
            rec["image"] = f"{rel}{TAR_SEPARATOR}{image}" if image else ""
            rec["caption"] = _caption(members.get("txt_text"))
            meta = _json_or_none(members.get("json_text"))
            if isinstance(meta, dict):  # a sample's .json: kept as extra fields
                rec.update({k: v for k, v in meta.items() if k not in rec})
            records.append(rec)
    if not records:
        raise DataError(f"the WebDataset shards {spec!r} hold no samples")
    # ids from the keys (an "id" in a sample's .json wins), by the rule of image paths
    names = [f"{r['shard']}{TAR_SEPARATOR}{r['key']}" for r in records]
    return PairSet(readable_ids(records, "id", root, names), root)


def _wds_samples(shard: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(key, {extension: member name, 'txt_text': caption}) per sample, in the shard's order.

    As webdataset does, a sample is the run of consecutive members sharing a key (the member
    name up to the first dot of its base name).
    """
    current: str | None = None
    members: dict[str, str] = {}
    try:
        with tarfile.open(shard) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                directory, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                if key != current:
                    if current is not None:
                        yield current, members
                    current, members = key, {}
                ext = ext.lower()
                members[ext] = info.name
                if ext in ("txt", "json"):
                    fh = tar.extractfile(info)
                    members[f"{ext}_text"] = fh.read().decode("utf-8", "replace") if fh else ""
    except tarfile.TarError as err:
        raise DataError(f"WebDataset shard {shard} is not a readable tar file: {err}") from err
    if current is not None:
        yield current, members


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def _caption(value: Any) -> str:
    return "" if value is None else str(value).strip()


def split_val(pairs: PairSet, fraction: float, seed: int) -> tuple[PairSet, PairSet]:
    """Splits one source into (train, val) reproducibly: a seeded choice of round(n * fraction)
    pairs goes to val; both keep the source's order."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {fraction}")
    n = len(pairs)
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise DataError(
            f"--val-fraction {fraction} of {n} pairs leaves {n_val} for validation and "
            f"{n - n_val} for training; both need at least one"
        )
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n, size=n_val, replace=False)] = True
    train = [r for r, v in zip(pairs.records, is_val, strict=True) if not v]
    val = [r for r, v in zip(pairs.records, is_val, strict=True) if v]
    return PairSet(train, pairs.root), PairSet(val, pairs.root)
