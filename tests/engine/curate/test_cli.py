"""``trakview basket``: add (ids, suspects, harmful to a validation half, search, column), list,
remove, import, effect --json (minus the summed scores) and export of the cleaned CSV found from
the run's run.toml (or named with --train-data), read back as a check."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.curate import baskets, select
from engine.errors import CurateError
from engine.files import read_json, read_jsonl
from engine.run.invocation import write_toml
from engine.run.layout import RunLayout


@pytest.fixture(scope="module")
def csv_run(run_dir, tmp_path_factory):
    """The session's run copied at the same depth, as if built from an open_clip_train CSV of
    its training pairs (run.toml names it)."""
    folder = tmp_path_factory.mktemp("basket-cli")
    run = folder / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval", "baskets"))
    layout = RunLayout(run)
    listing = folder / "data" / "train.csv"
    listing.parent.mkdir()
    with open(listing, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["id", "filepath", "title"])
        for rec in read_jsonl(layout.pairs("train")):
            writer.writerow([rec["id"], (run / rec["image"]).resolve(), rec["caption"]])
    write_toml(layout.run_toml, {"train_data": str(listing)}, run, "test")
    return run


def invoke(*args: str):
    return CliRunner().invoke(app, ["basket", *map(str, args)])


def test_add_list_remove_import(csv_run, tmp_path):
    layout = RunLayout(csv_run)
    train = read_jsonl(layout.pairs("train"))
    ids = [train[5]["id"], train[9]["id"]]
    done = invoke("add", csv_run, "b1", *ids, "--why", "by hand", "--who", "ann")
    assert done.exit_code == 0, done.output
    assert "cli: 2 of 2 pairs added" in done.output
    done = invoke("add", csv_run, "b1", "--suspects", "4", "--search", train[0]["caption"])
    assert done.exit_code == 0, done.output
    suspects = np.argsort(-np.load(layout.suspect), kind="stable")[:4]
    same_caption = [r["id"] for r in train if train[0]["caption"] in r["caption"]]
    basket = baskets.read_basket(layout, "b1")
    want = ids + [train[i]["id"] for i in suspects]
    want += [i for i in same_caption if i not in want]
    assert basket.ids == want
    assert basket.entries[0].who == "ann" and basket.entries[2].how == "suspects"
    listed = invoke("list", csv_run, "b1", "--json")
    assert [e["id"] for e in json.loads(listed.output)["entries"]] == want
    assert "b1" in invoke("list", csv_run).output

    half = invoke("add", csv_run, "half", "--harmful", "5", "--val-half", "a")
    assert half.exit_code == 0, half.output
    scores = np.load(layout.scores)
    a, _ = select.val_halves(scores.shape[1], 0)
    total = scores[:, a].astype(np.float64).sum(axis=1)
    expected = [train[i]["id"] for i in np.argsort(total, kind="stable")[:5] if total[i] < 0]
    chosen = baskets.read_basket(layout, "half")
    val = read_jsonl(layout.pairs("val"))
    assert chosen.ids == expected and chosen.chosen_with_val == [val[j]["id"] for j in a]
    flagged = invoke("add", csv_run, "flags", "--column", "mislabeled=true")
    assert flagged.exit_code == 0, flagged.output
    assert baskets.read_basket(layout, "flags").ids == [r["id"] for r in train if r["mislabeled"]]

    out = invoke("remove", csv_run, "b1", ids[0], "nope")
    assert "1 of 2 pairs taken out" in out.output
    listing = tmp_path / "ids.txt"
    listing.write_text(f"# mine\n{ids[0]}\n{train[11]['id']}\n")
    out = invoke("import", csv_run, "b1", listing)
    assert out.exit_code == 0 and "2 of 2 pairs added" in out.output
    assert baskets.read_basket(layout, "b1").entries[-1].why == "imported from ids.txt"

    for args, message in (
        (("add", csv_run, "b1"), "nothing to add"),
        (("add", csv_run, "no good", "x"), "is not allowed"),
        (("add", csv_run, "b1", "not-an-id"), "not training pairs of this run"),
        (("list", csv_run, "nope"), "has no basket 'nope'"),
        (("add", csv_run, "b1", "--harmful", "3", "--val-half", "c"), "--val-half must be"),
    ):
        result = invoke(*args)
        assert isinstance(result.exception, CurateError), (args, result.output)
        assert message in str(result.exception)


def test_effect_json_and_export(csv_run, tmp_path):
    layout = RunLayout(csv_run)
    train = read_jsonl(layout.pairs("train"))
    rows = [7, 3, 120]
    invoke("add", csv_run, "fx", *[train[i]["id"] for i in rows])
    out = invoke("effect", csv_run, "fx", "--json", "-k", "4")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    delta = -np.load(layout.scores)[rows].astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(doc["delta"], delta, atol=1e-6)
    assert doc["predicted_mean_change"] == pytest.approx(delta.mean())
    assert doc["pairs"] == 3 and len(doc["most_hurt"]) <= 4 and "caveat" in doc
    text = invoke("effect", csv_run, "fx").output
    assert f"{delta.mean():+.4f}" in text and "caveat:" in text

    folder = tmp_path / "cleaned"
    out = invoke("export", csv_run, "fx", "--out", folder)
    assert out.exit_code == 0, out.output
    assert f"{len(train) - 3} of {len(train)} pairs kept, 3 removed" in out.output
    with open(folder / "train.csv", newline="") as fh:
        kept = [r["id"] for r in csv.DictReader(fh, delimiter="\t")]
    assert kept == [r["id"] for n, r in enumerate(train) if n not in rows]
    removed = read_jsonl(folder / "removed.jsonl")
    assert [r["id"] for r in removed] == [train[i]["id"] for i in sorted(rows)]
    summary = read_json(folder / "cleaned.json")
    assert summary["source"]["recorded_in"] == str(layout.run_toml)
    again = invoke("export", csv_run, "fx", "--out", folder)
    assert "is not an empty folder" in str(again.exception)

    bare = tmp_path / "bare" / "run"  # no run.toml: the source must be named
    shutil.copytree(csv_run, bare)
    RunLayout(bare).run_toml.unlink()
    refused = invoke("export", bare, "fx", "--out", tmp_path / "x")
    assert "does not record the source" in str(refused.exception)
    named = invoke(
        "export",
        bare,
        "fx",
        "--out",
        tmp_path / "y",
        "--train-data",
        summary["source"]["train_data"],
    )
    assert named.exit_code == 0, named.output
    assert (tmp_path / "y" / "train.csv").read_bytes() == (folder / "train.csv").read_bytes()


def test_causes_for_a_group_are_ranked_on_half_of_it(csv_run):
    """--causes N --for GROUP: the causes are the top of the ranking computed on the chosen half
    alone (the held-out half takes no part), and the basket records both halves."""
    from engine.explain import report
    from engine.explain.groups import select_group
    from engine.explain.rules import GroupSpec
    from engine.explore.view import RunView

    layout = RunLayout(csv_run)
    done = invoke("add", csv_run, "c1", "--causes", "7", "--for", "failing:8", "--rank-by", "harm")
    assert done.exit_code == 0, done.output
    assert "4 held out for `trakview eval clean`" in done.output
    view = RunView.load(csv_run)
    rows = select_group(report.group_source(view), GroupSpec.parse("failing:8"))
    half_a, half_b = select.group_halves(rows, 0)
    want = np.argsort(view.scores.column_sum(half_a), kind="stable")[:7]  # most harmful to a
    basket = baskets.read_basket(layout, "c1")
    assert basket.ids == [view.train[int(i)]["id"] for i in want]
    val_ids = [str(r["id"]) for r in view.val]
    assert basket.group["chosen_with"] == [val_ids[j] for j in half_a]
    assert basket.group["held_out"] == [val_ids[j] for j in half_b]
    assert basket.chosen_with_val == basket.group["chosen_with"]
    # ranked on the whole group instead, the picks differ: the held-out half would have counted
    whole = np.argsort(view.scores.column_sum(rows), kind="stable")[:7]
    assert set(whole.tolist()) != set(want.tolist())
    # the same basket cannot serve another group
    other = invoke("add", csv_run, "c1", "--causes", "3", "--for", "failing:4", "--rank-by", "harm")
    assert "holds causes of group 'failing:8'" in str(other.exception)
    missing = invoke("add", csv_run, "c2", "--causes", "3")
    assert "--causes N needs --for GROUP" in str(missing.exception)

    # the share of the group's failure the basket should remove, against numpy
    effect = invoke("effect", csv_run, "c1", "--json")
    assert effect.exit_code == 0, effect.output
    doc = json.loads(effect.stdout)["group"]
    scores = np.load(csv_run / "scores.npy").astype(np.float64)
    delta = -scores[np.sort(want)].sum(axis=0)
    margin = np.load(layout.margin("val"))
    rest = np.setdiff1d(np.arange(len(val_ids)), rows)
    deficit = np.median(margin[rest]) - margin[rows].mean()
    assert doc["whole"]["predicted_change"] == pytest.approx(delta[rows].mean(), rel=1e-5)
    assert doc["whole"]["deficit"] == pytest.approx(deficit, rel=1e-5)
    assert doc["held_out"]["pairs"] == len(half_b)
    assert doc["held_out"]["predicted_change"] == pytest.approx(delta[half_b].mean(), rel=1e-5)
    random = -7 / scores.shape[0] * scores.sum(axis=0)
    assert doc["random_basket"]["predicted_change"] == pytest.approx(random[rows].mean(), rel=1e-5)


def test_grow_by_what_the_basket_shares(csv_run):
    from engine.explain import report
    from engine.explore.view import RunView

    layout = RunLayout(csv_run)
    train = read_jsonl(layout.pairs("train"))
    shape = train[0]["shape"]
    ids = [r["id"] for r in train if r["shape"] == shape][:6]
    assert invoke("add", csv_run, "g1", *ids).exit_code == 0
    listed = invoke("grow", csv_run, "g1")
    assert listed.exit_code == 0 and f"column:shape={shape}" in listed.output
    done = invoke("grow", csv_run, "g1", "--by", "auto")
    assert done.exit_code == 0, done.output
    have = set(baskets.read_basket(layout, "g1").ids)
    # the six share their shape (and its word): auto grows by the strongest shared feature
    by_shape = {r["id"] for r in train if r["shape"] == shape}
    by_word = {r["id"] for r in train if shape in r["caption"].split()}
    assert have in (by_shape, by_word, by_shape | by_word) or have >= by_shape & by_word
    # by a visual cluster: exactly the cluster's rows
    view = RunView.load(csv_run)
    clusters = report.training_features(view).clusters
    c = int(clusters[0])
    assert invoke("add", csv_run, "g2", train[0]["id"]).exit_code == 0
    assert invoke("grow", csv_run, "g2", "--by", f"cluster:{c}").exit_code == 0
    want = {train[i]["id"] for i in np.flatnonzero(clusters == c)} | {train[0]["id"]}
    assert set(baskets.read_basket(layout, "g2").ids) == want
    # by neighbours: each pair's nearest training images (CLIP), the pair itself first
    emb = np.load(layout.embeddings("train", "image"))
    assert invoke("grow", csv_run, "g2", "--by", "neighbours:3").exit_code == 0
    nearest = set()
    for i in [r for r, rec in enumerate(train) if rec["id"] in want]:
        nearest |= {train[j]["id"] for j in np.argsort(-(emb @ emb[i]), kind="stable")[:4]}
    assert set(baskets.read_basket(layout, "g2").ids) == want | nearest
    bad = invoke("grow", csv_run, "g2", "--by", "colour")
    assert "--by takes one of column, word, cluster, neighbours, auto" in str(bad.exception)
    nothing = invoke("grow", csv_run, "g2", "--by", "auto", "--min-share", "1.0")
    assert "no feature is carried by" in str(nothing.exception) or nothing.exit_code == 0
