"""``trakview compare`` on two runs of the small world: A (the session's run, with a basket of its
12 top suspects) and B (A's trainer on A's training pairs without the basket, A's settings, every
validation pair but the first 3). Every number is checked against the runs' own files read with
numpy: matched and unmatched pairs, per-pair changes of margins and caption ranks, retrieval hits,
TRAK's prediction (minus the basket's rows of scores.npy, summed) in both score forms and in a
run of format 1, the agreement statistics; the errors; the command line and its HTML report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from engine import files
from engine.cli import app
from engine.cli.app import main
from engine.curate import baskets
from engine.errors import CompareError
from engine.evaluate import compare_report
from engine.evaluate.compare import CompareConfig, compare_runs, fixed_contrast_margin
from engine.explore.run_data import RunData
from engine.files import read_jsonl
from engine.run.layout import RunLayout

SKIPPED_VAL = 3  # B's validation set lacks A's first 3 pairs
BASKET = 12


@pytest.fixture(scope="module")
def ab(compare_runs):
    return compare_runs


def truth(a, b):
    """What the runs store, read with numpy: per matched id (A's order) A's and B's rows."""
    val_a = [r["id"] for r in read_jsonl(a / "val.jsonl")]
    val_b = {r["id"]: j for j, r in enumerate(read_jsonl(b / "val.jsonl"))}
    rows_a = np.array([j for j, i in enumerate(val_a) if i in val_b])
    rows_b = np.array([val_b[val_a[j]] for j in rows_a])
    gone = np.array([e.row for e in baskets.read_basket(RunLayout(a), "sus").entries])
    return {
        "ids": [val_a[j] for j in rows_a],
        "rows_a": rows_a,
        "rows_b": rows_b,
        "delta": np.load(b / "val_margin.npy")[rows_b].astype(np.float64)
        - np.load(a / "val_margin.npy")[rows_a],
        "rank_a": np.load(a / "val_caption_rank.npy")[rows_a],
        "rank_b": np.load(b / "val_caption_rank.npy")[rows_b],
        "predicted": -np.load(a / "scores.npy")[gone].astype(np.float64).sum(0)[rows_a],
        "gone": gone,
    }


def r_at_1(run, rows):
    """Image->text R@1 hits among ``rows`` from the ensemble embeddings (ties lose)."""
    image = np.load(run / "val_image_emb.npy")[rows]
    text = np.load(run / "val_text_emb.npy")[rows]
    sim = image @ text.T
    own = np.diag(sim).copy()
    np.fill_diagonal(sim, -np.inf)
    return ((sim >= own[:, None]).sum(1) == 0).astype(float)


def ranks(x):
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)


def test_compare_two_runs_a_basket_removed(ab):
    a, b = ab
    t = truth(a, b)
    c = compare_runs(a, b, CompareConfig(basket="sus", bootstrap=300, columns=["shape=circle"]))
    doc = compare_report.to_json(c)
    json.dumps(doc)  # plain JSON
    val_ids = [r["id"] for r in read_jsonl(a / "val.jsonl")]
    assert doc["val"] == {
        "n_a": 40,
        "n_b": 37,
        "matched": 37,
        "only_a": SKIPPED_VAL,
        "only_b": 0,
        "only_a_ids": val_ids[:SKIPPED_VAL],
        "only_b_ids": [],
    }
    basket_ids = baskets.read_basket(RunLayout(a), "sus").ids
    assert doc["train"]["removed"] == BASKET and doc["train"]["added"] == 0
    assert set(doc["train"]["removed_ids"]) == set(basket_ids) == c.gone
    assert doc["basket"] == {"name": "sus", "pairs": BASKET, "in_b": 0}

    # per pair: the runs' own margins and ranks; TRAK's prediction: -sum of the basket's rows
    assert [p["id"] for p in doc["pairs"]] == t["ids"]
    np.testing.assert_array_equal([p["change"] for p in doc["pairs"]], t["delta"])
    assert [p["rank_a"] for p in doc["pairs"]] == t["rank_a"].tolist()
    assert [p["rank_b"] for p in doc["pairs"]] == t["rank_b"].tolist()
    np.testing.assert_allclose([p["predicted"] for p in doc["pairs"]], t["predicted"], rtol=1e-6)
    overall = doc["overall"]
    assert overall["margin_change"]["mean"] == pytest.approx(t["delta"].mean(), rel=1e-9)
    low, high = overall["margin_change"]["ci"]
    assert low <= t["delta"].mean() <= high
    assert overall["improved"] == pytest.approx((t["delta"] > 0).mean())
    assert overall["caption_rank"]["median_b"] == float(np.median(t["rank_b"]))
    r1 = overall["retrieval"]["i2t_r1"]
    assert r1["a"] == pytest.approx(r_at_1(a, t["rows_a"]).mean())
    assert r1["b"] == pytest.approx(r_at_1(b, t["rows_b"]).mean())

    # improved and regressed most: the largest changes of each sign, in order
    order = np.argsort(-t["delta"], kind="stable")[:10]
    assert [p["id"] for p in doc["improved"]] == [t["ids"][i] for i in order if t["delta"][i] > 0]
    assert all(p["change"] < 0 for p in doc["regressed"])
    assert doc["regressed"][0]["change"] == pytest.approx(t["delta"].min())

    # groups: a column value, the pairs predicted to move most
    val = read_jsonl(a / "val.jsonl")
    circles = [k for k, j in enumerate(t["rows_a"]) if val[j].get("shape") == "circle"]
    assert 0 < doc["groups"]["shape = circle"]["n"] == len(circles)
    got = doc["groups"]["shape = circle"]["margin_change"]["mean"]
    assert got == pytest.approx(t["delta"][circles].mean())
    up = [i for i in np.argsort(-t["predicted"], kind="stable")[:20] if t["predicted"][i] > 0]
    rise = doc["groups"]["predicted to rise most (20)"]
    assert rise["n"] == len(up)
    assert rise["predicted_change"] == pytest.approx(t["predicted"][up].mean(), rel=1e-6)

    # predicted against actual, computed here with numpy
    check = doc["prediction"]["actual"]
    p, y = t["predicted"], t["delta"]
    assert check["pearson"]["value"] == pytest.approx(np.corrcoef(p, y)[0, 1], rel=1e-6)
    assert check["spearman"]["value"] == pytest.approx(
        np.corrcoef(ranks(p), ranks(y))[0, 1], rel=1e-6
    )
    assert check["sign"]["value"] == pytest.approx((np.sign(p) == np.sign(y)).mean())
    for name in ("pearson", "spearman", "sign"):
        assert check[name]["ci"][0] <= check[name]["value"] <= check[name]["ci"][1]
    scale = p @ y / (p @ p)
    total = ((y - y.mean()) ** 2).sum()
    assert check["explained"]["scale"] == pytest.approx(scale, rel=1e-9)
    assert check["explained"]["scaled"] == pytest.approx(1 - ((y - scale * p) ** 2).sum() / total)
    assert check["explained"]["as_predicted"] == pytest.approx(1 - ((y - p) ** 2).sum() / total)
    assert check["explained"]["fit"] == pytest.approx(np.corrcoef(p, y)[0, 1] ** 2, rel=1e-6)
    assert "fixed" in doc["prediction"]
    assert any("caption ranks are among each run's own" in n for n in doc["notes"])


def test_the_fixed_contrast_margin_reproduces_the_runs_own(ab):
    """A's checkpoints over A's own contrast batches give A's val_margin (computed by the build);
    over B's, the draw avoids the removed pairs and the margins change."""
    a, b = ab
    data_a, data_b = RunData(a), RunData(b)
    own = fixed_contrast_margin(data_a, data_a, [str(r["id"]) for r in data_a.train])
    np.testing.assert_allclose(own, np.load(a / "val_margin.npy"), atol=1e-5)
    other = fixed_contrast_margin(data_a, data_b, [str(r["id"]) for r in data_b.train])
    assert other.shape == own.shape and not np.allclose(other, own)


def test_the_removed_pairs_are_detected_without_a_basket(ab):
    a, b = ab
    t = truth(a, b)
    doc = compare_report.to_json(compare_runs(a, b, CompareConfig(bootstrap=50)))
    assert doc["basket"] == {"name": "removed pairs", "pairs": BASKET, "in_b": 0}
    np.testing.assert_allclose([p["predicted"] for p in doc["pairs"]], t["predicted"], rtol=1e-6)
    same = compare_report.to_json(compare_runs(a, a, CompareConfig(bootstrap=50)))
    assert same["prediction"] is None and same["train"]["removed"] == 0
    assert same["overall"]["margin_change"]["mean"] == 0
    assert any("no removal to predict" in n for n in same["notes"])


def test_a_basket_chosen_with_some_validation_pairs_groups_the_held_out_ones(ab):
    a, b = ab
    layout = RunLayout(a)
    val_ids = [r["id"] for r in read_jsonl(a / "val.jsonl")]
    rows = [e.row for e in baskets.read_basket(layout, "sus").entries]
    records = read_jsonl(layout.pairs("train"))
    baskets.add_rows(layout, "chosen", records, rows, "", "harmful", chosen_with_val=val_ids[:13])
    doc = compare_report.to_json(compare_runs(a, b, CompareConfig(basket="chosen", bootstrap=50)))
    groups = doc["groups"]
    assert groups["chose the basket"]["n"] == 10  # A's first 3 are not in B
    assert groups["held out (did not choose the basket)"]["n"] == 27
    t = truth(a, b)
    held = groups["held out (did not choose the basket)"]["margin_change"]["mean"]
    assert held == pytest.approx(t["delta"][10:].mean())


def test_both_score_forms_and_format_1(ab, tmp_path):
    """Run A in the top-k form (no scores.npy: the prediction from traker's store) and as a run
    of format 1 (no per-pair summaries) predict what the dense run does."""
    a, b = ab
    t = truth(a, b)
    topk, v1 = tmp_path / "topk", tmp_path / "v1"
    for copy in (topk, v1):
        shutil.copytree(a, copy)
    (topk / "scores.npy").unlink()
    doc = files.read_json(topk / "manifest.json")
    doc["config"]["scores"] = "topk"
    files.write_json(topk / "manifest.json", doc)
    for name in ("topk_pos_scores", "score_hist", "score_range", "train_score_sum"):
        getattr(RunLayout(v1), name).unlink()
    doc = files.read_json(v1 / "manifest.json")
    doc["format_version"] = 1
    del doc["config"]["scores"]
    files.write_json(v1 / "manifest.json", doc)
    scale = np.abs(t["predicted"]).max()
    for run, form in ((topk, "topk"), (v1, "dense")):
        c = compare_runs(run, b, CompareConfig(basket="sus", bootstrap=50))
        assert RunData(run).scores.dense == (form == "dense")
        assert compare_report.to_json(c)["runs"]["a"]["scores"] == form
        np.testing.assert_allclose(c.predicted, t["predicted"], rtol=1e-4, atol=1e-6 * scale)
        np.testing.assert_array_equal(c.delta, t["delta"])


def _edited_copy(run, folder, manifest=None, val_prefix=None):
    shutil.copytree(run, folder)
    if manifest:
        doc = files.read_json(folder / "manifest.json")
        doc["config"].update(manifest)
        files.write_json(folder / "manifest.json", doc)
    if val_prefix:
        val = read_jsonl(folder / "val.jsonl")
        files.write_jsonl(folder / "val.jsonl", [{**r, "id": val_prefix + r["id"]} for r in val])
    return folder


def test_incomparable_runs_are_refused_in_one_line(ab, tmp_path, monkeypatch, capsys):
    a, b = ab
    cases = {
        "share no validation pair": _edited_copy(b, tmp_path / "ids", val_prefix="other-"),
        "built on different models: A": _edited_copy(b, tmp_path / "m", {"model": "ViT-B-32"}),
        "simulated batch size 256 in A": _edited_copy(b, tmp_path / "s", {"sim_batch_size": 64}),
    }
    for phrase, other in cases.items():
        with pytest.raises(CompareError, match=phrase):
            compare_runs(a, other, CompareConfig())
        monkeypatch.setattr(sys, "argv", ["trakview", "compare", str(a), str(other)])
        with pytest.raises(SystemExit) as stopped:
            main()
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith("error: ") and phrase in err
        assert err.count("\n") == 1
    with pytest.raises(CompareError, match="KEY a field of the validation pairs"):
        compare_runs(a, b, CompareConfig(columns=["nope=1"]))


def test_cli_compare_text_json_and_report(ab, tmp_path):
    a, b = ab
    t = truth(a, b)
    runner = CliRunner()
    done = runner.invoke(app, ["compare", str(a), str(b), "--basket", "sus", "--json"])
    assert done.exit_code == 0, done.output
    doc = json.loads(done.output)
    np.testing.assert_array_equal([p["change"] for p in doc["pairs"]], t["delta"])
    report = tmp_path / "out" / "report.html"
    flags = ["--basket", "sus", "--search", "red", "--out", str(report), "--bootstrap", "100"]
    done = runner.invoke(app, ["compare", str(a), str(b), *flags])
    assert done.exit_code == 0, done.output
    assert "37 matched by id, 3 only in A, 0 only in B" in done.output
    assert f"{BASKET} of A's not in B, 0 of B's not in A" in done.output
    assert f"TRAK's prediction of removing sus ({BASKET} pairs)" in done.output
    assert "caption contains 'red'" in done.output and f"report: {report}" in done.output
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script" not in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert page.count("data:image/webp;base64,") == len(doc["improved"]) + len(doc["regressed"])
    assert len(page) < 500_000
    for p in doc["improved"][:3]:
        assert p["id"] in page


def test_serve_passes_the_second_run(ab, monkeypatch):
    """`serve RUN --compare RUN_B` checks B and hands it to the dashboard's process."""
    a, b = ab
    seen = {}

    class FakeStreamlit:
        def __init__(self, cmd, env):
            seen.update(env)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeStreamlit)
    runner = CliRunner()
    done = runner.invoke(app, ["serve", str(a), "--compare", str(b)])
    assert done.exit_code == 0, done.output
    assert seen["TRAKVIEW_COMPARE"] == str(b.resolve())
    refused = runner.invoke(app, ["serve", str(a), "--compare", str(a.parent)])
    assert "has no manifest.json" in str(refused.exception)
