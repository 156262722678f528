"""New queries reproduce the build's scores; bad input is refused with a clear message."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from engine.data.images import open_query_image
from engine.errors import DeviceError, InputError, RunError
from engine.explore.query import QueryEngine
from engine.files import read_json, write_json
from engine.run.manifest import open_manifest


@pytest.fixture(scope="module")
def engine(run_dir):
    return QueryEngine.load(run_dir)


@pytest.mark.parametrize("j", [0, 7, 23])
def test_query_of_a_val_pair_reproduces_its_scores(engine, run_dir, j):
    rec = engine.val[j]
    result = engine.query(run_dir / rec["image"], rec["caption"], k=10)
    column = np.load(run_dir / "scores.npy")[:, j]
    assert np.corrcoef(column, result.scores)[0, 1] >= 0.999
    assert [c.index for c in result.positive] == list(np.argsort(-column, kind="stable")[:10])
    assert [c.index for c in result.negative] == list(np.argsort(column, kind="stable")[:10])
    assert result.clip_similarity == pytest.approx(
        float(np.load(run_dir / "val_clip_sim.npy")[j]), abs=1e-4
    )
    assert result.margin == pytest.approx(float(np.load(run_dir / "val_margin.npy")[j]), abs=1e-3)
    assert set(result.timings) == {"gradient", "projection", "search"}


def test_for_val_reads_the_stored_column(engine, run_dir):
    rec = engine.val[5]
    result = engine.for_val(rec["id"], k=4)
    column = np.load(run_dir / "scores.npy")[:, 5]
    assert [c.score for c in result.positive] == pytest.approx(sorted(column, reverse=True)[:4])
    assert result.val_id == rec["id"] and result.image == rec["image"]
    # nearest by CLIP image similarity: the val image itself is not in train, its near-duplicate is
    assert len(result.similar) == 4 and result.similar[0].score >= result.similar[-1].score


def test_near_duplicate_is_the_most_similar_training_image(engine):
    dup = next(r for r in engine.train if r["near_duplicate_of"])
    result = engine.for_val(dup["near_duplicate_of"], k=3)
    assert result.similar[0].id == dup["id"]


def test_long_caption_is_truncated_with_a_note(engine, run_dir):
    long = " ".join(["a small red circle on the left"] * 8)
    result = engine.query(run_dir / engine.val[0]["image"], long, k=3)
    assert any("caption truncated" in n and "the model reads 24" in n for n in result.notes)


def test_bad_inputs_are_refused(engine, run_dir, tmp_path):
    img = run_dir / engine.val[0]["image"]
    with pytest.raises(InputError, match="does not exist"):
        engine.query(tmp_path / "missing.png", "a red circle")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(InputError, match="is not an image PIL can read"):
        engine.query(text, "a red circle")
    with pytest.raises(InputError, match="is not an image PIL can read"):
        engine.query(b"\x89PNG\r\n\x1a\n broken", "a red circle")
    big = tmp_path / "big.png"
    Image.new("RGB", (8000, 6000)).save(big)
    with pytest.raises(InputError, match="8000x6000 = 48,000,000 pixels, more than the limit"):
        engine.query(big, "a red circle")
    with pytest.raises(InputError, match="the caption is empty"):
        engine.query(img, "   ")
    with pytest.raises(InputError, match="unknown validation id 'v9999'"):
        engine.for_val("v9999")


def test_incomplete_or_foreign_runs_are_refused(run_dir, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        open_manifest(tmp_path / "nothing")
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("trak", "embeddings"))
    (partial / "manifest.json").unlink()
    with pytest.raises(RunError, match="has no manifest.json: the build has not finished"):
        QueryEngine.load(partial)
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(RunError, match="format version 0, this trakview reads versions 1, 2"):
        QueryEngine.load(old)


def test_a_fast_jl_run_refuses_new_queries_on_cpu(run_dir, tmp_path):
    """traker's CudaProjector exists only on CUDA: a CPU query would use another projection."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    manifest = read_json(run / "manifest.json")
    manifest["projection"] = "traker CudaProjector (fast_jl) + keyed token blocks"
    write_json(run / "manifest.json", manifest)
    engine = QueryEngine.load(run)
    engine.for_val(engine.val[0]["id"])  # stored pairs still open
    with pytest.raises(DeviceError, match="--device cuda"):
        engine.query(run / engine.val[0]["image"], engine.val[0]["caption"])


def test_checkpoints_in_one_vmap_equal_one_by_one(run_dir):
    """The stacked path (every checkpoint in one vmap) and the loop give the same query."""
    engine = QueryEngine.load(run_dir)
    engine.warm()
    assert engine.stack is not None  # a tiny model: stacked
    rec = engine.val[3]
    image = open_query_image(run_dir / rec["image"])
    stacked = engine.target_gradients(image, rec["caption"])
    engine.stack = None
    looped = engine.target_gradients(image, rec["caption"])
    np.testing.assert_allclose(stacked[0], looped[0], rtol=1e-4, atol=1e-6 * abs(looped[0]).max())
    np.testing.assert_allclose(stacked[1], looped[1], rtol=1e-5, atol=1e-6)
    assert stacked[2]["margin"] == pytest.approx(looped[2]["margin"], abs=1e-5)
    assert stacked[2]["clip_similarity"] == pytest.approx(looped[2]["clip_similarity"], abs=1e-6)
