"""The Group page in AppTest: a group by every rule (the form and the deep link), the group's
aggregated galleries against scores.npy, the confusion's causes against the engine, and a basket
of causes chosen on half the group."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import state
from engine.curate import baskets
from engine.explain import report
from engine.explain.groups import select_group
from engine.explain.rules import GroupSpec
from engine.explore.view import RunView
from engine.run.layout import RunLayout

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def group_page(run: Path, monkeypatch, params: dict | None = None) -> AppTest:
    monkeypatch.setenv(state.RUN_ENV, str(run))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update(params or {})
    at.run()
    at.switch_page("views/group.py").run()
    return at


def shown(at: AppTest, prefix: str) -> list[str]:
    return [b.label for b in at.button if b.key and b.key.startswith(prefix)]


def expected_rows(run: Path, param: str) -> np.ndarray:
    view = RunView.load(run)
    return select_group(report.group_source(view), GroupSpec.parse(param))


@pytest.fixture
def private_run(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("eval", "baskets"))
    return out


@pytest.mark.parametrize(
    "param",
    [
        "failing:6",
        "failing:5/margin",
        "search:circle",
        "column:size=small",
        "ids:v0004,v0011",
        "clip:4/a green cross",
    ],
)
def test_group_from_a_deep_link_by_every_rule(run_dir, arrays, monkeypatch, param):
    at = group_page(run_dir, monkeypatch, {"group": param})
    assert not at.exception, at.exception
    rows = expected_rows(run_dir, param)
    assert at.metric[0].value == str(len(rows))
    # the group's helpful pairs: the argsort of the members' columns of scores.npy, summed
    total = arrays["scores"][:, rows].astype(np.float64).sum(axis=1)
    k = 8
    want = [arrays["train"][i]["id"] for i in np.argsort(-total, kind="stable")[:k] if total[i] > 0]
    assert shown(at, "gr-help-open")[: len(want)] == want
    worst = [arrays["train"][i]["id"] for i in np.argsort(total, kind="stable")[:k] if total[i] < 0]
    assert shown(at, "gr-hurt-open")[: len(worst)] == worst


def test_group_from_the_form_and_a_region(run_dir, monkeypatch):
    at = group_page(run_dir, monkeypatch)
    assert not at.exception
    assert at.query_params["group"] == ["failing:40"] or at.query_params["group"] == "failing:40"
    at.selectbox(key="group-rule").select("column").run()
    at.sidebar.selectbox[1].select("shape").run()
    form_button = [b for b in at.sidebar.button if "Explain" in b.label]
    form_button[0].click().run()
    assert not at.exception, at.exception
    param = at.query_params["group"]
    param = param[0] if isinstance(param, list) else param
    assert param.startswith("column:shape=")
    assert at.metric[0].value == str(len(expected_rows(run_dir, param)))
    # a region of the map, as a deep link
    coords = RunView.load(run_dir).val_map()
    box = (
        f"{coords[:, 0].min()},{np.median(coords[:, 0])},{coords[:, 1].min()},{coords[:, 1].max()}"
    )
    region = group_page(run_dir, monkeypatch, {"group": f"region:{box}"})
    assert not region.exception
    assert region.metric[0].value == str(len(expected_rows(run_dir, f"region:{box}")))
    bad = group_page(run_dir, monkeypatch, {"group": "failing:none"})
    assert any("whole number" in e.value for e in bad.error) or any(
        "whole number" in w.value for w in bad.warning
    )


def test_confusion_causes_and_a_basket_chosen_on_half_the_group(private_run, monkeypatch):
    at = group_page(private_run, monkeypatch, {"group": "failing:6", "confusion": "1"})
    assert not at.exception, at.exception
    view = RunView.load(private_run)
    found = report.attribute_confusion(view, expected_rows(private_run, "failing:6"))
    want = [view.train[int(i)]["id"] for i in found.top(8)]
    assert shown(at, "gr-causes-open") == want
    # the causes go to a basket, ranked on half a of the group; half b is held out
    form = [b for b in at.button if b.label == "Add the top causes"]
    assert form
    form[0].click().run()
    assert not at.exception, at.exception
    names = baskets.basket_names(RunLayout(private_run))
    assert names, at.success
    basket = baskets.read_basket(RunLayout(private_run), names[0])
    group = basket.group
    assert group["spec"] == "failing:6"
    assert set(group["chosen_with"]).isdisjoint(group["held_out"])
    assert sorted(group["chosen_with"] + group["held_out"]) == sorted(group["val_ids"])
    assert set(basket.chosen_with_val) == set(group["chosen_with"])
    assert json.dumps(group)  # plain JSON in the basket file
