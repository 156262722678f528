"""The counterfactual evaluation: LDS against a hand-computed case, bootstrap intervals, the
model output it retrains for, reproducibility for a seed, the resumable cache, removal, CLI."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import engine.evaluate.stats as evalstats
from engine.cli import app
from engine.cli.eval_cmds import train_config
from engine.errors import EvalError, EvalMismatchError
from engine.evaluate import retrain
from engine.evaluate.lds import LdsConfig, evaluate_lds
from engine.evaluate.methods import METHODS, store_trak_scores
from engine.evaluate.removal import RemoveConfig, evaluate_removal
from engine.evaluate.results import read_lds
from engine.files import load_npy, read_json, read_jsonl
from engine.models.checkpoints import load_into
from engine.models.factory import create

TRAIN_FLAGS = ["--epochs", "4", "--batch-size", "60", "--warmup-steps", "4"]


@pytest.fixture(scope="module")
def tiny_train(run_dir):
    """The trainer of the session's run, as train_ensemble recorded it beside the checkpoints."""
    return train_config(run_dir, {})[0]


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A private copy of the session's run (evaluations write into RUN/eval/). At the same depth
    below the session's temporary folder, so its relative checkpoint paths still resolve."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("eval"))
    return out


# --- LDS by hand ---------------------------------------------------------------------------------

# 4 training pairs, 2 targets, 4 subsets of 2 pairs each.
SCORES = np.array([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0], [-1.0, 2.0]])
MASKS = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=bool)
OUTPUTS = np.array([[0.5, 0.2], [0.9, 0.1], [0.1, 0.4], [0.3, 0.3]])


def test_lds_matches_a_hand_computed_case():
    # Subset sums of the scores: target 0 [3, 2, -1, 0], target 1 [1, 4, 5, 2].
    np.testing.assert_allclose(
        evalstats.subset_predictions(SCORES, MASKS), [[3, 1], [2, 4], [-1, 5], [0, 2]]
    )
    # Target 0: predicted ranks [4, 3, 1, 2], actual [3, 4, 1, 2]: sum d^2 = 2,
    # rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8. Target 1: predicted [1, 3, 4, 2], actual
    # [2, 1, 4, 3]: sum d^2 = 6, rho = 1 - 36 / 60 = 0.4. LDS = mean = 0.6.
    rho = evalstats.lds_per_target(SCORES, MASKS, OUTPUTS)
    np.testing.assert_allclose(rho, [0.8, 0.4])
    result = evalstats.bootstrap_lds(
        {"trak": evalstats.subset_predictions(SCORES, MASKS)}, OUTPUTS, n_boot=50
    )
    assert result["trak"]["lds"] == pytest.approx(0.6)


def test_spearman_gives_ties_their_average_rank_and_constant_columns_nan():
    np.testing.assert_allclose(
        evalstats.rank_columns(np.array([[3.0], [1], [2], [2]]))[:, 0], [4, 1, 2.5, 2.5]
    )
    # ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    rho = evalstats.spearman_columns(
        np.array([[1.0], [2], [2], [3]]), np.array([[1.0], [2], [3], [4]])
    )
    assert rho[0] == pytest.approx(np.sqrt(0.9))
    flat = np.array([[1.0, 1], [1, 1], [1, 1], [1, 1]])  # a method scoring every pair alike
    assert np.isnan(evalstats.lds_per_target(flat, MASKS, OUTPUTS)).all()


def synthetic(n_subsets: int, seed: int = 0, n_train: int = 200, n_val: int = 40):
    """Subsets and outputs of a world where the outputs are linear in true scores plus noise."""
    rng = np.random.default_rng(seed)
    true = rng.standard_normal((n_train, n_val))
    masks = evalstats.subset_masks(n_train, n_subsets, 0.5, seed)
    outputs = evalstats.subset_predictions(true, masks) + 5 * rng.standard_normal(
        (n_subsets, n_val)
    )
    noisy = true + rng.standard_normal(true.shape)  # a good method
    preds = {
        "trak": evalstats.subset_predictions(noisy, masks),
        "same": evalstats.subset_predictions(noisy, masks),
        "random": evalstats.subset_predictions(rng.standard_normal(true.shape), masks),
    }
    return preds, outputs


def test_bootstrap_interval_properties():
    preds, outputs = synthetic(60)
    a = evalstats.bootstrap_lds(preds, outputs, n_boot=300, seed=1)
    b = evalstats.bootstrap_lds(preds, outputs, n_boot=300, seed=1)
    assert a == b  # same seed, same resamples
    assert (
        evalstats.bootstrap_lds(preds, outputs, n_boot=300, seed=2)["trak"]["ci"] != a["trak"]["ci"]
    )
    for m in a.values():
        assert m["ci"][0] <= m["lds"] <= m["ci"][1]
        assert m["half_width"] == pytest.approx((m["ci"][1] - m["ci"][0]) / 2)
    lo, hi = a["random"]["ci"]
    assert lo < 0 < hi  # random scores: LDS around zero
    assert a["trak"]["ci"][0] > 0.3  # the good method is clearly positive
    # paired resamples: a method identical to the reference differs by exactly zero
    assert a["same"]["reference_minus_this"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    assert a["random"]["reference_minus_this"]["ci"][0] > 0
    # more subsets, narrower interval
    wide = evalstats.bootstrap_lds(*synthetic(15), n_boot=300, seed=1)["trak"]["half_width"]
    assert a["trak"]["half_width"] < wide


def test_subsets_are_seeded_and_a_longer_list_starts_with_the_shorter():
    short = evalstats.subset_masks(100, 3, 0.3, seed=5)
    long = evalstats.subset_masks(100, 6, 0.3, seed=5)
    assert (long[:3] == short).all() and (short.sum(axis=1) == 30).all()
    assert not (evalstats.subset_masks(100, 3, 0.3, seed=6) == short).all()
    assert len({evalstats.subset_model_seed(0, s, r) for s in range(50) for r in range(3)}) == 150


# --- what the evaluation measures ---------------------------------------------------------------


def test_store_scores_and_model_output_are_the_runs(run_dir, checkpoints, tensors):
    # TRAK from the traker store, all checkpoints: the run's scores.npy
    scores = load_npy(run_dir / "scores.npy")
    np.testing.assert_allclose(store_trak_scores(run_dir, [0, 1]), scores, rtol=1e-4, atol=1e-6)
    # the retrained models' output, applied to the run's own checkpoints with checkpoint m's
    # simulated batch, averages to the run's val_margin.npy: the quantity TRAK attributes
    manifest = read_json(run_dir / "manifest.json")
    draws = retrain.target_draws(
        manifest["counts"]["n_train"], manifest["config"]["sim_batch_size"], 0, 2
    )
    margins = []
    for m, path in enumerate(checkpoints):
        model = load_into(create("trakview-tiny").model, path)
        margins.append(
            retrain.model_output(model, *tensors["train"], *tensors["val"], draws[m : m + 1])
        )
    np.testing.assert_allclose(
        np.mean(margins, axis=0), load_npy(run_dir / "val_margin.npy"), rtol=1e-4, atol=1e-4
    )


def test_train_config_comes_from_beside_the_checkpoints_then_the_flags(run_dir, small_train):
    cfg, where = train_config(run_dir, {})
    expected = (small_train.epochs, small_train.batch_size, small_train.warmup_steps)
    assert (cfg.epochs, cfg.batch_size, cfg.warmup_steps) == expected
    assert "train_config.json" in where
    cfg, where = train_config(run_dir, {"epochs": 7, "lr": None})
    assert cfg.epochs == 7 and cfg.batch_size == small_train.batch_size and "--epochs" in where


# --- LDS end to end on the small run --------------------------------------------------------------


def lds_cfg(**kw) -> LdsConfig:
    return LdsConfig(**{"subsets": 3, "bootstrap": 100, "workers": 1, **kw})


def test_lds_is_reproducible_and_a_longer_evaluation_reuses_the_shorter(
    run_copy, tmp_path_factory, tiny_train
):
    first = evaluate_lds(run_copy, lds_cfg(), tiny_train)
    assert first["timings"]["models_trained"] == 3
    outputs3 = load_npy(run_copy / "eval" / "lds" / "outputs.npy")
    longer = evaluate_lds(run_copy, lds_cfg(subsets=4), tiny_train)
    assert (longer["timings"]["models_trained"], longer["timings"]["models_reused"]) == (1, 3)
    np.testing.assert_array_equal(load_npy(run_copy / "eval" / "lds" / "outputs.npy")[:3], outputs3)
    assert set(longer["methods"]) == set(METHODS)
    assert read_lds(run_copy) == read_json(run_copy / "eval" / "lds.json")

    # the cached models belong to these settings: other ones are refused, bad ones explained
    with pytest.raises(EvalMismatchError, match="--overwrite"):
        evaluate_lds(run_copy, lds_cfg(), replace(tiny_train, lr=1e-3))
    with pytest.raises(EvalError, match="--fraction"):
        evaluate_lds(run_copy, lds_cfg(fraction=1.5), tiny_train)
    with pytest.raises(EvalError, match="fewer than one batch"):
        evaluate_lds(run_copy, lds_cfg(fraction=0.1), tiny_train)

    # another copy of the run, the same seed, two worker processes: identical subsets and results
    other = tmp_path_factory.mktemp("again") / "run"  # same depth: relative image paths hold
    shutil.copytree(run_copy, other, ignore=shutil.ignore_patterns("eval"))
    again = evaluate_lds(other, lds_cfg(workers=2), tiny_train)
    np.testing.assert_array_equal(load_npy(other / "eval" / "lds" / "outputs.npy"), outputs3)
    np.testing.assert_array_equal(
        load_npy(other / "eval" / "lds" / "subsets.npy"),
        evalstats.subset_masks(240, 3, 0.5, 0),
    )
    assert again["methods"] == first["methods"]


# --- removal -----------------------------------------------------------------------------------


def test_removal_retrains_without_each_targets_top_k(run_copy, tiny_train, checkpoints, tensors):
    val = read_jsonl(run_copy / "val.jsonl")
    train_ids = [r["id"] for r in read_jsonl(run_copy / "train.jsonl")]
    scores = load_npy(run_copy / "scores.npy")
    cfg = RemoveConfig(targets=[val[5]["id"]], ks=[5], methods=["trak", "random"])
    result = evaluate_removal(run_copy, replace(cfg, workers=1), tiny_train)
    assert result["timings"]["models_trained"] == 1 + 2  # the full-data model + 2 removals
    cache = run_copy / "eval" / "remove" / "outputs"
    j = 5
    entry = result["targets"][val[j]["id"]]
    top = np.argsort(-scores[:, j], kind="stable")[:5]
    trak = entry["removed"]["trak"]["5"]
    assert trak["removed_ids"] == [train_ids[i] for i in top]
    assert trak["trak_score_sum"] == pytest.approx(float(scores[top, j].sum()), rel=1e-5)
    assert trak["delta"] == pytest.approx(trak["margin"] - entry["margin_full"])
    # the model was trained on every pair but those five
    meta = read_json(cache / f"trak-k5-v{j:05d}-r00.json")
    assert meta["rows_sha256"] == retrain.rows_digest(np.setdiff1d(np.arange(240), top))
    assert meta["seed"] == tiny_train.seed  # the seed of the run's member 0
    assert len(set(entry["removed"]["random"]["5"]["removed_ids"])) == 5
    # the full-data model is the run's trainer with member 0's seed: it reproduces checkpoint 0
    # (trained on two threads, retrained on one: float sums differ, the model barely)
    full = load_npy(cache / "full-r00.npy")
    draws = retrain.target_draws(240, 256, 0, 2)
    member0 = load_into(create("trakview-tiny").model, checkpoints[0])
    own = retrain.model_output(member0, *tensors["train"], *tensors["val"], draws)
    assert np.corrcoef(full, own)[0, 1] > 0.99
    summary = {(r["method"], r["k"]): r for r in result["summary"]}
    assert summary[("trak", 5)]["targets"] == 1 and "this_minus_trak" in summary[("random", 5)]

    # a second call for another target keeps the first one and trains only what is new
    more = evaluate_removal(
        run_copy, replace(cfg, targets=[val[7]["id"]], methods=["trak"], workers=1), tiny_train
    )
    assert more["timings"]["models_trained"] == 1
    assert set(more["targets"]) == {val[5]["id"], val[7]["id"]}


# --- command line --------------------------------------------------------------------------------


def test_cli_lds_and_remove(run_copy):
    runner = CliRunner()
    lds = runner.invoke(
        app,
        ["eval", "lds", str(run_copy), "--subsets", "3", "--models-per-subset", "2"]
        + ["--bootstrap", "50", "--workers", "1", "--methods", "trak,random", *TRAIN_FLAGS],
    )
    assert lds.exit_code == 0, lds.output
    result = read_lds(run_copy)
    per_model = [
        [load_npy(run_copy / f"eval/lds/outputs/s{s:05d}-r{r:02d}.npy") for s in range(3)]
        for r in range(2)
    ]
    np.testing.assert_allclose(
        load_npy(run_copy / "eval/lds/outputs.npy"), np.mean(per_model, axis=0), rtol=1e-6
    )
    agreement = evalstats.spearman_columns(np.array(per_model[0]), np.array(per_model[1]))
    assert result["split_half_reliability"] == pytest.approx(float(np.nanmean(agreement)))
    assert "retraining with trakview-tiny: 4 epochs" in lds.output
    assert "trak " in lds.output and "random" in lds.output and "eval/lds.json" in lds.output
    val = read_jsonl(run_copy / "val.jsonl")
    remove = runner.invoke(
        app,
        ["eval", "remove", str(run_copy), "--val", f"{val[1]['id']},{val[1]['id']}", "-k", "3"]
        + ["--methods", "trak", "--workers", "1", *TRAIN_FLAGS],
    )
    assert remove.exit_code == 0, remove.output
    assert val[1]["id"] in remove.output and "k=3" in remove.output
    bad = runner.invoke(app, ["eval", "remove", str(run_copy), "--val", "nope", *TRAIN_FLAGS])
    assert isinstance(bad.exception, EvalError)
    assert "unknown validation id(s) ['nope']" in str(bad.exception)
    for command in ("lds", "remove"):
        help_ = runner.invoke(app, ["eval", command, "--help"], env={"COLUMNS": "200"})
        assert help_.exit_code == 0 and "[default:" in help_.output


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with retrain.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
