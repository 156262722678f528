"""What a first look at real data shows: the trust banner where the model is at chance (and not
where it learnt), the suspect signals compared on ground truth, short ids for absolute paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from dashboard import state
from engine.files import read_jsonl

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def _page(run: Path, monkeypatch, page: str | None = None) -> AppTest:
    monkeypatch.setenv(state.RUN_ENV, str(run))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def test_a_model_at_chance_gets_the_no_signal_banner(untrained_run, monkeypatch):
    for page in (None, "views/overview.py"):
        at = _page(untrained_run, monkeypatch, page)
        banners = [e.value for e in at.error]
        assert any(b.startswith("**Attributions: no signal.**") for b in banners), banners
        assert any("near chance on both splits" in b for b in banners)


def test_a_model_that_learnt_shows_no_banner_on_explore(run_dir, monkeypatch):
    at = _page(run_dir, monkeypatch)
    assert not any("Attributions:" in e.value for e in [*at.error, *at.warning])
    overview = _page(run_dir, monkeypatch, "views/overview.py")
    assert any(s.value.startswith("**Attributions: reliable.**") for s in overview.success)


def test_overview_compares_the_suspect_signals_on_ground_truth(run_dir, monkeypatch):
    at = _page(run_dir, monkeypatch, "views/overview.py")
    column = "ROC AUC (planted mislabeled pairs)"
    table = next(d.value for d in at.dataframe if column in d.value.columns)
    assert list(table["signal"]) == [
        "self-influence",
        "CLIP similarity (low)",
        "caption rank",
        "self-influence + caption rank",
    ]
    # the caption rank's AUC by brute force: P(a mislabeled pair ranks worse than a clean one)
    ranks = np.load(run_dir / "train_caption_rank.npy").astype(float)
    bad = np.array([bool(r["mislabeled"]) for r in read_jsonl(run_dir / "train.jsonl")])
    wins = (ranks[bad][:, None] > ranks[~bad][None, :]).mean()
    ties = (ranks[bad][:, None] == ranks[~bad][None, :]).mean()
    assert table[column][2] == f"{wins + ties / 2:.3f}"


def test_absolute_image_paths_show_short_ids(absolute_paths_run, monkeypatch):
    at = _page(absolute_paths_run, monkeypatch)
    picked = [b.label for b in at.button if b.key and b.key.startswith("pick-")]
    assert picked and all("/" not in label and len(label) < 12 for label in picked), picked
    assert at.query_params["val"] == picked[0]
