"""Gallery exports checked against scores.npy, the images on disk and the documented layout."""

from __future__ import annotations

import base64
import copy
import csv
import html
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine import cli
from engine.data.images import open_query_image
from engine.errors import ExportError
from engine.explore.export import export, gallery_bytes
from engine.explore.query import QueryEngine
from engine.explore.results import QueryResult

K = 5
DATA_URI = "data:image/png;base64,"
TOP_LEVEL = {"query.png", "influencers.csv", "index.html", "query.json"}


def sheet_size(k: int) -> tuple[int, int]:
    """The layout formula documented in engine.export.sheet_size, written out independently."""
    return 20 + 204 * k, 914


def pixels(image: Image.Image | Path) -> np.ndarray:
    if isinstance(image, Path):
        image = Image.open(image)
    return np.asarray(image.convert("RGB"))


def upscaled_2x(array: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(array, 2, axis=0), 2, axis=1)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def all_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def qengine(run_dir) -> QueryEngine:
    return QueryEngine.load(run_dir)


@pytest.fixture(scope="module")
def val_j(run_dir) -> int:
    return 3


@pytest.fixture(scope="module")
def val_result(run_dir, qengine, val_j) -> QueryResult:
    return qengine.for_val(read_jsonl(run_dir / "val.jsonl")[val_j]["id"], k=K)


@pytest.fixture(scope="module")
def column(run_dir, val_j) -> np.ndarray:
    return np.load(run_dir / "scores.npy")[:, val_j]  # (n_train,)


def expected_order(column: np.ndarray, sign: str) -> list[int]:
    order = np.argsort(-column if sign == "positive" else column, kind="stable")[:K]
    return [int(i) for i in order]


def check_rows(rows: list[dict], column: np.ndarray, train: list[dict]) -> None:
    """Rows against scores.npy: top-k per sign by rank, exact float32 scores, train.jsonl data."""
    assert len(rows) == 2 * K
    for sign in ("positive", "negative"):
        mine = [r for r in rows if r["sign"] == sign]
        assert [int(r["rank"]) for r in mine] == list(range(1, K + 1))
        indices = [int(r["train_index"]) for r in mine]
        assert indices == expected_order(column, sign)
        for r, i in zip(mine, indices, strict=True):
            assert np.float32(float(r["score"])) == column[i]
            assert r["train_id"] == str(train[i]["id"])
            assert r["caption"] == train[i]["caption"]
            assert r["image"] == train[i]["image"]
    positive = [float(r["score"]) for r in rows if r["sign"] == "positive"]
    assert positive == sorted(positive, reverse=True)
    assert positive[0] == pytest.approx(float(column.max()))


def test_zip_holds_images_scores_page_and_summary(run_dir, val_result, column, val_j):
    train = read_jsonl(run_dir / "train.jsonl")
    val = read_jsonl(run_dir / "val.jsonl")[val_j]
    payload = gallery_bytes(run_dir, val_result, "zip")
    archive = zipfile.ZipFile(io.BytesIO(payload))
    rows = list(csv.DictReader(io.StringIO(archive.read("influencers.csv").decode("utf-8"))))
    check_rows(rows, column, train)

    images = {
        f"{r['sign']}/{int(r['rank']):02d}_{r['train_id']}.png": int(r["train_index"]) for r in rows
    }
    assert set(archive.namelist()) == TOP_LEVEL | set(images)
    for name, i in images.items():
        stored = pixels(Image.open(io.BytesIO(archive.read(name))))
        assert np.array_equal(stored, pixels(run_dir / train[i]["image"])), name
    query_png = pixels(Image.open(io.BytesIO(archive.read("query.png"))))
    assert np.array_equal(query_png, pixels(run_dir / val["image"]))

    summary = json.loads(archive.read("query.json"))
    assert summary["caption"] == val["caption"] and summary["val_id"] == str(val["id"])
    assert summary["k"] == K and summary["trakview_version"] == engine.__version__
    assert summary["run"] == str(run_dir.resolve())
    clip_sim = np.load(run_dir / "val_clip_sim.npy")[val_j]
    assert summary["clip_similarity"] == pytest.approx(float(clip_sim))
    assert summary["margin"] == pytest.approx(float(np.load(run_dir / "val_margin.npy")[val_j]))

    page = archive.read("index.html").decode("utf-8")
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sorted(sources) == sorted(["query.png", *images])
    assert "data:" not in page and "http" not in page
    # the same result gives the same archive, byte for byte
    assert gallery_bytes(run_dir, val_result, "zip") == payload


def test_html_is_one_self_contained_page(run_dir, val_result, val_j):
    page = gallery_bytes(run_dir, val_result, "html").decode("utf-8")
    assert page.count(DATA_URI) == 2 * K + 1
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 * K + 1 and all(s.startswith(DATA_URI) for s in sources)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "image-rendering:pixelated" in page and page.count('class="pixelated"') == 2 * K + 1
    for card in [*val_result.positive, *val_result.negative]:
        assert html.escape(card.caption) in page and html.escape(card.id) in page
    assert f"<h1>{html.escape(val_result.caption)}</h1>" in page
    # the first image is the query, decoded to the validation pair's pixels
    query = Image.open(io.BytesIO(base64.b64decode(sources[0][len(DATA_URI) :])))
    val = read_jsonl(run_dir / "val.jsonl")[val_j]
    assert np.array_equal(pixels(query), pixels(run_dir / val["image"]))


def test_png_contact_sheet_follows_the_documented_layout(run_dir, val_result, val_j):
    sheet = Image.open(io.BytesIO(gallery_bytes(run_dir, val_result, "png")))
    assert sheet.format == "PNG" and sheet.size == sheet_size(K) == (1040, 914)
    array = pixels(sheet)
    assert len(np.unique(array.reshape(-1, 3), axis=0)) > 100  # not blank
    train = read_jsonl(run_dir / "train.jsonl")
    val = read_jsonl(run_dir / "val.jsonl")[val_j]
    source = pixels(run_dir / val["image"])
    assert source.shape == (64, 64, 3)  # upscaled 2x (nearest) into the 128 px thumbnail box
    # row 0, column 0: x = 16 + (192 - 128) / 2 = 48, y = 16 + 28 + 8 = 52
    assert np.array_equal(array[52:180, 48:176], upscaled_2x(source))
    # row 1 (positives), column 1: x = 16 + 204 + 32 = 252, y = 16 + 298 + 28 + 8 = 350
    second = pixels(run_dir / train[val_result.positive[1].index]["image"])
    assert np.array_equal(array[350:478, 252:380], upscaled_2x(second))
    # text under the query thumbnail (rows 186..294 of its cell), none right of the query cell
    assert (array[186:290, 24:200] < 128).any()
    assert (array[52:290, 220:1030] == 255).all()


def test_csv_and_json_rows_match_scores(run_dir, val_result, column):
    train = read_jsonl(run_dir / "train.jsonl")
    text = gallery_bytes(run_dir, val_result, "csv").decode("utf-8")
    csv_rows = list(csv.DictReader(io.StringIO(text)))
    assert list(csv_rows[0]) == [
        "rank",
        "sign",
        "train_id",
        "train_index",
        "caption",
        "image",
        "score",
    ]
    check_rows(csv_rows, column, train)
    doc = json.loads(gallery_bytes(run_dir, val_result, "json"))
    check_rows(doc["influencers"], column, train)
    assert [{k: str(v) for k, v in r.items()} for r in doc["influencers"]] == [
        {k: v for k, v in r.items()} for r in csv_rows
    ]
    assert doc["query"]["val_id"] == val_result.val_id and doc["query"]["k"] == K


def test_a_new_query_exports_with_its_image(run_dir, qengine, tmp_path):
    val = read_jsonl(run_dir / "val.jsonl")[5]
    image = open_query_image(run_dir / val["image"])
    caption = "a <b>different</b> caption & more"
    result = qengine.query(run_dir / val["image"], caption, k=3)
    assert result.val_id is None and result.image is None

    with pytest.raises(ExportError, match="new query.*pass the query image"):
        gallery_bytes(run_dir, result, "zip")
    archive = zipfile.ZipFile(export(run_dir, result, "zip", tmp_path / "q.zip", image))
    assert np.array_equal(pixels(Image.open(archive.open("query.png"))), pixels(image))
    rows = list(csv.DictReader(io.StringIO(archive.read("influencers.csv").decode("utf-8"))))
    positive = [int(r["train_index"]) for r in rows if r["sign"] == "positive"]
    assert positive == [int(i) for i in np.argsort(-result.scores, kind="stable")[:3]]
    summary = json.loads(archive.read("query.json"))
    assert summary["caption"] == caption and summary["val_id"] is None and summary["k"] == 3

    page = gallery_bytes(run_dir, result, "html", image).decode("utf-8")
    assert page.count(DATA_URI) == 7
    assert (
        "a &lt;b&gt;different&lt;/b&gt; caption &amp; more" in page and "<b>different" not in page
    )
    sheet = Image.open(io.BytesIO(gallery_bytes(run_dir, result, "png", image)))
    assert sheet.size == sheet_size(3) == (632, 914)


def test_user_ids_cannot_escape_the_archive(run_dir, val_result, tmp_path):
    before = all_files(run_dir)
    result = copy.deepcopy(val_result)
    result.positive[0].id = "../../evil"
    result.positive[1].id = "/etc/passwd"
    result.positive[2].sign = "../../outside"  # the card's own sign must not pick the folder
    result.negative[0].id = "a\\b\x00\n..c"
    result.negative[1].id = ".."
    result.negative[3].caption = "<script>alert(1)</script> & co"
    result.negative[4].id = '"><img src=x>'
    out = tmp_path / "exports" / "gallery.zip"
    assert export(run_dir, result, "zip", out) == out

    assert all_files(tmp_path) == {out}
    assert all_files(run_dir) == before
    names = zipfile.ZipFile(out).namelist()
    member = re.compile(r"(positive|negative)/\d{2}_[A-Za-z0-9_-]+\.png")
    for name in names:
        assert name in TOP_LEVEL or member.fullmatch(name), name
        assert ".." not in name and "\\" not in name and not name.startswith("/")
    assert "positive/01_evil.png" in names and "positive/02_etc_passwd.png" in names
    assert "negative/01_a_b_c.png" in names and "negative/02_item.png" in names
    assert sum(n.startswith("positive/") for n in names) == K
    target = tmp_path / "unpacked"
    zipfile.ZipFile(out).extractall(target)
    assert all(p.resolve().is_relative_to(target.resolve()) for p in all_files(target))
    # the data itself is exported unchanged (escaped in the page)
    rows = list(csv.DictReader(io.StringIO(zipfile.ZipFile(out).read("influencers.csv").decode())))
    assert rows[0]["train_id"] == "../../evil" and rows[2]["sign"] == "positive"
    # and every text is escaped in the pages
    for page in (
        zipfile.ZipFile(out).read("index.html").decode("utf-8"),
        gallery_bytes(run_dir, result, "html").decode("utf-8"),
    ):
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page and "<script" not in page
        assert "&quot;&gt;&lt;img src=x&gt;" in page and "<img src=x" not in page


def test_unknown_format_writes_nothing(run_dir, val_result, tmp_path):
    out = tmp_path / "new" / "gallery.gif"
    with pytest.raises(ValueError, match=r"unknown export format 'gif'.*zip, html, png, csv, json"):
        export(run_dir, val_result, "gif", out)
    assert not out.parent.exists()


@pytest.mark.parametrize("fmt", ["zip", "html", "png"])
def test_missing_influencer_image_names_the_file_and_writes_nothing(
    run_dir, val_result, tmp_path, fmt
):
    result = copy.deepcopy(val_result)
    result.negative[2].image = "images/nowhere/t_missing.png"
    out = tmp_path / "new" / f"gallery.{fmt}"
    with pytest.raises(ExportError, match=r"negative influencer #3 .*t_missing\.png"):
        export(run_dir, result, fmt, out)
    assert all_files(tmp_path) == set() and not out.parent.exists()


def test_out_must_be_a_file(run_dir, val_result, tmp_path):
    with pytest.raises(ExportError, match="is a folder; expected a file path"):
        export(run_dir, val_result, "csv", tmp_path)


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Runs ``trakview ARGS`` through the console entry point; returns (status, out, err)."""
    monkeypatch.setattr(sys, "argv", ["trakview", *args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_cli_exports_a_validation_pair(run_dir, val_result, monkeypatch, capsys, tmp_path):
    out = tmp_path / "sub" / "g.json"
    status, printed, _ = run_cli(
        monkeypatch,
        capsys,
        "export",
        str(run_dir),
        "--val",
        val_result.val_id,
        "-k",
        "3",
        "--format",
        "json",
        "--out",
        str(out),
    )
    assert status == 0 and printed.strip() == str(out)
    rows = json.loads(out.read_text())["influencers"]
    assert [r["train_index"] for r in rows[:3]] == [c.index for c in val_result.positive[:3]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--val", "nope"], "error: unknown validation id 'nope'"),
        (["--val", "v0", "--image", "x.png"], "error: give either --val ID or both --image PATH"),
        (["--caption", "a red circle"], "got --caption"),
        ([], "got none of them"),
        (["--val", "nope", "--format", "gif"], "error: unknown export format 'gif'"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(
    run_dir, monkeypatch, capsys, tmp_path, args, message
):
    out = tmp_path / "new" / "g.zip"
    fmt = [] if "--format" in args else ["--format", "zip"]
    status, printed, err = run_cli(
        monkeypatch, capsys, "export", str(run_dir), *args, *fmt, "--out", str(out)
    )
    assert status == 2 and printed == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert message in err
    assert all_files(tmp_path) == set()
