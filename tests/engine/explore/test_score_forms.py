"""The two forms of a run's scores, and runs of format 1: the top-k form keeps what the dense
form shows (top-k files, scores, histograms, totals, galleries), a column recomputed on demand
equals the dense column, and every form opens in the dashboard, ``query``, ``export`` and
``eval``."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from dashboard import state
from engine import files
from engine.assemble.orchestrate import build
from engine.attribution.settings import BuildConfig, resolve
from engine.attribution.summaries import top_rows
from engine.cli import app
from engine.evaluate.lds import LdsConfig, evaluate_lds
from engine.evaluate.methods import TrakScores
from engine.explore.run_data import RunData
from engine.models.train import TrainConfig
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest

APP = Path(__file__).resolve().parents[3] / "dashboard" / "app.py"
SUMMARY_FILES = (
    "topk_pos",
    "topk_neg",
    "topk_pos_scores",
    "topk_neg_scores",
    "score_hist",
    "score_range",
    "train_score_sum",
    "train_negative_mass",
    "similar",
    "similar_scores",
)


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, pairs, run_dir):
    """The session's run built again in the top-k form (same settings otherwise)."""
    cfg = dataclasses.replace(open_manifest(run_dir).config, scores="topk")
    return build(*pairs, cfg, tmp_path_factory.mktemp("topk") / "run")


@pytest.fixture(scope="module")
def version1_run(tmp_path_factory, run_dir):
    """The session's run as trakview wrote runs of format 1: scores.npy, top-k rows only."""
    old = tmp_path_factory.mktemp("v1") / "run"
    shutil.copytree(run_dir, old)
    layout = RunLayout(old)
    for name in SUMMARY_FILES[2:]:
        getattr(layout, name).unlink()
    doc = files.read_json(layout.manifest)
    doc["format_version"] = 1
    del doc["config"]["scores"]
    files.write_json(layout.manifest, doc)
    return old


def test_auto_picks_the_form_by_size():
    cfg = BuildConfig(checkpoints=["x"])
    assert resolve(cfg, 30_000, n_val=8_000).scores == "dense"  # 0.9 GiB of scores
    assert resolve(cfg, 100_000, n_val=5_000).scores == "topk"


def test_the_top_k_form_keeps_what_the_dense_form_shows(run_dir, topk_run):
    dense, topk = RunLayout(run_dir), RunLayout(topk_run)
    assert dense.scores.is_file() and not topk.scores.exists()
    for name in SUMMARY_FILES:
        a, b = np.load(getattr(dense, name)), np.load(getattr(topk, name))
        assert np.array_equal(a, b), name
    # the stored summaries against the dense matrix, computed here independently
    scores = np.load(dense.scores)
    k = np.load(dense.topk_pos).shape[1]
    for j in range(scores.shape[1]):
        order = np.argsort(-scores[:, j], kind="stable")[:k]
        assert np.array_equal(np.load(dense.topk_pos)[j], order)
        assert np.array_equal(
            np.load(dense.topk_neg)[j], np.argsort(scores[:, j], kind="stable")[:k]
        )
        low, high = (float(x) for x in np.load(dense.score_range)[j])
        counts = np.histogram(scores[:, j], bins=80, range=(low, high))[0]
        assert np.array_equal(np.load(dense.score_hist)[j], counts)
    np.testing.assert_allclose(np.load(dense.train_score_sum), scores.sum(1), rtol=1e-5, atol=1e-6)
    negative = np.minimum(scores, 0).sum(1)
    np.testing.assert_allclose(np.load(dense.train_negative_mass), negative, rtol=1e-5, atol=1e-6)


def test_columns_and_rows_recomputed_on_demand_equal_the_dense_ones(run_dir, topk_run):
    scores = np.load(RunLayout(run_dir).scores)
    stored = RunData(topk_run).scores
    assert stored.matrix is None
    scale = np.abs(scores).max()
    for j in (0, 7, scores.shape[1] - 1):
        np.testing.assert_allclose(stored.column(j), scores[:, j], rtol=1e-5, atol=1e-6 * scale)
    for i in (0, 123):
        np.testing.assert_allclose(stored.row(i), scores[i], rtol=1e-5, atol=1e-6 * scale)
    masks = np.random.default_rng(0).random((4, scores.shape[0])) < 0.5
    np.testing.assert_allclose(
        TrakScores(topk_run).predict(masks), masks @ scores.astype(np.float64), rtol=1e-4
    )


def test_the_same_galleries_from_every_form(run_dir, topk_run, version1_run):
    runs = [RunData(r) for r in (run_dir, topk_run, version1_run)]
    for val_id in ("v0000", "v0011"):
        for k in (5, 20, 30):  # 30: more than the run keeps, from a full column
            results = [r.for_val(val_id, k) for r in runs]
            for result in results[1:]:
                for sign in ("positive", "negative", "similar"):
                    got = [c.index for c in getattr(result, sign)]
                    assert got == [c.index for c in getattr(results[0], sign)], (sign, k)
                np.testing.assert_array_equal(result.histogram[0], results[0].histogram[0])
                np.testing.assert_allclose(
                    result.points.scores, results[0].points.scores, rtol=1e-5, atol=1e-7
                )
    assert len(runs[0].for_val("v0000", 30).positive) == 30


def test_every_form_opens_everywhere(
    run_dir, topk_run, version1_run, monkeypatch, tmp_path, tmp_path_factory
):
    image = RunData(run_dir).image_path(RunData(run_dir).val[2]["image"])
    runner = CliRunner()
    for run in (run_dir, topk_run, version1_run):
        monkeypatch.setenv(state.RUN_ENV, str(run))
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.exception, (run, at.exception)
        for page in ("views/overview.py", "views/upload.py"):
            at.switch_page(page).run()
            assert not at.exception, (run, page, at.exception)
        query = runner.invoke(app, ["query", str(run), "--image", image, "--caption", "a ring"])
        assert query.exit_code == 0, query.output
        out = tmp_path / f"{run.parent.name}.csv"
        done = runner.invoke(
            app, ["export", str(run), "--val", "v0003", "--format", "csv", "--out", str(out)]
        )
        assert done.exit_code == 0 and out.is_file(), done.output
    # eval: the same LDS from the top-k form and format 1 as from the dense one (3 subsets,
    # 2-epoch models)
    results = []
    for run in (run_dir, topk_run, version1_run):
        copy = tmp_path_factory.mktemp("eval") / "run"  # the depth of the run: paths hold
        shutil.copytree(run, copy)
        cfg = LdsConfig(subsets=3, methods=["trak", "random"], bootstrap=50)
        results.append(evaluate_lds(copy, cfg, TrainConfig(epochs=2, batch_size=60)))
    for other in results[1:]:
        assert results[0]["methods"]["trak"]["lds"] == pytest.approx(
            other["methods"]["trak"]["lds"], abs=1e-6
        )


def test_top_rows_is_a_stable_argsort():
    values = np.random.default_rng(1).integers(0, 5, 200).astype(np.float32)  # many ties
    for k in (1, 7, 50, 200):
        assert np.array_equal(top_rows(values, k), np.argsort(-values, kind="stable")[:k])
