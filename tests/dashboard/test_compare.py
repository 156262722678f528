"""The Compare page through Streamlit's AppTest, on run A (the session's run with a basket of its
12 top suspects) and run B (retrained without them, every validation pair but the first 3): its
numbers are the runs' own (read here with numpy), run B comes from `serve --compare` or is picked
beside run A, a pair's influencers are shown in both runs with the removed and the new ones
marked, and a run that cannot be compared is said so in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import state
from engine import files
from engine.curate import baskets
from engine.files import read_jsonl
from engine.run.layout import RunLayout

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
K = 6  # the page's default influencers per gallery


@pytest.fixture(scope="module")
def ab(compare_runs):
    return compare_runs


def compare_page(monkeypatch, a: Path, b: Path | None) -> AppTest:
    monkeypatch.setenv(state.RUN_ENV, str(a))
    if b is None:
        monkeypatch.delenv(state.COMPARE_ENV, raising=False)
    else:
        monkeypatch.setenv(state.COMPARE_ENV, str(b))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.switch_page("views/compare.py").run()
    assert not at.exception, at.exception
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_the_page_shows_the_runs_own_numbers(ab, monkeypatch):
    a, b = ab
    at = compare_page(monkeypatch, a, b)
    val_a = [r["id"] for r in read_jsonl(a / "val.jsonl")]
    val_b = {r["id"]: j for j, r in enumerate(read_jsonl(b / "val.jsonl"))}
    rows_a = [j for j, i in enumerate(val_a) if i in val_b]
    rows_b = [val_b[val_a[j]] for j in rows_a]
    delta = np.load(b / "val_margin.npy")[rows_b].astype(np.float64)
    delta -= np.load(a / "val_margin.npy")[rows_a]
    gone = [e.row for e in baskets.read_basket(RunLayout(a), "sus").entries]
    predicted = -np.load(a / "scores.npy")[gone].astype(np.float64).sum(0)[rows_a]
    assert metric(at, "Matched validation pairs") == "37"
    assert metric(at, "Mean margin change") == f"{delta.mean():+.4f}"
    improved = f"{(delta > 0).mean():.0%} / {(delta < 0).mean():.0%}"
    assert metric(at, "Improved / regressed") == improved
    assert metric(at, "Pearson r") == f"{np.corrcoef(predicted, delta)[0, 1]:+.2f}"
    groups = at.dataframe[0].value
    assert list(groups["pairs"][:1]) == ["all matched pairs"] and groups["n"][0] == 37
    assert groups["change"][0] == pytest.approx(delta.mean())
    assert groups["predicted"][0] == pytest.approx(predicted.mean(), rel=1e-6)
    assert any("predicted to fall most" in name for name in groups["pairs"])
    worst = val_a[rows_a[int(np.argmin(delta))]]
    assert at.selectbox(key="cmp-pair").value == worst  # the most regressed pair first
    assert metric(at, "Change") == f"{delta.min():+.4f}"


def test_a_pairs_influencers_before_and_after(ab, monkeypatch):
    """For a pair whose top helpers in A include basket pairs: A's gallery marks them removed,
    B's marks what is new in its top k; both are the runs' stored top k."""
    a, b = ab
    scores_a = np.load(a / "scores.npy")
    gone = {e.row for e in baskets.read_basket(RunLayout(a), "sus").entries}
    val_a = [r["id"] for r in read_jsonl(a / "val.jsonl")]
    j = next(
        j
        for j in range(3, len(val_a))
        if gone & set(np.argsort(-scores_a[:, j], kind="stable")[:K].tolist())
    )
    at = compare_page(monkeypatch, a, b)
    at.selectbox(key="cmp-pair").select(val_a[j]).run()
    assert not at.exception, at.exception
    top_a = np.argsort(-scores_a[:, j], kind="stable")[:K]
    jb = [r["id"] for r in read_jsonl(b / "val.jsonl")].index(val_a[j])
    top_b = np.argsort(-np.load(b / "scores.npy")[:, jb], kind="stable")[:K]
    train_a, train_b = read_jsonl(a / "train.jsonl"), read_jsonl(b / "train.jsonl")
    buttons = {bt.key for bt in at.button if bt.key}
    assert {f"cmp-a-positive-open-{i}" for i in top_a} <= buttons
    assert {f"cmp-b-positive-open-{i}" for i in top_b} <= buttons
    cards = [m.value for m in at.markdown]
    removed = [c for c in cards if "removed from B's training set" in c]
    assert len(removed) >= len(gone & set(top_a.tolist())) > 0
    for i in gone & set(top_a.tolist()):
        assert any(train_a[i]["caption"] in c for c in removed)
    ids_a = {train_a[i]["id"] for i in top_a}
    new = [train_b[i]["caption"] for i in top_b if train_b[i]["id"] not in ids_a]
    assert new and all(any(cap in c and "new in the top k" in c for c in cards) for cap in new)


def test_run_b_picked_beside_run_a(ab, monkeypatch):
    a, b = ab
    at = compare_page(monkeypatch, a, None)
    assert any("Pick run B" in i.value for i in at.info)
    box = at.selectbox(key="cmp-other")
    assert str(b.resolve()) in box.options
    box.select(str(b.resolve())).run()
    assert not at.exception, at.exception
    assert metric(at, "Matched validation pairs") == "37"


def test_runs_that_cannot_be_compared_say_why(ab, monkeypatch, tmp_path):
    a, b = ab
    other = tmp_path / "run"
    shutil.copytree(b, other)
    doc = files.read_json(other / "manifest.json")
    doc["config"]["sim_batch_size"] = 64
    files.write_json(other / "manifest.json", doc)
    at = compare_page(monkeypatch, a, other)
    assert len(at.error) == 1
    assert "Cannot compare: the runs measure different model outputs" in at.error[0].value
    at = compare_page(monkeypatch, a, tmp_path / "missing")
    assert "does not exist" in at.error[0].value
