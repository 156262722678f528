"""A cleaned training set: the run's source without a basket's pairs, in the source's own format.

==========  ========================================================================================
source      the cleaned set
==========  ========================================================================================
csv         the same columns, separator and line ending; every kept row's values as they were
jsonl       the kept lines, byte for byte
coco        the same JSON without the removed pairs: with ``coco_captions="first"`` a removed
            pair's image and all its captions (else its next caption would become a pair); with
            ``"all"`` its annotation, and an image whose every caption was removed
imagefolder ``metadata.jsonl`` / ``metadata.csv`` as for jsonl / csv
wds         ``skip_keys.txt``: the WebDataset keys to skip, one per line (the shards stay as they
            are)
==========  ========================================================================================

Beside it: ``removed.jsonl`` (each removed pair's source record, its place in the source and who
removed it, when and why) and ``cleaned.json`` (what was cleaned, how to read it back, counts).
Image paths are kept as listed, so they resolve from the same place as the source's did (the
summary names that folder: ``--image-root``). ``export_cleaned`` writes a new folder atomically
(built beside it, then renamed), never touching the source, and first reads the cleaned set
back with trakview's own reader: it must give the source's pairs minus the removed ones.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine import files
from engine.curate.baskets import Basket
from engine.curate.source import RunSource, run_source
from engine.data.pairs import PairSet
from engine.data.sources import read_source
from engine.errors import CurateError, DataError
from engine.run.layout import RunLayout
from engine.run.manifest import Manifest

REMOVED = "removed.jsonl"
SUMMARY = "cleaned.json"
SKIP_KEYS = "skip_keys.txt"
METADATA = ("metadata.jsonl", "metadata.csv")  # an image folder's listing, in reading order


@dataclass
class CleanedSet:
    """The cleaned set's files in memory (nothing written yet)."""

    files: dict[str, bytes]  # file name -> content; ``main`` first
    main: str  # the cleaned listing (wds: the key list)
    source: RunSource
    pairs: PairSet  # the source as read
    gone: np.ndarray  # (n_source,) bool: the removed pairs
    summary: dict[str, Any]


def reasons(basket: Basket) -> dict[str, dict[str, str]]:
    """Who removed each pair of a basket, when, why and how, by id."""
    return {
        e.id: {"who": e.who, "when": e.when, "why": e.why, "how": e.how} for e in basket.entries
    }


def clean(source: RunSource, basket: Basket) -> CleanedSet:
    """The source without the basket's pairs, in memory.

    Raises:
        CurateError: a pair of the basket is not in the source, or has another caption there (the
            source changed since the build).
    """
    pairs = source.read()
    position = {rid: k for k, rid in enumerate(pairs.ids)}
    missing = [e.id for e in basket.entries if e.id not in position]
    if missing:
        raise CurateError(
            f"{len(missing)} pair(s) of basket {basket.name!r} are not in {source.train} "
            f"(e.g. {missing[:3]}): the source changed since the build, or is not the run's"
        )
    for e in basket.entries:
        have = pairs.records[position[e.id]]["caption"]
        if have != e.caption:
            raise CurateError(
                f"pair {e.id!r} has the caption {have!r} in {source.train} but {e.caption!r} in "
                "the run: the source changed since the build"
            )
    gone = np.zeros(len(pairs), dtype=bool)
    gone[[position[e.id] for e in basket.entries]] = True
    fmt = source.format
    content = WRITERS[fmt](source, pairs, gone)[1]
    why = reasons(basket)
    removed = [
        {**pairs.records[k], "source_index": int(k), **why[pairs.records[k]["id"]]}
        for k in np.flatnonzero(gone).tolist()
    ]
    extra = {REMOVED: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in removed)}
    main = listing_name(source)
    summary = {
        "basket": basket.name,
        "basket_digest": basket.digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {
            "train_data": source.train,
            "format": fmt,
            "recorded_in": source.found_in,
            "options": asdict(source.options),
        },
        "files": {"cleaned": main, "removed": REMOVED},
        "counts": {"source": len(pairs), "kept": int((~gone).sum()), "removed": int(gone.sum())},
        "image_root": str(pairs.root),
        "notes": _notes(source, fmt, pairs),
    }
    payload = {main: content, REMOVED: extra[REMOVED].encode()}
    payload[SUMMARY] = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode()
    return CleanedSet(payload, main, source, pairs, gone, summary)


def clean_run(
    layout: RunLayout, manifest: Manifest, basket: Basket, source: RunSource | None = None
) -> CleanedSet:
    """A run's source without a basket's pairs (``source``: the run's own, recorded by its build,
    unless given)."""
    return clean(source or run_source(layout, manifest), basket)


def listing_name(source: RunSource) -> str:
    """The file name the cleaned listing gets (known before anything is read)."""
    fmt = source.format
    if fmt == "wds":
        return SKIP_KEYS
    listing = Path(source.train)
    if fmt == "imagefolder":
        listing = next((listing / m for m in METADATA if (listing / m).is_file()), listing)
    return f"cleaned-{listing.name}" if listing.name in (REMOVED, SUMMARY) else listing.name


def _notes(source: RunSource, fmt: str, pairs: PairSet) -> list[str]:
    notes = [
        f"image paths are as the source lists them: read it with --image-root {pairs.root}"
        if fmt != "wds"
        else "the shards are unchanged: skip the keys of skip_keys.txt when reading them"
    ]
    if source.val_fraction:
        notes.append(
            f"the run's validation pairs were split from this source (--val-fraction "
            f"{source.val_fraction}): they are still in it, and a new split of the cleaned set "
            "draws other ones"
        )
    return notes


# --- one writer per format: (file name, content) of the cleaned listing --------------------------


def _separator(listing: Path, header: str, given: str | None) -> str:
    """The separator ``engine.data.sources`` reads a CSV listing with."""
    if given is not None:
        return given
    return "\t" if "\t" in header or listing.suffix.lower() == ".tsv" else ","


def _csv(listing: Path, given_sep: str | None, gone: np.ndarray) -> bytes:
    with open(listing, encoding="utf-8", newline="") as fh:
        raw = fh.read()
    first = raw.split("\n", 1)[0]
    sep = _separator(listing, first, given_sep)
    rows = list(csv.reader(io.StringIO(raw, newline=""), delimiter=sep))
    header, data = rows[0], [r for r in rows[1:] if r != []]  # blank lines: as csv.DictReader
    _check_count(listing, len(data), len(gone))
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=sep, lineterminator="\r\n" if first.endswith("\r") else "\n")
    writer.writerow(header)
    writer.writerows(row for row, g in zip(data, gone, strict=True) if not g)
    return out.getvalue().encode("utf-8")


def _jsonl(listing: Path, gone: np.ndarray) -> bytes:
    with open(listing, encoding="utf-8", newline="") as fh:
        lines = [line for line in fh.read().split("\n") if line.strip()]
    _check_count(listing, len(lines), len(gone))
    return "".join(line + "\n" for line, g in zip(lines, gone, strict=True) if not g).encode()


def _check_count(listing: Path, rows: int, pairs: int) -> None:
    if rows != pairs:
        raise CurateError(
            f"{listing} has {rows} rows but trakview read {pairs} pairs from it: cannot map the "
            "pairs back to its rows"
        )


def _listing(source: RunSource, pairs: PairSet, gone: np.ndarray) -> tuple[str, bytes]:
    listing = Path(source.train)
    fmt = source.format
    if fmt == "imagefolder":
        listing = next(listing / m for m in METADATA if (listing / m).is_file())
        fmt = "jsonl" if listing.suffix == ".jsonl" else "csv"
    if fmt == "jsonl":
        return listing.name, _jsonl(listing, gone)
    return listing.name, _csv(listing, source.options.csv_separator, gone)


def _coco(source: RunSource, pairs: PairSet, gone: np.ndarray) -> tuple[str, bytes]:
    listing = Path(source.train)
    doc = json.loads(listing.read_text(encoding="utf-8"))
    removed = [pairs.records[k] for k in np.flatnonzero(gone)]
    annotations = doc["annotations"]
    if source.options.coco_captions == "first":
        images = {r["coco_image_id"] for r in removed}
        kept_anns = [a for a in annotations if a["image_id"] not in images]
    else:
        if any("coco_annotation_id" not in r for r in removed):
            raise CurateError(f"{listing}: a removed caption has no annotation id to remove it by")
        gone_anns = {r["coco_annotation_id"] for r in removed}
        kept_anns = [a for a in annotations if a.get("id") not in gone_anns]
        had, has = {a["image_id"] for a in annotations}, {a["image_id"] for a in kept_anns}
        images = had - has
    cleaned = {
        **doc,
        "images": [img for img in doc["images"] if img["id"] not in images],
        "annotations": kept_anns,
    }
    return listing.name, json.dumps(cleaned, ensure_ascii=False).encode()


def _wds(source: RunSource, pairs: PairSet, gone: np.ndarray) -> tuple[str, bytes]:
    keys = [pairs.records[k]["key"] for k in np.flatnonzero(gone)]
    return SKIP_KEYS, "".join(f"{key}\n" for key in keys).encode()


WRITERS = {"csv": _listing, "jsonl": _listing, "imagefolder": _listing, "coco": _coco, "wds": _wds}


# --- reading it back ------------------------------------------------------------------------------


def read_back(folder: Path, cleaned: CleanedSet) -> list[dict[str, Any]]:
    """The records of a written cleaned set as trakview reads them (wds: the source's records
    without the listed keys)."""
    source, fmt = cleaned.source, cleaned.source.format
    if fmt == "wds":
        skip = set((folder / cleaned.main).read_text(encoding="utf-8").splitlines())
        return [r for r in source.read().records if r["key"] not in skip]
    options = replace(source.options, format=fmt, image_root=str(cleaned.pairs.root))
    spec = folder if fmt == "imagefolder" else folder / cleaned.main
    try:
        return read_source(spec, options).records
    except DataError as err:
        raise CurateError(f"the cleaned set cannot be read back: {err}") from err


def check(folder: Path, cleaned: CleanedSet) -> int:
    """Reads a written cleaned set back and compares it with the source minus the removed pairs
    (every field but the id, which trakview may derive from the images left).

    Returns:
        The number of pairs read back.

    Raises:
        CurateError: the first pair that differs.
    """
    got = [_without_id(r) for r in read_back(folder, cleaned)]
    want = [
        _without_id(r) for r, g in zip(cleaned.pairs.records, cleaned.gone, strict=True) if not g
    ]
    if got != want:
        first = next(
            (n for n, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
            min(len(got), len(want)),
        )
        raise CurateError(
            f"the cleaned set read back gives {len(got)} pairs, expected {len(want)}; first "
            f"difference at pair {first}: the cleaned set was not written"
        )
    return len(got)


def _without_id(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "id"}


def export_cleaned(cleaned: CleanedSet, out: str | os.PathLike) -> Path:
    """Writes a cleaned set into the new (or empty) folder ``out``, atomically: built and read
    back beside it, then renamed into place.

    Raises:
        CurateError: ``out`` holds files, or is (inside) the source; the read-back check failed.
    """
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CurateError(f"{out} exists and is not an empty folder: choose a new folder")
    for path in cleaned.source.paths():
        if out == path or path in out.parents:
            raise CurateError(f"{out} is inside the source {path}: choose a folder elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, content in cleaned.files.items():
            files.write_bytes(work / name, content)
        cleaned.summary["check"] = (
            f"read back with trakview's reader: {check(work, cleaned)} pairs, the source's "
            f"{len(cleaned.pairs)} minus the {int(cleaned.gone.sum())} removed"
        )
        files.write_json(work / SUMMARY, cleaned.summary)
        os.chmod(work, 0o755)  # mkdtemp makes 0700 folders
        os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return out
