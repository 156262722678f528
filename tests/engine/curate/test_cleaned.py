"""The cleaned training set round-trips in every source format: read back with trakview's own
reader, the cleaned set plus the removed pairs is the source, in order; single-file listings
keep every kept row as it was; the source is never touched and a failed check leaves nothing."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from engine.curate import cleaned as cleaned_mod
from engine.curate.baskets import Basket, Entry
from engine.curate.cleaned import clean, export_cleaned, read_back
from engine.curate.source import given_source
from engine.data.sources import SourceOptions
from engine.errors import CurateError
from engine.files import read_json, read_jsonl

N = 24
GONE = (0, 5, 6, 17)  # source positions removed (the first, a run of two, one more)
VARIANTS = {  # name -> (format, options)
    "jsonl": ("jsonl", {}),
    "csv-tab": ("csv", {}),
    "csv-comma": ("csv", {}),
    "tsv-crlf": ("csv", {}),
    "coco-first": ("coco", {"coco_captions": "first"}),
    "coco-all": ("coco", {"coco_captions": "all"}),
    "imagefolder-jsonl": ("imagefolder", {}),
    "imagefolder-csv": ("imagefolder", {"caption_key": "text"}),
    "wds": ("wds", {}),
}


@pytest.fixture(scope="module")
def rows(pairs, tmp_path_factory):
    """N pairs of the small world copied into one folder: image path (relative), caption and
    two extra columns (one with a comma and a quote, to test quoting)."""
    folder = tmp_path_factory.mktemp("sources")
    train, _ = pairs
    out = []
    for n in range(N):
        rel = f"images/{n:03d}.png"
        (folder / "images").mkdir(exist_ok=True)
        (folder / rel).write_bytes(train.image_path(n).read_bytes())
        out.append({"image": rel, "caption": train.captions[n], "note": f'n={n}, "q"', "k": n})
    return folder, out


def write_source(variant: str, folder: Path, rows: list[dict], tag: str = "") -> str:
    """The rows as a source of one variant, in its own folder (images reached by ../)."""
    home = folder / f"{variant}{tag}"
    home.mkdir()
    up = [{**r, "image": f"../{r['image']}"} for r in rows]
    if variant == "jsonl":
        path = home / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in up) + "\n")  # a blank line
        return str(path)
    if variant.startswith(("csv", "tsv")):
        sep = "," if variant == "csv-comma" else "\t"
        path = home / ("pairs.tsv" if variant.startswith("tsv") else "pairs.csv")
        with open(path, "w", newline="") as fh:
            writer = csv.writer(
                fh, delimiter=sep, lineterminator="\r\n" if "crlf" in variant else "\n"
            )
            writer.writerow(["filepath", "title", "note", "k"])
            writer.writerows([r["image"], r["caption"], r["note"], r["k"]] for r in up)
        return str(path)
    if variant.startswith("coco"):
        path = home / "captions.json"
        images = [{"id": 100 + n, "file_name": r["image"]} for n, r in enumerate(up)]
        anns = [
            {"id": 500 + n, "image_id": 100 + n, "caption": r["caption"]} for n, r in enumerate(up)
        ]
        anns += [
            {"id": 900 + n, "image_id": 100 + n, "caption": f"second {n}"} for n in range(0, N, 3)
        ]
        path.write_text(json.dumps({"info": {"v": 1}, "images": images, "annotations": anns}))
        return str(path)
    if variant.startswith("imagefolder"):
        if variant.endswith("csv"):
            with open(home / "metadata.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["file_name", "text", "note"])
                writer.writerows([r["image"], r["caption"], r["note"]] for r in up)
        else:
            listing = [{"file_name": r["image"], "text": r["caption"], "k": r["k"]} for r in up]
            (home / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in listing))
        return str(home)
    for s in range(2):  # wds: two shards of N / 2 samples
        with tarfile.open(home / f"{s:06d}.tar", "w") as tar:
            for r in rows[s * N // 2 : (s + 1) * N // 2]:
                key = Path(r["image"]).stem
                members = {
                    ".png": (folder / r["image"]).read_bytes(),
                    ".txt": r["caption"].encode(),
                    ".json": json.dumps({"k": r["k"]}).encode(),
                }
                for ext, payload in members.items():
                    info = tarfile.TarInfo(key + ext)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(home / "{000000..000001}.tar")


def basket_of(records: list[dict], positions) -> Basket:
    entries = [
        Entry(
            str(records[k]["id"]), k, records[k]["caption"], "ann", "2026-01-01", f"why {k}", "cli"
        )
        for k in positions
    ]
    return Basket(name="test", entries=entries)


def bare(record: dict) -> dict:
    drop = ("id", "source_index", "who", "when", "why", "how")
    return {k: v for k, v in record.items() if k not in drop}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_format_round_trips(variant, rows, tmp_path):
    folder, data = rows
    fmt, options = VARIANTS[variant]
    source = given_source(write_source(variant, folder, data), SourceOptions(format=fmt, **options))
    original = source.read().records
    listing_before = {p: p.read_bytes() for p in Path(folder / variant).rglob("*") if p.is_file()}
    basket = basket_of(original, GONE)
    out = export_cleaned(clean(source, basket), tmp_path / "cleaned")

    cleaned = clean(source, basket)  # the same content, in memory
    back = read_back(out, cleaned)
    removed = read_jsonl(out / "removed.jsonl")
    assert [r["source_index"] for r in removed] == list(GONE)
    assert [r["id"] for r in removed] == [original[k]["id"] for k in GONE]
    assert [r["why"] for r in removed] == [f"why {k}" for k in GONE]
    merged = iter(back)
    rebuilt = [
        bare(removed[GONE.index(k)]) if k in GONE else bare(next(merged))
        for k in range(len(original))
    ]
    assert rebuilt == [bare(r) for r in original]  # cleaned + removed = the source, in order
    assert next(merged, None) is None
    summary = read_json(out / "cleaned.json")
    assert summary["counts"] == {"source": len(original), "kept": len(original) - 4, "removed": 4}
    assert summary["check"].startswith(
        f"read back with trakview's reader: {len(original) - 4} pairs"
    )
    # the source is untouched
    assert {
        p: p.read_bytes() for p in Path(folder / variant).rglob("*") if p.is_file()
    } == listing_before


def test_single_file_listings_keep_the_kept_rows_as_they_were(rows, tmp_path):
    folder, data = rows
    for variant in ("jsonl", "tsv-crlf", "csv-comma"):
        source = given_source(write_source(variant, folder, data, tmp_path.name), SourceOptions())
        basket = basket_of(source.read().records, GONE)
        cleaned = clean(source, basket)
        raw = Path(source.train).read_bytes()
        newline = b"\r\n" if variant == "tsv-crlf" else b"\n"
        lines = [line for line in raw.split(newline) if line.strip()]
        header = [] if variant == "jsonl" else lines[:1]
        body = lines[len(header) :]
        kept = header + [line for n, line in enumerate(body) if n not in GONE]
        assert cleaned.files[cleaned.main] == b"".join(line + newline for line in kept), variant


def test_coco_first_removes_the_image_and_all_its_captions(rows, tmp_path):
    folder, data = rows
    first = given_source(write_source("coco-first", folder, data, tmp_path.name), SourceOptions())
    basket = basket_of(first.read().records, [3])  # image 103 has a second caption (900 + 3)
    doc = json.loads(clean(first, basket).files["captions.json"])
    assert 103 not in [i["id"] for i in doc["images"]] and doc["info"] == {"v": 1}
    assert not [a for a in doc["annotations"] if a["image_id"] == 103]
    every = given_source(first.train, SourceOptions(coco_captions="all"))
    records = every.read().records
    k = next(n for n, r in enumerate(records) if r.get("coco_annotation_id") == 503)
    doc = json.loads(clean(every, basket_of(records, [k])).files["captions.json"])
    assert [a["id"] for a in doc["annotations"] if a["image_id"] == 103] == [903]
    assert 103 in [i["id"] for i in doc["images"]]  # it keeps its other caption


def test_wds_writes_the_keys_to_skip(rows, tmp_path):
    folder, data = rows
    source = given_source(write_source("wds", folder, data, tmp_path.name), SourceOptions())
    records = source.read().records
    cleaned = clean(source, basket_of(records, GONE))
    assert cleaned.main == "skip_keys.txt"
    assert cleaned.files["skip_keys.txt"].decode().splitlines() == [records[k]["key"] for k in GONE]


def test_refusals_and_a_failed_check_leave_nothing(rows, tmp_path, monkeypatch):
    folder, data = rows
    source = given_source(write_source("jsonl", folder, data, tmp_path.name), SourceOptions())
    records = source.read().records
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    with pytest.raises(CurateError, match="not an empty folder"):
        export_cleaned(clean(source, basket_of(records, GONE)), taken)
    with pytest.raises(CurateError, match="inside the source"):
        export_cleaned(clean(source, basket_of(records, GONE)), Path(source.train) / "out")
    stranger = basket_of(records, [1])
    stranger.entries[0].id = "not-in-the-source"
    with pytest.raises(CurateError, match="not in .* the source changed"):
        clean(source, stranger)
    changed = basket_of(records, [1])
    changed.entries[0].caption = "another caption"
    with pytest.raises(CurateError, match="has the caption"):
        clean(source, changed)

    def broken(folder, cleaned):
        raise CurateError("the check failed")

    monkeypatch.setattr(cleaned_mod, "check", broken)
    with pytest.raises(CurateError, match="the check failed"):
        export_cleaned(clean(source, basket_of(records, GONE)), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new.")]
    assert np.array_equal(clean(source, basket_of(records, GONE)).gone.nonzero()[0], GONE)
