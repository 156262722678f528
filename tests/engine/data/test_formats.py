"""Every source format gives the same pairs, skips the same broken ones and the same scores.

One data set (100 pairs of the small world, JPEGs and PNGs of mixed modes, with a truncated
JPEG, a PNG that is not an image, a missing image and an empty caption among them) is written
in each of the five formats and built with the same checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from engine.data import sources
from engine.data.images import TAR_SEPARATOR
from engine.errors import CheckpointError, DataError
from engine.files import read_json, read_jsonl
from engine.models import train
from engine.models.checkpoints import find_checkpoints, load_into
from engine.models.factory import create, resolve_pretrained

N_PAIRS = 100
BROKEN = {3: "truncated", 7: "unreadable", 11: "missing", 15: "empty caption"}
MODES = ("RGB", "L", "RGBA", "P", "CMYK", "I;16")
FORMATS = ("jsonl", "csv", "coco", "imagefolder", "wds")


def _write_image(path: Path, img: Image.Image, n: int) -> None:
    """Mixed modes and containers; the numbered ones in BROKEN are broken on purpose."""
    mode = MODES[n % len(MODES)]
    img = img.resize((48 + 8 * (n % 5), 40 + 8 * (n % 3)))  # mixed sizes
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 200)
    else:
        img = img.convert(mode)
    jpeg = mode in ("RGB", "L", "CMYK")
    path = path.with_suffix(".jpg" if jpeg else ".png")
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG" if jpeg else "PNG")
    raw = buffer.getvalue()
    if BROKEN.get(n) == "truncated":
        raw = raw[: len(raw) // 2]
    elif BROKEN.get(n) == "unreadable":
        raw = b"this is not a png at all" * 10
    path.parent.mkdir(parents=True, exist_ok=True)
    if BROKEN.get(n) != "missing":
        path.write_bytes(raw)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, pairs):
    """The pairs (relative image path, caption) and their image files in one folder."""
    folder = tmp_path_factory.mktemp("formats")
    train_pairs, _ = pairs
    rows = []
    for n in range(N_PAIRS):
        with Image.open(train_pairs.image_path(n)) as img:
            path = _write_image(folder / "images" / f"{n:05d}", img.convert("RGB"), n)
        if BROKEN.get(n) == "missing":  # any extension will do: there is no file
            path = path.with_suffix(".jpg")
        caption = "   " if BROKEN.get(n) == "empty caption" else f"  {train_pairs.captions[n]} "
        rows.append({"image": path.relative_to(folder).as_posix(), "caption": caption})
    return folder, rows


def _write(fmt: str, folder: Path, rows: list[dict]) -> str:
    """Writes the listing of ``rows`` in ``fmt`` beside the images; returns the source spec."""
    if fmt == "jsonl":
        path = folder / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)
    if fmt == "csv":  # open_clip_train's layout: tab-separated, filepath and title
        path = folder / "pairs.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(["filepath", "title"])
            writer.writerows([r["image"], r["caption"]] for r in rows)
        return str(path)
    if fmt == "coco":
        path = folder / "captions.json"
        images = [{"id": 100 + n, "file_name": r["image"]} for n, r in enumerate(rows)]
        anns = [
            {"id": 5000 + n, "image_id": 100 + n, "caption": r["caption"]}
            for n, r in enumerate(rows)
        ]
        anns.append({"id": 9999, "image_id": 100, "caption": "a second caption, unused"})
        path.write_text(json.dumps({"images": images, "annotations": anns}))
        return str(path)
    if fmt == "imagefolder":
        path = folder / "metadata.jsonl"
        path.write_text(
            "".join(
                json.dumps({"file_name": r["image"], "text": r["caption"]}) + "\n" for r in rows
            )
        )
        return str(folder)
    shards = folder / "shards"  # wds: two shards of 50 samples, as open_clip trains on them
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:06d}.tar", "w") as tar:
            for r in rows[50 * s : 50 * (s + 1)]:
                key = r["image"].rsplit(".", 1)[0]
                members = {".txt": r["caption"].encode()}
                image = folder / r["image"]
                if image.is_file():
                    members["." + r["image"].rsplit(".", 1)[1]] = image.read_bytes()
                for ext, payload in members.items():
                    info = tarfile.TarInfo(key + ext)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(shards / "{000000..000001}.tar")


@pytest.fixture(scope="module")
def built(dataset, checkpoints, tmp_path_factory):
    """One run per format, built through the command line with the same checkpoint."""
    folder, rows = dataset
    runner = CliRunner()
    runs = {}
    for fmt in FORMATS:
        spec = _write(fmt, folder, rows)
        out = tmp_path_factory.mktemp(f"run-{fmt}") / "run"
        args = ["build", "--train-data", spec, "--val-fraction", "0.2", "--split-seed", "1"]
        args += ["--checkpoint", str(checkpoints[0]), "--out", str(out), "--proj-dim", "32"]
        args += ["--topk", "5", "--projector", "gaussian", "--batch-size", "16"]
        args += ["--workers", "2" if fmt == "wds" else "0"]  # workers must not change anything
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (fmt, result.output, result.exception)
        runs[fmt] = out
    return runs


def test_every_format_gives_the_same_pairs_in_the_same_order(built):
    listed = {
        fmt: {
            s: [(r["id"], r["caption"]) for r in read_jsonl(run / f"{s}.jsonl")]
            for s in ("train", "val")
        }
        for fmt, run in built.items()
    }
    reference = listed["jsonl"]
    assert len(reference["train"]) + len(reference["val"]) == N_PAIRS - len(BROKEN)
    assert reference["train"][0] == ("00000", reference["train"][0][1].strip())
    for fmt in FORMATS:
        assert listed[fmt] == reference, fmt


def test_every_format_gives_identical_scores(built):
    reference = np.load(built["jsonl"] / "scores.npy")
    assert reference.shape[0] > 60 and np.isfinite(reference).all()
    for fmt in FORMATS:
        assert np.array_equal(np.load(built[fmt] / "scores.npy"), reference), fmt


def test_broken_pairs_are_listed_with_their_reasons(built):
    for fmt, run in built.items():
        skipped = {r["id"]: r["reason"] for r in read_jsonl(run / "skipped.jsonl")}
        assert sorted(skipped) == [f"{n:05d}" for n in sorted(BROKEN)], fmt
        for n, kind in BROKEN.items():
            assert skipped[f"{n:05d}"].startswith(kind), (fmt, skipped)
        manifest = read_json(run / "manifest.json")
        assert sum(manifest["skipped"].values()) == len(BROKEN)


def test_strict_turns_skips_into_an_error(dataset, checkpoints, tmp_path):
    folder, rows = dataset
    spec = _write("jsonl", folder, rows)
    result = CliRunner().invoke(
        app,
        [
            "build",
            "--train-data",
            spec,
            "--val-fraction",
            "0.2",
            "--strict",
            "--checkpoint",
            str(checkpoints[0]),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, DataError)
    assert "4 pairs cannot be used" in str(result.exception)
    assert (tmp_path / "run" / "skipped.jsonl").is_file()
    assert not (tmp_path / "run" / "train.jsonl").exists()


def test_val_fraction_split_is_reproducible_and_exact(dataset):
    folder, rows = dataset
    pairs = sources.read_source(_write("jsonl", folder, rows))
    a = sources.split_val(pairs, 0.25, seed=3)
    b = sources.split_val(pairs, 0.25, seed=3)
    c = sources.split_val(pairs, 0.25, seed=4)
    assert a[1].ids == b[1].ids and a[1].ids != c[1].ids and len(a[1]) == 25
    assert sorted(a[0].ids + a[1].ids) == sorted(pairs.ids)
    with pytest.raises(DataError, match="between 0 and 1"):
        sources.split_val(pairs, 1.5, seed=0)


def test_source_errors_say_what_to_do(tmp_path):
    (tmp_path / "x.csv").write_text("path,text\na.jpg,a cat\n")
    (tmp_path / "a.jpg").write_bytes(b"")  # only its existence matters before the build
    with pytest.raises(DataError, match="--img-key"):
        sources.read_source(tmp_path / "x.csv")
    pairs = sources.read_source(
        tmp_path / "x.csv", sources.SourceOptions(img_key="path", caption_key="text")
    )
    assert pairs.records == [{"id": "a", "image": "a.jpg", "caption": "a cat"}]
    with pytest.raises(DataError, match="--format"):
        sources.read_source(tmp_path / "x.parquet")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="metadata.jsonl"):
        sources.read_source(tmp_path / "d")
    with pytest.raises(DataError, match="missing"):
        sources.read_source(str(tmp_path / "{000..002}.tar"))


def test_coco_every_caption_as_its_own_pair(dataset):
    folder, rows = dataset
    spec = _write("coco", folder, rows)
    first = sources.read_source(spec)
    every = sources.read_source(spec, sources.SourceOptions(coco_captions="all"))
    assert len(first) == N_PAIRS and len(every) == N_PAIRS + 1
    assert every.ids[:2] == ["00000", "00000#1"]
    assert every.captions[1] == "a second caption, unused"


def _save_like_open_clip_train(model: torch.nn.Module, path: Path, epoch: int) -> None:
    """open_clip_train's checkpoint: epoch, name, DDP-prefixed state_dict, optimizer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"epoch": epoch, "name": "trakview-tiny", "state_dict": state, "optimizer": {}}, path
    )


def test_build_from_open_clip_train_logs(tensors, pairs, tmp_path):
    """A tiny ensemble trained here, saved in open_clip_train's layout, found by
    --checkpoints-dir (the last epoch of each run by default, or --epochs)."""
    images, tokens = tensors["train"]
    cfg = train.TrainConfig(members=1, epochs=2, batch_size=60, warmup_steps=2)
    logs = tmp_path / "logs"
    for member in range(2):  # two training runs, as two open_clip_train --name runs
        final = train.train_ensemble(images, tokens, replace_seed(cfg, member), tmp_path / "t")[0]
        bundle = create("trakview-tiny")
        load_into(bundle.model, final)
        for epoch in (1, 2):
            target = logs / f"2026_11_23-run-{member}" / "checkpoints" / f"epoch_{epoch}.pt"
            _save_like_open_clip_train(bundle.model, target, epoch)
        (tmp_path / "t").rename(tmp_path / f"t{member}")
    (logs / "2026_11_23-run-0" / "checkpoints" / "epoch_latest.pt").write_bytes(b"ignored")
    assert [p.parent.parent.name + "/" + p.name for p in find_checkpoints(logs)] == [
        "2026_11_23-run-0/epoch_2.pt",
        "2026_11_23-run-1/epoch_2.pt",
    ]
    assert len(find_checkpoints(logs, "1,2")) == 4
    with pytest.raises(CheckpointError, match="no epoch 3"):
        find_checkpoints(logs, "3")

    world = pairs[0].root
    args = ["build", "--train-data", str(world / "train.jsonl"), "--val-data"]
    args += [str(world / "val.jsonl"), "--proj-dim", "32", "--topk", "5", "--projector", "gaussian"]
    result = CliRunner().invoke(app, [*args, "--checkpoints-dir", str(logs), "--out", "a"])
    assert result.exit_code == 0, result.output
    manifest = read_json(Path("a") / "manifest.json")
    assert manifest["counts"]["n_checkpoints"] == 2
    assert manifest["checkpoints"][0]["path"].endswith("2026_11_23-run-0/checkpoints/epoch_2.pt")
    # the same checkpoints named one by one give the same run
    explicit = [a for p in find_checkpoints(logs) for a in ("--checkpoint", str(p))]
    result = CliRunner().invoke(app, [*args, *explicit, "--out", "b"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load("a/scores.npy"), np.load("b/scores.npy"))


def replace_seed(cfg: train.TrainConfig, seed: int) -> train.TrainConfig:
    from dataclasses import replace

    return replace(cfg, seed=seed)


def test_config_file_repeats_a_run(built, tmp_path):
    """RUN/run.toml holds every flag; `build --config RUN/run.toml` gives the same scores."""
    run = built["csv"]
    text = (run / "run.toml").read_text()
    assert "val-fraction = 0.2" in text and "proj-dim = 32" in text
    manifest = read_json(run / "manifest.json")
    assert manifest["invocation"]["proj_dim"] == 32
    result = CliRunner().invoke(
        app, ["build", "--config", str(run / "run.toml"), "--out", str(tmp_path / "again")]
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(tmp_path / "again" / "scores.npy"), np.load(run / "scores.npy"))
    (tmp_path / "bad.toml").write_text('train-data = "x.jsonl"\nprojdim = 3\n')
    result = CliRunner().invoke(app, ["build", "--config", str(tmp_path / "bad.toml")])
    assert result.exit_code == 2 and "projdim" in result.output


def test_pretrained_tags_resolve_from_the_local_cache_only(tmp_path, monkeypatch, checkpoints):
    """A tag resolves to a file in the Hugging Face cache; without it, a clear error (no
    download is tried)."""
    from open_clip import pretrained as registry

    tags = {"unittest": {"hf_hub": "trakview/tiny-unittest/", "quick_gelu": False}}
    monkeypatch.setitem(registry._PRETRAINED, "trakview-tiny", tags)
    with pytest.raises(CheckpointError, match="never downloads"):
        resolve_pretrained("trakview-tiny", "unittest", cache_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="its tags: unittest"):
        resolve_pretrained("trakview-tiny", "nope", cache_dir=str(tmp_path))
    snapshot = tmp_path / "models--trakview--tiny-unittest" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(Path(checkpoints[0]).read_bytes())
    (tmp_path / "models--trakview--tiny-unittest" / "refs").mkdir()
    (tmp_path / "models--trakview--tiny-unittest" / "refs" / "main").write_text("a" * 40)
    found = resolve_pretrained("trakview-tiny", "unittest", cache_dir=str(tmp_path))
    assert found.name == "open_clip_pytorch_model.bin"
    load_into(create("trakview-tiny", pretrained="unittest").model, found)
    assert open_clip.get_pretrained_cfg("trakview-tiny", "unittest")


def test_images_inside_shards_open_in_exports_and_the_dashboard(built, tmp_path):
    import zipfile

    from engine.explore import export
    from engine.explore.view import RunView

    run = built["wds"]
    engine = RunView.load(run)
    assert TAR_SEPARATOR in engine.train[0]["image"]
    result = engine.for_val(engine.val[0]["id"], k=3)
    out = export.export(run, result, "zip", tmp_path / "gallery.zip")
    with zipfile.ZipFile(out) as zf:
        assert sum(n.endswith((".png", ".jpg")) for n in zf.namelist()) >= 7
    extracted = Path(engine.image_path(engine.train[0]["image"]))
    assert extracted.is_file() and extracted.is_relative_to(run / "cache")
    with Image.open(extracted) as img:
        assert img.size[0] >= 48


def test_a_moved_run_resumes_instead_of_being_refused(dataset, checkpoints, tmp_path):
    """Data, checkpoint and run moved together: the same command finds the run finished."""
    import shutil

    folder, rows = dataset
    home = tmp_path / "a"
    shutil.copytree(folder / "images", home / "data" / "images")
    _write("jsonl", home / "data", rows)
    shutil.copy(checkpoints[0], home / "ckpt.pt")

    def build(root: Path):
        args = ["build", "--train-data", str(root / "data" / "pairs.jsonl"), "--val-fraction"]
        args += ["0.2", "--checkpoint", str(root / "ckpt.pt"), "--out", str(root / "run")]
        args += ["--proj-dim", "32", "--projector", "gaussian"]
        return CliRunner().invoke(app, args)

    assert build(home).exit_code == 0
    marker = (home / "run" / "stages" / "featurize-0.json").read_text()
    scores = np.load(home / "run" / "scores.npy")
    home.rename(tmp_path / "b")
    result = build(tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "run" / "stages" / "featurize-0.json").read_text() == marker
    assert np.array_equal(np.load(tmp_path / "b" / "run" / "scores.npy"), scores)
