"""The attribution build against an independent numpy evaluation of the TRAK formula, and its
determinism, resumability and refusal of mismatched settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from trak import TRAKer

from engine.assemble.orchestrate import build
from engine.attribution.gradients import select_parameters
from engine.attribution.margin import SimulatedBatch
from engine.attribution.projection import KeyedProjector
from engine.attribution.settings import BuildConfig, resolve
from engine.errors import RunMismatchError
from engine.evaluate import groundtruth
from engine.files import read_jsonl
from engine.models.checkpoints import load_into
from engine.models.factory import create
from engine.run.layout import FORMAT_VERSION, RunLayout


def _mmap(run, m, name):
    return np.load(RunLayout(run).trak_dir / str(m) / f"{name}.mmap").astype(np.float64)


def test_run_directory_layout(run_dir, pairs):
    train, val = pairs
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["counts"] == {
        "n_train": len(train),
        "n_val": len(val),
        "n_checkpoints": 2,
        "proj_dim": 64,
        "ensemble_embedding_dim": 128,
    }
    assert manifest["config"]["grad_params"] == "no-token-embedding"  # the CPU default
    assert all(len(c["sha256"]) == 64 for c in manifest["checkpoints"])
    assert {"featurize-0", "score-1", "scores"} <= set(manifest["timings_seconds"])
    scores = np.load(run_dir / "scores.npy")
    assert scores.dtype == np.float32 and scores.shape == (len(train), len(val))
    rows = read_jsonl(run_dir / "train.jsonl")
    assert [r["id"] for r in rows] == train.ids
    assert all((run_dir / r["image"]).is_file() for r in rows)  # paths relative to the run
    assert {"mislabeled", "true_caption", "near_duplicate_of", "rare"} <= set(rows[0])
    pos, neg = np.load(run_dir / "topk_pos.npy"), np.load(run_dir / "topk_neg.npy")
    assert pos.shape == neg.shape == (len(val), 20)
    np.testing.assert_array_equal(pos[3], np.argsort(-scores[:, 3], kind="stable")[:20])
    np.testing.assert_array_equal(neg[3], np.argsort(scores[:, 3], kind="stable")[:20])


def test_features_and_scores_equal_the_trak_formula_in_numpy(run_dir):
    """phi_m = X_m (X_m^T X_m + lambda_m I)^-1; scores = mean_m(phi_m T_m^T) * mean_m(Q_m)."""
    n_models = 2
    total, out_to_loss = 0.0, 0.0
    for m in range(n_models):
        x = _mmap(run_dir, m, "grads")  # (n_train, k)
        lam = RunLayout(run_dir).read_stage(f"finalize-{m}")["lambda"]
        phi = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T).T  # (n_train, k)
        np.testing.assert_allclose(_mmap(run_dir, m, "features"), phi, rtol=2e-3, atol=1e-6)
        total = total + phi @ _mmap(run_dir, m, "val_grads").T  # (n_train, n_val)
        out_to_loss = out_to_loss + _mmap(run_dir, m, "out_to_loss")  # (n_train, 1)
    expected = total / n_models * (out_to_loss / n_models)
    scores = np.load(run_dir / "scores.npy")
    np.testing.assert_allclose(scores, expected, rtol=2e-3, atol=1e-6 * np.abs(expected).max())


def test_stored_gradient_is_autograd_times_projection(run_dir, tensors, checkpoints):
    """Row i of traker's stored gradients = d margin_i / d theta . P / sqrt(#params)."""
    cfg = json.loads((run_dir / "manifest.json").read_text())["config"]
    model = load_into(create("trakview-tiny").model, checkpoints[1])
    names = select_parameters(model, cfg["grad_params"])
    params = dict(model.named_parameters())
    projector = KeyedProjector(
        {n: tuple(params[n].shape) for n in names}, None, cfg["proj_dim"], seed=cfg["seed"]
    )
    images, tokens = tensors["train"]
    img_emb = torch.from_numpy(np.load(run_dir / "embeddings" / "train_image_1.npy"))
    txt_emb = torch.from_numpy(np.load(run_dir / "embeddings" / "train_text_1.npy"))
    i = 37
    batch_idx = SimulatedBatch(len(images), cfg["sim_batch_size"], cfg["seed"]).for_train([i], 1)[0]
    img, txt, _ = model(images[i : i + 1], tokens[i : i + 1])
    s_ii = (img * txt).sum()
    margin = -torch.logsumexp((img @ txt_emb[batch_idx].T)[0] - s_ii, 0) - torch.logsumexp(
        (txt @ img_emb[batch_idx].T)[0] - s_ii, 0
    )
    margin.backward()
    expected = sum(
        params[n].grad.reshape(-1).double() @ projector.dense_block(n).double()
        for n in names
        if params[n].grad is not None
    ) / math.sqrt(sum(params[n].numel() for n in names))
    stored = _mmap(run_dir, 1, "grads")[i]
    np.testing.assert_allclose(
        stored, expected.numpy(), rtol=1e-3, atol=1e-4 * np.abs(stored).max()
    )


def test_same_build_twice_gives_identical_scores(tmp_path, pairs, checkpoints, run_dir):
    cfg = BuildConfig(checkpoints=[str(p) for p in checkpoints], topk=20, projector="gaussian")
    again = build(*pairs, cfg, tmp_path / "again")
    assert np.array_equal(np.load(again / "scores.npy"), np.load(run_dir / "scores.npy"))


def test_build_killed_mid_featurize_resumes_to_the_same_scores(
    tmp_path, pairs, sharded_config, sharded_run, monkeypatch, one_thread
):
    """Killed in checkpoint 1's featurization (3 units of two batches each), in the middle of
    its second unit, the build resumes with the units that had not finished, and nothing else, to
    the uninterrupted build's scores."""
    original = TRAKer.featurize
    calls = {"n": 0}

    def dying_featurize(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # checkpoint 1, after 2 of its 6 batches: inside its second unit
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TRAKer, "featurize", dying_featurize)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(*pairs, sharded_config, out)
    assert RunLayout(out).stage_done("featurize-0") and not RunLayout(out).stage_done("featurize-1")
    assert not (out / "manifest.json").exists()
    done = [RunLayout(out).unit_done(f"featurize-1-{s:05d}") for s in range(3)]
    assert done == [True, False, False]  # really stopped in checkpoint 1

    calls["n"] = -(10**6)  # the restarted build is not killed
    build(*pairs, sharded_config, out)
    assert calls["n"] == -(10**6) + 4  # only the 2 unfinished units' 4 batches, once each
    assert np.array_equal(np.load(out / "scores.npy"), np.load(sharded_run / "scores.npy"))


def test_reopening_with_other_settings_is_refused(tmp_path, pairs, checkpoints):
    out = tmp_path / "run"
    base = BuildConfig(checkpoints=[str(checkpoints[0])], topk=5)
    build(*pairs, base, out)
    other = BuildConfig(checkpoints=[str(checkpoints[0])], topk=5, proj_dim=32)
    with pytest.raises(RunMismatchError, match=r"proj_dim: 64 -> 32.*--overwrite"):
        build(*pairs, other, out)
    build(*pairs, other, out, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["counts"]["proj_dim"] == 32


def test_bad_settings_are_clear_errors(pairs, checkpoints):
    with pytest.raises(ValueError, match="--half needs --device cuda"):
        resolve(BuildConfig(checkpoints=["x"], half=True), 100)
    with pytest.raises(ValueError, match="no checkpoints given"):
        resolve(BuildConfig(), 100)
    assert resolve(BuildConfig(checkpoints=["x"]), 3000).proj_dim == 512
    assert resolve(BuildConfig(checkpoints=["x"]), 100).proj_dim == 64
    with pytest.raises(ValueError, match="--projector must be one of gaussian, gaussian-bf16"):
        resolve(BuildConfig(checkpoints=["x"], projector="fp8"), 100)
    assert resolve(BuildConfig(checkpoints=["x"]), 100).projector == "sketch"


def test_small_world_ground_truth(run_dir):
    """Even the tiny test ensemble (240 pairs, 4 epochs) finds the planted near-duplicates. The
    mislabeled ranking needs models that learned colours and shapes: it is checked on the default
    demo world in bench/bench_attribution.py."""
    scores = np.load(run_dir / "scores.npy")
    train = read_jsonl(run_dir / "train.jsonl")
    val = read_jsonl(run_dir / "val.jsonl")
    hits = groundtruth.near_duplicate_hits(scores, train, val, k=5)
    assert hits["n"] == 4 and hits["rate"] >= 0.75


def test_roc_auc_matches_a_hand_computed_case():
    # positives at 0.9 and 0.4, negatives at 0.5, 0.4, 0.1: pairs won 2 + (0.5 + 1 + 1) = 4.5 of 6
    auc = groundtruth.roc_auc(np.array([0.9, 0.4, 0.5, 0.4, 0.1]), np.array([1, 1, 0, 0, 0]))
    assert auc == pytest.approx(4.5 / 6)


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Median per-pair Pearson correlation and mean top-5 overlap of two score matrices."""
    corr = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]
    top5 = [
        len(set(np.argsort(-a[:, j])[:5]) & set(np.argsort(-b[:, j])[:5]))
        for j in range(a.shape[1])
    ]
    return float(np.median(corr)), float(np.mean(top5))


def test_bfloat16_gaussian_keeps_the_scores(tmp_path, pairs, checkpoints, run_dir):
    """The same Gaussian matrix multiplied in bfloat16: nearly identical scores."""
    cfg = BuildConfig(checkpoints=[str(p) for p in checkpoints], topk=20, projector="gaussian-bf16")
    fast = np.load(build(*pairs, cfg, tmp_path / "bf16") / "scores.npy")
    exact = np.load(run_dir / "scores.npy")
    assert not np.array_equal(fast, exact)  # it really ran in bfloat16
    corr, top5 = _agreement(fast, exact)
    assert corr > 0.999 and top5 >= 4.5


def test_sketch_agrees_with_the_gaussian_as_well_as_another_gaussian_draw(
    tmp_path, pairs, checkpoints, run_dir
):
    """The count-sketch projector is another random JL map: it must agree with the reference
    Gaussian (seed 0) at least as well as a Gaussian of another seed does."""
    ckpts = [str(p) for p in checkpoints]
    sketch = build(
        *pairs,
        BuildConfig(checkpoints=ckpts, topk=20, projector="sketch"),
        tmp_path / "s",
    )
    other = build(
        *pairs,
        BuildConfig(checkpoints=ckpts, topk=20, seed=1, projector="gaussian"),
        tmp_path / "g1",
    )
    exact = np.load(run_dir / "scores.npy")
    corr_s, top5_s = _agreement(np.load(sketch / "scores.npy"), exact)
    corr_g, top5_g = _agreement(np.load(other / "scores.npy"), exact)
    assert corr_s >= corr_g - 0.05 and top5_s >= top5_g - 0.5
