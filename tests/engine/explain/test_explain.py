"""Groups of validation pairs, their aggregated effect, what top training pairs share, and the
confusion of failing pairs, on the small run: each checked against numpy on the run's arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import InputError
from engine.explain import aggregate, confusion, describe, report
from engine.explain.groups import failing_rows, select_group
from engine.explain.rules import GroupSpec
from engine.explore.run_data import RunData
from engine.explore.view import RunView
from engine.files import read_jsonl


@pytest.fixture(scope="module")
def view(run_dir):
    return RunView.load(run_dir)


@pytest.fixture(scope="module")
def arrays(run_dir):
    return {"scores": np.load(run_dir / "scores.npy"), "val": read_jsonl(run_dir / "val.jsonl")}


def _select(view, text):
    return select_group(report.group_source(view), GroupSpec.parse(text))


def test_groups_by_every_rule(view, arrays):
    val = arrays["val"]
    assert _select(view, "ids:v0003,v0001,v0003").tolist() == [3, 1]
    word = val[0]["caption"].split()[-1]
    want = [j for j, r in enumerate(val) if word in r["caption"].lower() or word in r["id"]]
    assert _select(view, f"search:{word.upper()}").tolist() == want
    shape = val[5]["shape"]
    assert _select(view, f"column:shape={shape}").tolist() == [
        j for j, r in enumerate(val) if r["shape"] == shape
    ]
    # failing: the 6 worst caption ranks (ties by the lowest margin)
    ranks, margin = np.load(view.layout.caption_rank("val")), np.load(view.layout.margin("val"))
    failing = _select(view, "failing:6")
    outside = np.setdiff1d(np.arange(len(val)), failing)
    assert len(failing) == 6 and ranks[failing].min() >= ranks[outside].max()
    assert ranks[failing].tolist() == sorted(ranks[failing].tolist(), reverse=True)
    by_margin = _select(view, "failing:6/margin")
    assert by_margin.tolist() == np.argsort(margin, kind="stable")[:6].tolist()
    # clip: the best CLIP matches of a text, as the Explore page's search ranks them
    clip = _select(view, "clip:5/a red circle")
    assert clip.tolist() == view.search_val("a red circle", "meaning")[:5]
    assert len(_select(view, "clip:a red circle")) == min(40, len(val))
    # region: the pairs inside a box of the map, by the map's coordinates
    coords = view.val_map()
    x0, x1 = np.quantile(coords[:, 0], [0.2, 0.7])
    y0, y1 = np.quantile(coords[:, 1], [0.1, 0.9])
    inside = _select(view, f"region:{x0},{x1},{y0},{y1}")
    want = np.flatnonzero(
        (coords[:, 0] >= x0) & (coords[:, 0] <= x1) & (coords[:, 1] >= y0) & (coords[:, 1] <= y1)
    )
    assert inside.tolist() == want.tolist() and 0 < len(inside) < len(val)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope:1", r"a group is RULE:VALUE with RULE one of ids, search"),
        ("failing", r"a group is RULE:VALUE"),
        ("failing:", r"group rule 'failing' needs a value"),
        ("failing:zero", r"the number of failing pairs must be a whole number"),
        ("failing:0", r"must be at least 1, got 0"),
        ("failing:5/size", r"ranks by 'rank' or 'margin', got 'size'"),
        ("ids:v0001,zzz", r"unknown validation id\(s\) \['zzz'\]"),
        ("column:nofield=1", r"the pairs have no field 'nofield'"),
        ("column:shape", r"expected KEY=VALUE"),
        ("search:no such words anywhere", r"holds no validation pair"),
        ("region:1,2,3", r"a region is x0,x1,y0,y1"),
    ],
)
def test_group_errors_say_what_was_wrong(view, text, message):
    with pytest.raises(InputError, match=message):
        _select(view, text)


def test_failing_rows_break_rank_ties_by_margin():
    ranks = np.array([3, 9, 9, 1, 9])
    margin = np.array([0.0, 0.5, -1.0, 0.0, 0.1])
    assert failing_rows(ranks, margin, 3).tolist() == [2, 4, 1]


def test_cli_names_every_rule_and_prints_json(run_dir, view):
    runner = CliRunner()
    base = ["explain", str(run_dir), "--no-confusion", "--json", "-k", "4"]
    flags = {
        "failing:5/rank": ["--val-failing", "5"],
        "ids:v0002,v0007": ["--val", "v0002", "--val", "v0007"],
        "search:circle": ["--val-search", "circle"],
        "clip:3/a blue square": ["--val-clip", "a blue square", "--top", "3"],
        "column:size=small": ["--val-column", "size=small"],
        "failing:4/margin": ["--group", "failing:4/margin"],
    }
    coords = view.val_map()
    box = f"{coords[:, 0].min()},{float(np.median(coords[:, 0]))},-1000,1000"
    flags[f"region:{box}"] = ["--val-region", box]
    for param, extra in flags.items():
        done = runner.invoke(app, [*base, *extra])
        assert done.exit_code == 0, (param, done.output)
        doc = json.loads(done.stdout)
        want = _select(view, param)
        assert doc["group"] == param
        assert doc["val_ids"] == [view.val[int(j)]["id"] for j in want]
        assert len(doc["helpful"]) <= 4 and doc["stats"]["pairs"] == len(want)
    both = runner.invoke(app, [*base, "--val-failing", "3", "--val-search", "x"])
    assert both.exit_code == 2 and "name one group" in both.output
    none = runner.invoke(app, ["explain", str(run_dir)])
    assert none.exit_code == 2 and "or --pairs FILE.jsonl" in none.output


def as_topk(run) -> RunData:
    data = RunData(run)
    data.scores.matrix = None  # columns recomputed from traker's store
    return data


def test_aggregated_effect_is_the_sum_of_the_members_columns(run_dir, arrays):
    rows = np.array([4, 0, 17, 4, 33])
    want = arrays["scores"][:, [0, 4, 17, 33]].astype(np.float64).sum(axis=1)
    dense = aggregate.group_effect(RunData(run_dir).scores, rows)
    np.testing.assert_allclose(dense.total, want, rtol=1e-6, atol=1e-9)
    topk = aggregate.group_effect(as_topk(run_dir).scores, rows)
    np.testing.assert_allclose(topk.total, want, rtol=2e-3, atol=1e-5 * abs(want).max())
    helpful, harmful = dense.helpful(5), dense.harmful(5)
    assert helpful.tolist() == np.argsort(-want, kind="stable")[:5].tolist()
    assert harmful.tolist() == np.argsort(want, kind="stable")[:5].tolist()
    assert (want[helpful] > 0).all() and (want[harmful] < 0).all()


def test_concentration_counts_the_fewest_pairs_that_carry_a_share():
    values = np.array([5.0, -1.0, 3.0, 1.0, 1.0, 0.0, -4.0])  # positive total 10
    c = aggregate.concentration(values)
    assert c["total"] == 10 and c["pairs"] == 4
    assert c["n_for"] == {"0.5": 1, "0.8": 2}  # 5 -> 50%, 5 + 3 -> 80%
    neg = aggregate.concentration(-values)
    assert neg["n_for"] == {"0.5": 1, "0.8": 1} and neg["total"] == 5
    assert aggregate.concentration(np.zeros(3))["n_for"] == {}


def test_descriptor_finds_a_planted_column_value_and_word():
    rng = np.random.default_rng(0)
    records = [
        {
            "id": f"t{i}",
            "caption": f"a {rng.choice(['red', 'blue', 'green'])} thing number {i % 7}",
            "image": "x.png",
            "source": str(rng.choice(["web", "camera", "archive"])),
            "serial": f"s{i}",  # unique per pair: an identifier, never offered
        }
        for i in range(400)
    ]
    planted = rng.choice(400, 30, replace=False)
    for i in planted:
        records[i]["source"] = "stockshots"
        records[i]["caption"] += " golden"
    features = describe.TrainingFeatures(records)
    assert "serial" not in features.fields and "source" in features.fields
    picked = np.concatenate([planted[:25], rng.choice(np.setdiff1d(np.arange(400), planted), 5)])
    found = describe.describe(features, picked)
    labels = [f.label() for f in found[:2]]
    assert set(labels) == {"source = stockshots", 'word "golden"'}
    top = found[0]
    assert top.count == 25 and top.picked == 30 and top.overall == 30
    assert top.z == pytest.approx((25 - 30 * 30 / 400) / np.sqrt(30 * 0.075 * 0.925))
    assert sorted(features.rows_with(top).tolist()) == sorted(planted.tolist())
    # words every caption has are never offered
    assert "thing" not in {f.value for f in found}


def test_kmeans_clusters_separate_planted_clusters():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16))
    x = np.concatenate([c + 0.05 * rng.normal(size=(50, 16)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = describe.kmeans_clusters(x, k=3)
    for block in range(3):
        assert len(set(labels[block * 50 : (block + 1) * 50].tolist())) == 1
    assert len(set(labels.tolist())) == 3


def test_wrong_matches_are_the_captions_preferred_to_the_own():
    # three pairs in 2-D: images 0 and 1 prefer both other captions (closest first) to their
    # own; pair 2's own caption is its image's closest
    image = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = np.array([[0.0, 1.0], [0.9, 0.436], [0.6, 0.8]])
    found = confusion.wrong_matches(image, text, [0, 1, 2], per_pair=2)
    assert [(m.val_row, m.other_row) for m in found] == [(0, 1), (0, 2), (1, 0), (1, 2)]
    assert [m.weight for m in found] == [0.5] * 4
    assert len(confusion.wrong_matches(image, text, [0], per_pair=1)) == 1
    assert found[0].similarity == pytest.approx(0.9) and found[0].own_similarity == 0.0
    gallery = np.array([[1.0, 0.0]])
    other = confusion.wrong_matches(image, text, [1], gallery_text=gallery)
    assert [(m.val_row, m.other_row, m.kind) for m in other] == []  # 0 < own 1: none
    images = confusion.wrong_matches(image, text, [0], kinds=("image",), per_pair=1)
    assert [(m.other_row, m.kind) for m in images] == [(1, "image")]


def test_confusion_attribution_is_the_wrong_pairs_columns_summed(run_dir, view):
    """The causes are, exactly, the weighted sum of each wrong match's column as a new query."""
    rows = np.array(_select(view, "failing:3"))
    found = report.attribute_confusion(view, rows, per_pair=2)
    assert found is not None and found.matches
    engine = view.engine
    want = np.zeros(len(view.train))
    for m in found.matches:
        image = view.image(view.val[m.val_row]["image"])
        column = engine.query(image, view.train[m.other_row]["caption"], k=1).scores
        want += m.weight * column
    np.testing.assert_allclose(found.causes, want, rtol=1e-3, atol=1e-4 * abs(want).max())
    # and the batched gradients are the build's: a validation pair's own gradient reproduces
    # its stored target gradients
    grads = engine.batch_gradients([view.image(view.val[2]["image"])], [view.val[2]["caption"]])
    stored = np.stack([np.load(view.layout.trak_target_grads(m))[2] for m in range(view.n_models)])
    np.testing.assert_allclose(grads[0], stored, rtol=1e-4, atol=1e-5 * abs(stored).max())


def test_explain_new_pairs_from_a_file(run_dir, view, tmp_path):
    listing = tmp_path / "new.jsonl"
    records = [view.val[3], view.val[8]]
    with open(listing, "w") as fh:
        for rec in records:
            fh.write(
                json.dumps({"image": str(run_dir / rec["image"]), "caption": rec["caption"]}) + "\n"
            )
    done = CliRunner().invoke(
        app, ["explain", str(run_dir), "--pairs", str(listing), "--json", "--no-confusion"]
    )
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)
    # two validation pairs given as new pairs: their summed effect is the sum of their columns
    scores = np.load(run_dir / "scores.npy")
    want = scores[:, [3, 8]].astype(np.float64).sum(axis=1)
    top = doc["helpful"][0]
    assert top["row"] == int(np.argmax(want))
    assert top["score"] == pytest.approx(float(want.max()), rel=1e-3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.png", "caption": "x"}\n')
    refused = CliRunner().invoke(app, ["explain", str(run_dir), "--pairs", str(bad)])
    assert refused.exit_code == 2 or "bad.jsonl:1" in str(refused.exception)
