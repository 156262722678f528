"""``eval clean`` on the small world: the models it trains are the run's trainer and seeds, paired
across conditions (the same seed r without the basket, the controls, nothing); its numbers are
those of the cached outputs, recomputed here with numpy; a second call trains nothing, an
interrupted one trains only what is missing; the basket records the result; the command line."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.cli.eval_cmds import train_config
from engine.curate import baskets, select
from engine.errors import EvalError
from engine.evaluate import retrain
from engine.evaluate.clean import CleanConfig, evaluate_clean, measure
from engine.files import load_npy, read_json, read_jsonl
from engine.run.layout import RunLayout

TRAIN_FLAGS = ["--epochs", "3", "--batch-size", "60", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def tiny_train(run_dir):
    """The run's trainer (2 members, seeds 0 and 1) with few epochs: quick models."""
    return replace(train_config(run_dir, {})[0], epochs=3, batch_size=60, warmup_steps=2)


@pytest.fixture(scope="module")
def run_copy(run_dir, tmp_path_factory):
    """A private copy of the session's run, at the same depth (its checkpoint paths resolve),
    with a basket of the 12 most suspect pairs and one chosen on validation half a."""
    out = tmp_path_factory.mktemp("clean") / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("eval", "baskets"))
    layout = RunLayout(out)
    train = read_jsonl(layout.pairs("train"))
    suspect = np.load(layout.suspect)
    baskets.add_rows(layout, "sus", train, select.top_suspects(suspect, 12), "", "suspects")
    val_ids = [r["id"] for r in read_jsonl(layout.pairs("val"))]
    half_a, _ = select.val_halves(len(val_ids), 0)
    chosen = [val_ids[j] for j in half_a]
    baskets.add_rows(layout, "half", train, [1, 2, 3], "", "harmful", chosen_with_val=chosen)
    return out


def test_clean_is_paired_cached_and_resumable(run_copy, tiny_train):
    layout = RunLayout(run_copy)
    cfg = CleanConfig(basket="sus", bootstrap=200, workers=1)
    result = evaluate_clean(run_copy, cfg, tiny_train)
    # full, basket, clip-low, suspects (the basket itself here), random x 2 seeds
    assert result["timings"]["models_trained"] == 5 * 2
    assert result["seeds"] == [0, 1] and result["measured"]["n_val"] == 40  # nothing chose it
    cache = layout.eval_cache("clean")
    n_train = 240
    basket_rows = np.sort(np.argsort(-np.load(layout.suspect), kind="stable")[:12])
    clip_low = np.sort(np.argsort(np.load(layout.clip_sim("train")), kind="stable")[:12])
    keys = {"full": "full", "basket": f"basket-{retrain.rows_digest(basket_rows)}"}
    keys |= {"clip-low": "clip-low-n12", "random": "random-n12-s0", "suspects": "suspects-n12"}
    for r in range(2):  # model r of every condition: seed r, the rows without what it removes
        for condition, stem in keys.items():
            meta = read_json(cache.output_info(f"{stem}-r{r:02d}"))
            assert meta["seed"] == r, condition
        gone = {"full": [], "basket": basket_rows, "clip-low": clip_low, "suspects": basket_rows}
        for condition, rows in gone.items():
            kept = np.setdiff1d(np.arange(n_train), rows)
            meta = read_json(cache.output_info(f"{keys[condition]}-r{r:02d}"))
            assert meta["rows_sha256"] == retrain.rows_digest(kept), condition
        assert read_json(cache.output_info(f"random-n12-s0-r{r:02d}"))["n_rows"] == n_train - 12

    # the numbers are the cached outputs': margins and retrieval among the measured pairs
    outputs = {
        c: np.stack([load_npy(cache.output(f"{k}-r{r:02d}")) for r in range(2)])
        for c, k in keys.items()
    }
    assert outputs["full"].shape == (2, 40, 1 + 2 * 64)
    diff = outputs["basket"][:, :, 0] - outputs["full"][:, :, 0]
    got = result["conditions"]["basket"]["minus_full"]["margin"]
    assert got["mean"] == pytest.approx(float(diff.mean()), rel=1e-6)
    assert got["ci"][0] <= got["mean"] <= got["ci"][1]
    image, text = outputs["random"][0][:, 1:65], outputs["random"][0][:, 65:]
    sim = image @ text.T
    own = np.diag(sim).copy()
    np.fill_diagonal(sim, -np.inf)
    r_at_1 = (sim >= own[:, None]).sum(axis=1) == 0  # its caption beats the others (ties lose)
    values = measure(outputs["random"], np.arange(40))
    assert values["i2t_r1"][0].tolist() == r_at_1.astype(float).tolist()
    assert result["conditions"]["full"]["metrics"]["margin"]["mean"] == pytest.approx(
        float(outputs["full"][:, :, 0].mean()), rel=1e-6
    )
    scores = np.load(run_copy / "scores.npy")
    predicted = result["conditions"]["basket"]["predicted_margin_change"]
    assert predicted == pytest.approx(float(-scores[basket_rows].sum(axis=0).mean()), rel=1e-5)
    assert result["basket_minus"]["clip-low"]["margin"]["mean"] == pytest.approx(
        float((outputs["basket"][:, :, 0] - outputs["clip-low"][:, :, 0]).mean()), rel=1e-6
    )
    assert any("shortens each epoch from 4 to 3 steps" in n for n in result["notes"])
    assert any("2 models per condition" in n for n in result["notes"])
    recorded = baskets.read_basket(layout, "sus").verification
    assert recorded["summary"] == result["summary"] and recorded["basket_digest"]

    # a second call trains nothing; an interrupted one only what is missing, to the same numbers
    again = evaluate_clean(run_copy, cfg, tiny_train)
    assert again["timings"]["models_trained"] == 0
    cache.output(f"{keys['basket']}-r01").unlink()
    cache.output("random-n12-s0-r00").unlink()
    resumed = evaluate_clean(run_copy, cfg, tiny_train)
    assert resumed["timings"]["models_trained"] == 2
    assert resumed["conditions"] == result["conditions"]

    # a basket chosen on half a is measured on half b, and never on half a
    half = evaluate_clean(run_copy, replace(cfg, basket="half", controls=["random"]), tiny_train)
    _, half_b = select.val_halves(40, 0)
    assert half["measured"]["n_val"] == len(half_b) and half["timings"]["models_trained"] == 2 * 2
    with pytest.raises(EvalError, match="chosen with 20 pairs of validation half a"):
        evaluate_clean(run_copy, replace(cfg, basket="half", measure="a"), tiny_train)
    with pytest.raises(EvalError, match="--ensembles must be at least 1"):
        evaluate_clean(run_copy, replace(cfg, ensembles=0), tiny_train)


def test_cli_eval_clean(run_copy):
    layout = RunLayout(run_copy)
    train = read_jsonl(layout.pairs("train"))
    baskets.add_rows(layout, "every", train, [4, 5], "", "harmful", every_val=True)
    runner = CliRunner()
    base = ["eval", "clean", str(run_copy), "--bootstrap", "50", "--workers", "1", *TRAIN_FLAGS]
    done = runner.invoke(app, [*base, "--basket", "sus"])
    assert done.exit_code == 0, done.output
    assert "0 models trained now, 10 cached" in done.output  # the models of the test above
    assert "removing the basket changed the measured mean margin by" in done.output
    assert "TRAK predicted a mean margin change of" in done.output
    refused = runner.invoke(app, [*base, "--basket", "every"])
    assert "was chosen with every validation pair's scores" in str(refused.exception)
    missing = runner.invoke(app, [*base, "--basket", "nope"])
    assert "has no basket 'nope'" in str(missing.exception)


def test_a_group_basket_is_measured_on_its_held_out_half_and_on_the_rest(run_copy, tiny_train):
    from engine.curate.causes import causes_pick
    from engine.explore.view import RunView

    layout = RunLayout(run_copy)
    view = RunView.load(run_copy)
    rows, _, why, val_ids, record = causes_pick(view, 10, "failing:10", "a", 0, "harm", 3)
    baskets.add_rows(layout, "grp", view.train, rows, why, "causes", chosen_with_val=val_ids)
    baskets.set_group(layout, "grp", record)
    cfg = CleanConfig(basket="grp", bootstrap=100, workers=1, controls=["random"])
    result = evaluate_clean(run_copy, cfg, tiny_train)
    index = {str(r["id"]): j for j, r in enumerate(view.val)}
    held = sorted(index[v] for v in record["held_out"])
    group = {index[v] for v in record["val_ids"]}
    rest = [j for j in range(len(view.val)) if j not in group]
    assert result["measured"]["rule"] == "group" and result["measured"]["n_val"] == len(held) == 5
    assert result["sets"]["rest"]["n_val"] == len(rest) == 30
    cache = layout.eval_cache("clean")
    key = f"basket-{retrain.rows_digest(np.sort(rows))}"
    outputs = {
        c: np.stack([load_npy(cache.output(f"{k}-r{r:02d}")) for r in range(2)])
        for c, k in (("full", "full"), ("basket", key))
    }
    for name, measured in (("group", held), ("rest", rest)):
        diff = outputs["basket"][:, measured, 0] - outputs["full"][:, measured, 0]
        got = result["sets"][name]["conditions"]["basket"]["minus_full"]["margin"]["mean"]
        assert got == pytest.approx(float(diff.mean()), rel=1e-6)
    # R@5 among every validation caption: the run's caption rank, from the cached embeddings
    values = measure(outputs["full"], np.array(held))
    image, text = outputs["full"][0][:, 1:65], outputs["full"][0][:, 65:]
    sim = image @ text.T
    ranks = 1 + (sim > np.diag(sim)[:, None]).sum(axis=1)
    assert values["r5_all"][0].tolist() == (ranks[held] <= 5).astype(float).tolist()
    assert baskets.read_basket(layout, "grp").verification["group"]["spec"] == "failing:10"
