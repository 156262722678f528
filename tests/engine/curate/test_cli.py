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
