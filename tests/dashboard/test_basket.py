"""The basket on the dashboard, through Streamlit's AppTest: opening pages writes nothing; a
card's "Add to basket" and the Overview's lists fill a basket; the basket page shows the
predicted effect (minus the summed scores of scores.npy) and offers the cleaned CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from dashboard import state
from engine.curate import baskets
from engine.files import read_jsonl
from engine.run.layout import RunLayout

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def app(run: Path, monkeypatch, page: str | None = None) -> AppTest:
    monkeypatch.setenv(state.RUN_ENV, str(run))
    at = AppTest.from_file(str(APP), default_timeout=90).run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def submit(at: AppTest, key: str) -> None:
    """Clicks the submit button of the form ``key``."""
    button = next(b for b in at.button if b.form_id == key)
    button.click().run()
    assert not at.exception, at.exception


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_the_basket_page_on_an_empty_run_writes_nothing(csv_run, monkeypatch):
    at = app(csv_run, monkeypatch, "views/basket.py")
    assert any("No basket yet" in i.value for i in at.info)
    at.switch_page("views/overview.py").run()
    assert not at.exception, at.exception
    assert not RunLayout(csv_run).baskets_dir.exists()


def test_add_by_threshold_and_from_a_list_then_see_the_effect(csv_run, monkeypatch):
    """(A card's dialog is a fragment, which AppTest does not rerun on its own: adding from a
    card is driven in the real browser, test_browser.py.)"""
    layout = RunLayout(csv_run)
    scores = np.load(layout.scores)
    train, val = read_jsonl(layout.pairs("train")), read_jsonl(layout.pairs("val"))
    at = app(csv_run, monkeypatch)
    column = scores[:, 0]  # the first validation pair is selected
    hurting = np.argsort(column, kind="stable")[:6]  # the default threshold: the 6th lowest
    at.text_input(key="basket-threshold-0-why").input("hurts the first pair")
    submit(at, "basket-threshold-0")
    basket = baskets.read_basket(layout, "cleanup")
    assert basket.ids == [train[i]["id"] for i in hurting]
    assert {(e.how, e.why) for e in basket.entries} == {("threshold", "hurts the first pair")}
    assert basket.chosen_with_val == [val[0]["id"]]

    at.switch_page("views/basket.py").run()
    assert not at.exception, at.exception
    delta = -scores[hurting].astype(np.float64).sum(axis=0)
    assert metric(at, "Mean validation margin") == f"{delta.mean():+.4f}"
    assert metric(at, "Validation pairs helped") == f"{(delta > 0).mean():.0%}"
    assert metric(at, "Held-out pairs") == f"{delta[1:].mean():+.4f}"  # all but the chooser
    random_mean = -6 / len(scores) * scores.astype(np.float64).sum() / scores.shape[1]
    assert any(f"6 random training pairs: {random_mean:+.4f}" in c.value for c in at.caption)
    helped = [str(val[j]["id"]) for j in np.argsort(-delta, kind="stable")[:8] if delta[j] > 0]
    assert [p.label for p in at.get("page_link")][: len(helped)] == helped
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Cleaned train.csv", "Removed pairs (JSONL)"]
    table = at.dataframe(key="basket-table").value
    assert list(table["id"]) == basket.ids and set(table["how"]) == {"threshold"}

    at.switch_page("views/overview.py").run()
    at.number_input(key="ov-sus-basket-n").set_value(3)  # in a form: sent with the submit
    submit(at, "ov-sus-basket")
    suspects = np.argsort(-np.load(layout.suspect), kind="stable")[:3]
    added = [train[i]["id"] for i in suspects if i not in hurting]
    basket = baskets.read_basket(layout, "cleanup")
    assert basket.ids == [train[i]["id"] for i in hurting] + added
    assert {e.how for e in basket.entries[6:]} == {"suspects"}
