"""Real data as users keep it: absolute image paths get short ids, COCO as downloaded builds with
no flag, ``--image-root`` points elsewhere, and a source whose images are nowhere says where it
looked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.data import sources
from engine.data.naming import readable_ids
from engine.errors import DataError
from engine.files import read_json, read_jsonl


def _copy_images(pairs, rows: range, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in rows:
        src = pairs.image_path(i)
        out.append(Path(shutil.copy(src, dest / f"{i:012d}{src.suffix}")))
    return out


def test_absolute_paths_give_short_unique_ids(tmp_path, pairs):
    train, _ = pairs
    photos = tmp_path / "home" / "me" / "photos"
    cats = _copy_images(train, range(0, 3), photos / "cats")
    dogs = _copy_images(train, range(0, 2), photos / "dogs")  # the same file names as cats
    listing = tmp_path / "elsewhere" / "train.csv"
    listing.parent.mkdir()
    lines = [f"{p}\t{train.captions[n]}" for n, p in enumerate([*cats, *dogs])]
    listing.write_text("filepath\ttitle\n" + "\n".join(lines) + "\n")
    got = sources.read_source(listing)
    assert got.ids == [
        "cats/000000000000",
        "cats/000000000001",
        "cats/000000000002",
        "dogs/000000000000",
        "dogs/000000000001",
    ]
    one_folder = sources.read_source(_csv(tmp_path / "one.csv", cats, train.captions))
    assert one_folder.ids == ["000000000000", "000000000001", "000000000002"]


def _csv(path: Path, images: list[Path], captions: list[str]) -> Path:
    lines = [f"{p}\t{c}" for p, c in zip(images, captions, strict=False)]
    path.write_text("filepath\ttitle\n" + "\n".join(lines) + "\n")
    return path


def test_id_column_wins_and_duplicates_are_numbered():
    records = [
        {"image": "a/x.jpg", "uid": "keep me/../as is"},
        {"image": "a/x.png"},
        {"image": "a/x.jpg"},
        {"image": ""},
    ]
    ids = [r["id"] for r in readable_ids(records, "uid", Path("/data"))]
    assert ids == ["keep me/../as is", "x", "x#1", "pair-3"]
    assert len(set(ids)) == len(ids)


def _coco_as_downloaded(root: Path, pairs, n: int, split: str) -> Path:
    """COCO's layout: annotations/captions_SPLIT.json beside SPLIT/*.jpg, bare file names."""
    images = _copy_images(pairs, range(n), root / split)
    doc = {
        "images": [{"id": i, "file_name": p.name} for i, p in enumerate(images)],
        "annotations": [
            {"id": 1000 + i, "image_id": i, "caption": pairs.captions[i]} for i in range(n)
        ],
    }
    path = root / "annotations" / f"captions_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_coco_as_downloaded_builds_with_no_flag_and_with_image_root(tmp_path, pairs, checkpoints):
    train, val = pairs
    coco = tmp_path / "coco"
    train_json = _coco_as_downloaded(coco, train, 60, "train2017")
    val_json = _coco_as_downloaded(coco, val, 12, "val2017")
    read = sources.read_source(train_json)
    assert read.root == (coco / "train2017").resolve()
    assert read.ids[:2] == ["000000000000", "000000000001"]

    runner = CliRunner()
    common = ["--checkpoint", str(checkpoints[0]), "--proj-dim", "16", "--topk", "3"]
    common += ["--projector", "gaussian", "--batch-size", "30", "--workers", "0"]
    out = tmp_path / "run"
    args = ["build", "--train-data", str(train_json), "--val-data", str(val_json)]
    result = runner.invoke(app, [*args, "--out", str(out), *common])
    assert result.exit_code == 0, result.output
    assert read_json(out / "manifest.json")["counts"]["n_train"] == 60
    assert [r["id"] for r in read_jsonl(out / "val.jsonl")][:1] == ["000000000000"]

    # the images moved elsewhere: --image-root finds them, and run.toml records it
    moved = tmp_path / "disk2" / "coco-images"
    shutil.copytree(coco / "train2017", moved)
    shutil.rmtree(coco / "train2017")
    with pytest.raises(DataError, match="--image-root") as err:
        sources.read_source(train_json)
    assert str((coco / "annotations").resolve()) in str(err.value)
    assert str((coco / "train2017").resolve()) in str(err.value)
    out2 = tmp_path / "run2"
    args2 = [*args, "--image-root", str(moved), "--out", str(out2), *common]
    # one --image-root serves both sources: the val images join the train ones
    shutil.copytree(coco / "val2017", moved, dirs_exist_ok=True)
    result = runner.invoke(app, args2)
    assert result.exit_code == 0, result.output
    assert 'image-root = "../disk2/coco-images"' in (out2 / "run.toml").read_text()


def test_a_source_whose_images_are_nowhere_names_the_folders_tried(tmp_path):
    listing = tmp_path / "lists" / "pairs.jsonl"
    listing.parent.mkdir()
    listing.write_text(json.dumps({"image": "img/1.jpg", "caption": "a cat"}) + "\n")
    with pytest.raises(DataError) as err:
        sources.read_source(listing)
    message = str(err.value)
    assert str(listing.parent.resolve()) in message and "--image-root DIR" in message
    result = CliRunner().invoke(
        app,
        ["build", "--train-data", str(listing), "--val-fraction", "0.5"]
        + ["--checkpoint", "x.pt", "--out", str(tmp_path / "r")],
    )
    assert result.exit_code != 0
    with pytest.raises(DataError, match="--image-root .* does not exist"):
        sources.read_source(listing, sources.SourceOptions(image_root=str(tmp_path / "nope")))
