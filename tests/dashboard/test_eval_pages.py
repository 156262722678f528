"""The counterfactual evaluation on the dashboard: Overview's LDS and removal tables and plots,
and the Explore page's removal result for a pair, checked against RUN/eval/*.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import state
from engine.cli.eval_cmds import train_config
from engine.evaluate.lds import LdsConfig, evaluate_lds
from engine.evaluate.removal import RemoveConfig, evaluate_removal
from engine.files import read_json, read_jsonl

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@pytest.fixture(scope="module")
def evaluated_run(run_dir, tmp_path_factory):
    """A copy of the small run with a (small) LDS evaluation and a removal experiment."""
    run = tmp_path_factory.mktemp("evaluated") / "run"  # same depth: relative paths resolve
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    tcfg = train_config(run_dir, {})[0]
    methods = ["trak", "clip-image", "random"]
    lds = LdsConfig(subsets=3, bootstrap=50, workers=1, methods=methods)
    evaluate_lds(run, lds, tcfg)
    target = read_jsonl(run / "val.jsonl")[1]["id"]
    removal = RemoveConfig(targets=[target], ks=[3], methods=["trak", "random"])
    evaluate_removal(run, removal, tcfg)
    return run


def app(run: Path, monkeypatch, page: str, query_params: dict | None = None) -> AppTest:
    monkeypatch.setenv(state.RUN_ENV, str(run))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update(query_params or {})
    at.run()
    if page != "views/explore.py":
        at.switch_page(page).run()
    assert not at.exception
    return at


def table(at: AppTest, column: str):
    """The first dataframe on the page with this column."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_overview_shows_the_lds_and_the_removal_summary(evaluated_run, monkeypatch):
    at = app(evaluated_run, monkeypatch, "views/overview.py")
    lds = read_json(evaluated_run / "eval" / "lds.json")
    shown = table(at, "LDS")
    ranked = sorted(lds["methods"].items(), key=lambda kv: -kv[1]["lds"])
    assert list(shown["LDS"]) == [f"{m['lds']:+.3f}" for _, m in ranked]
    assert list(shown["95% interval"]) == [
        f"[{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]" for _, m in ranked
    ]
    assert "TRAK (trakview)" in list(shown["method"])
    removal = read_json(evaluated_run / "eval" / "remove.json")
    shown = table(at, "mean change")
    assert list(shown["mean change"]) == [f"{r['mean_delta']:+.3f}" for r in removal["summary"]]
    assert len(at.get("plotly_chart")) == 2  # the LDS plot and the removal plot
    assert not at.info


def test_overview_without_an_evaluation_says_how_to_make_one(run_dir, monkeypatch):
    at = app(run_dir, monkeypatch, "views/overview.py")
    messages = " ".join(i.value for i in at.info)
    assert "trakview eval lds" in messages and "trakview eval remove" in messages
    assert not at.get("plotly_chart")


def test_explore_shows_a_pairs_removal_result(evaluated_run, monkeypatch):
    val = read_jsonl(evaluated_run / "val.jsonl")
    removal = read_json(evaluated_run / "eval" / "remove.json")
    entry = removal["targets"][val[1]["id"]]
    at = app(evaluated_run, monkeypatch, "views/explore.py", {"val": val[1]["id"]})
    shown = table(at, "change")
    expected = {
        ("top-k by TRAK (trakview)" if m == "trak" else "k random pairs"): f"{r['3']['delta']:+.3f}"
        for m, r in entry["removed"].items()
    }
    assert dict(zip(shown["removed"], shown["change"], strict=True)) == expected
    text = " ".join(m.value for m in at.markdown)
    assert f"{entry['margin_full']:+.3f}" in text
    lds = read_json(evaluated_run / "eval" / "lds.json")
    assert f"{lds['methods']['trak']['per_target'][1]:+.3f}" in text
    assert not at.get("plotly_chart")  # nothing added (the pair view's plots are closed)

    # a pair without a removal experiment says how to run one
    at = app(evaluated_run, monkeypatch, "views/explore.py", {"val": val[2]["id"]})
    assert any(f"--val {val[2]['id']}" in c.value for c in at.caption)
    assert not [d for d in at.dataframe if "change" in d.value.columns]
