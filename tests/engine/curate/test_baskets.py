"""Baskets persist with who/when/why, survive concurrent saves from several processes, and their
predicted effect is minus the sum of the removed pairs' scores (both forms of the scores); the
selections that fill them pick what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine.curate import baskets, effect, select
from engine.errors import CurateError
from engine.explore.run_data import RunData
from engine.files import read_json, read_jsonl
from engine.run.layout import RunLayout

TRAIN = [{"id": f"p{i:03d}", "caption": f"caption {i}", "image": f"{i}.png"} for i in range(200)]


def test_a_basket_keeps_who_when_why_and_reads_back(tmp_path):
    layout = RunLayout(tmp_path / "run")
    assert baskets.basket_names(layout) == []
    assert not layout.baskets_dir.exists()  # looking writes nothing
    basket, added = baskets.add_rows(layout, "mis", TRAIN, [5, 3, 5], "looks wrong", "card", "ann")
    assert added == 2 and basket.ids == ["p005", "p003"]
    again, added = baskets.add_rows(
        layout, "mis", TRAIN, [3, 7], "", "threshold", "bob", chosen_with_val=["v1", "v2"]
    )
    assert added == 1 and again.ids == ["p005", "p003", "p007"]
    read = baskets.read_basket(layout, "mis")  # as a restarted process reads it
    assert read.to_json() == again.to_json()
    first, last = read.entries[0], read.entries[2]
    assert (first.who, first.why, first.how, first.row) == ("ann", "looks wrong", "card", 5)
    assert (last.who, last.how, last.caption) == ("bob", "threshold", "caption 7")
    assert read.entries[1].who == "ann"  # a pair added twice keeps its first who/why
    assert read.chosen_with_val == ["v1", "v2"] and not read.chosen_with_every_val
    assert first.when[:4].isdigit() and read.updated >= read.created
    doc = read_json(layout.basket("mis"))
    assert doc["format"] == baskets.FORMAT and [e["id"] for e in doc["entries"]] == read.ids
    assert baskets.basket_names(layout) == ["mis"]
    _, gone = baskets.remove_ids(layout, "mis", ["p003", "nope"])
    assert gone == 1 and baskets.read_basket(layout, "mis").ids == ["p005", "p007"]
    rows = baskets.basket_rows(baskets.read_basket(layout, "mis"), TRAIN)
    assert rows.tolist() == [5, 7]
    shifted = TRAIN[1:]  # the stored rows no longer hold these ids: looked up by id
    assert baskets.basket_rows(baskets.read_basket(layout, "mis"), shifted).tolist() == [4, 6]


def test_names_rows_and_missing_baskets_are_refused_clearly(tmp_path):
    layout = RunLayout(tmp_path / "run")
    for bad in ("", "../x", ".hidden", "a b", "x" * 65, "é"):
        with pytest.raises(CurateError, match="is not allowed"):
            baskets.add_rows(layout, bad, TRAIN, [1], "", "card")
    with pytest.raises(CurateError, match=r"outside 0\.\.199"):
        baskets.add_rows(layout, "ok", TRAIN, [200], "", "card")
    with pytest.raises(CurateError, match="how must be one of"):
        baskets.add_rows(layout, "ok", TRAIN, [1], "", "magic")
    baskets.add_rows(layout, "ok", TRAIN, [1], "", "card")
    with pytest.raises(CurateError, match=r"has no basket 'other' \(its baskets: ok\)"):
        baskets.read_basket(layout, "other")
    with pytest.raises(CurateError, match="are not training pairs of this run, e.g. \\['zz'\\]"):
        baskets.rows_of_ids(TRAIN, ["p001", "zz"])


def test_a_run_that_cannot_be_written_refuses_clearly(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    layout.baskets_dir.write_text("")  # in the way: not a folder
    with pytest.raises(CurateError, match="cannot save a basket in .*copy the run"):
        baskets.add_rows(layout, "mis", TRAIN, [1], "", "card")
    layout.baskets_dir.unlink()
    # a read-only mount or another user's run (as root, permissions are not enforced: asked)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(CurateError, match="no write permission"):
        baskets.add_rows(layout, "mis", TRAIN, [1], "", "card")


ADDER = textwrap.dedent(
    """
    import sys
    from engine.curate import baskets
    from engine.run.layout import RunLayout
    train = [{"id": f"p{i:03d}", "caption": "c"} for i in range(200)]
    start = int(sys.argv[2])
    for row in range(start, start + 25):
        baskets.add_rows(RunLayout(sys.argv[1]), "shared", train, [row], f"from {start}", "cli")
    """
)


def test_concurrent_saves_from_several_processes_lose_nothing(tmp_path):
    run = tmp_path / "run"
    procs = [
        subprocess.Popen([sys.executable, "-c", ADDER, str(run), str(start)])
        for start in (0, 25, 50, 75)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    basket = baskets.read_basket(RunLayout(run), "shared")
    assert sorted(basket.ids) == [f"p{i:03d}" for i in range(100)]
    assert {e.why for e in basket.entries} == {f"from {s}" for s in (0, 25, 50, 75)}
    assert not [p for p in (run / "baskets").iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.fixture(scope="module")
def data(run_dir):
    return RunData(run_dir)


@pytest.fixture(scope="module")
def arrays(run_dir):
    """What the small run stores, read straight from its files."""
    return {
        "scores": np.load(run_dir / "scores.npy"),
        "train": read_jsonl(run_dir / "train.jsonl"),
        "val": read_jsonl(run_dir / "val.jsonl"),
        "suspect": np.load(run_dir / "suspect_mislabeled.npy"),
    }


def as_topk(data: RunData) -> RunData:
    """The same run read as if it kept only the top-k form (columns from traker's store)."""
    other = RunData(data.run)
    other.scores.matrix = None
    return other


def test_predicted_effect_is_minus_the_summed_scores(data, arrays, tmp_path):
    scores = arrays["scores"]
    rows = np.array([3, 17, 42, 199, 5])
    layout = RunLayout(tmp_path / "run")
    val_ids = [str(r["id"]) for r in arrays["val"]]
    basket, _ = baskets.add_rows(
        layout, "b", data.train, rows, "", "threshold", chosen_with_val=val_ids[:4]
    )
    result = effect.run_effect(data, basket)
    want = -scores[rows].astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(result.delta, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        effect.run_effect(as_topk(data), basket).delta, want, rtol=2e-3, atol=1e-5 * abs(want).max()
    )
    assert result.mean_change == pytest.approx(want.mean())
    # the reference: a random basket of as many pairs, in expectation
    random_mean = -len(rows) / len(scores) * scores.astype(np.float64).sum() / scores.shape[1]
    assert result.random_mean_change == pytest.approx(random_mean, rel=1e-5)
    assert effect.run_effect(as_topk(data), basket).random_mean_change == pytest.approx(
        random_mean, rel=1e-4
    )
    assert result.held_out.tolist() == [False] * 4 + [True] * (len(val_ids) - 4)
    doc = result.to_json(data.val, k=3)
    assert doc["held_out"]["predicted_mean_change"] == pytest.approx(want[4:].mean())
    assert doc["random_basket_predicted_mean_change"] == pytest.approx(random_mean, rel=1e-5)
    assert [p["id"] for p in doc["most_helped"]] == [val_ids[j] for j in np.argsort(-want)[:3]]
    assert [p["id"] for p in doc["most_hurt"]] == [val_ids[j] for j in np.argsort(want)[:3]]
    assert doc["delta"] == pytest.approx(want.tolist(), abs=1e-6)
    assert sum(doc["histogram"]["counts"]) == len(val_ids)
    assert doc["trust"]["level"] in doc["caveat"] and "linear datamodel" in doc["caveat"]
    assert doc["predicted_mean_margin"] == pytest.approx(float(np.mean(data.val_margin + want)))


def test_selections(data, arrays):
    scores = arrays["scores"]
    a, b = select.val_halves(40, 0)
    assert len(a) == 20 and sorted([*a, *b]) == list(range(40))
    assert np.array_equal(select.val_halves(40, 0)[0], a) and not np.array_equal(
        select.val_halves(40, 1)[0], a
    )
    want = scores[:, a].astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(select.column_sum(data.scores, a), want, rtol=1e-5)
    np.testing.assert_allclose(
        select.column_sum(as_topk(data).scores, a), want, rtol=2e-3, atol=1e-5 * abs(want).max()
    )
    harmful = select.most_harmful(want, 15)
    assert harmful.tolist() == [i for i in np.argsort(want, kind="stable")[:15] if want[i] < 0]
    assert select.most_harmful(np.array([1.0, -2.0, 3.0]), 3).tolist() == [1]
    suspects = select.top_suspects(arrays["suspect"], 7)
    assert suspects.tolist() == np.argsort(-arrays["suspect"], kind="stable")[:7].tolist()
    column = scores[:, 2]
    low = select.at_or_below(column, float(np.sort(column)[9]))
    assert low.tolist() == np.argsort(column, kind="stable")[:10].tolist()
    word = arrays["train"][0]["caption"].split()[-1]
    found = select.caption_matches(data.train, word.upper())
    assert found.tolist() == [i for i, r in enumerate(arrays["train"]) if word in r["caption"]]
    assert "mislabeled" in select.extra_fields(data.train)
    flagged = select.column_matches(data.train, "mislabeled", "true")
    assert flagged.tolist() == [i for i, r in enumerate(arrays["train"]) if r["mislabeled"]]
    with pytest.raises(CurateError, match="no field 'nope'"):
        select.column_matches(data.train, "nope", "x")
    with pytest.raises(CurateError, match="search text is empty"):
        select.caption_matches(data.train, "  ")


def test_id_files_in_three_layouts():
    assert select.parse_ids("# mine\na\n\nb\na\n", "ids.txt") == ["a", "b"]
    jsonl = "".join(json.dumps({"id": i, "why": "x"}) + "\n" for i in ("c", "d"))
    assert select.parse_ids(jsonl, "removed.jsonl") == ["c", "d"]
    assert select.parse_ids("title\tid\nx\te\ny\tf\n", "list.tsv") == ["e", "f"]
    with pytest.raises(CurateError, match="no 'id' column"):
        select.parse_ids("a,b\n1,2\n", "x.csv")
    with pytest.raises(CurateError, match="x.jsonl:1 has no 'id'"):
        select.parse_ids('{"a": 1}\n', "x.jsonl")
