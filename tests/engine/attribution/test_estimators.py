"""The estimators of ``--estimator`` and ``--output``: the block-diagonal (per-module) solve
against the joint one, the loss output against cross-entropy, and whole builds on the small world:
deterministic, resumable, recorded, and reproduced by a new query."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.assemble.orchestrate import build
from engine.attribution.margin import ClipLoss, ClipMargin
from engine.attribution.projection import module_groups, module_of
from engine.attribution.scoring import RegularizedScoreComputer
from engine.attribution.settings import BuildConfig, resolve
from engine.data.images import open_image
from engine.errors import ConfigError
from engine.explore.query import QueryEngine
from engine.files import read_jsonl
from engine.models.factory import create
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest, summary


def _features(x: torch.Tensor, blocks=None, lambda_rel=1e-3) -> torch.Tensor:
    scorer = RegularizedScoreComputer(torch.float32, "cpu", lambda_rel=lambda_rel, blocks=blocks)
    return scorer.get_x_xtx_inv(x, scorer.get_xtx(x))


def test_one_module_is_the_joint_solve():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(_features(x, [16]), _features(x), rtol=1e-5, atol=1e-7)


def test_each_module_is_solved_alone():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 20, generator=g)
    x[:, 12:] += 0.5 * x[:, :8]  # modules that covary: the joint solve would mix them
    blocked = _features(x, [12, 8], lambda_rel=0.01)
    np.testing.assert_allclose(blocked[:, :12], _features(x[:, :12], lambda_rel=0.01), rtol=1e-5)
    np.testing.assert_allclose(blocked[:, 12:], _features(x[:, 12:], lambda_rel=0.01), rtol=1e-5)
    assert not np.allclose(blocked, _features(x, lambda_rel=0.01), rtol=1e-3)
    # the packed diagonal blocks are each X_b^T X_b
    scorer = RegularizedScoreComputer(torch.float32, "cpu", blocks=[12, 8])
    packed = scorer.get_xtx(x).numpy()
    xd = x.double().numpy()
    np.testing.assert_allclose(packed[:144].reshape(12, 12), xd[:, :12].T @ xd[:, :12], rtol=1e-9)
    np.testing.assert_allclose(packed[144:].reshape(8, 8), xd[:, 12:].T @ xd[:, 12:], rtol=1e-9)


def test_a_module_the_output_ignores_gets_zero_features():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    x[:, 4:] = 0
    feats = _features(x, [4, 2])
    assert torch.all(feats[:, 4:] == 0) and torch.isfinite(feats).all()


def test_modules_are_named_by_their_owner():
    assert module_of("visual.transformer.resblocks.0.attn.in_proj_weight") == (
        "visual.transformer.resblocks.0.attn.in_proj"
    )
    assert module_of("visual.transformer.resblocks.0.attn.in_proj_bias@kron") == (
        "visual.transformer.resblocks.0.attn.in_proj"
    )
    assert module_of("visual.transformer.resblocks.0.mlp.c_fc.weight@kron") == (
        "visual.transformer.resblocks.0.mlp.c_fc"
    )
    assert module_of("logit_scale") == "logit_scale" and module_of("text_projection") == (
        "text_projection"
    )
    model = create("trakview-tiny").model
    groups = module_groups([n for n, _ in model.named_parameters()])
    assert groups["ln_final"] == ["ln_final.weight", "ln_final.bias"]
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))


def test_loss_output_is_minus_the_pairs_cross_entropy():
    bundle = create("trakview-tiny")
    model = bundle.model.eval()
    g = torch.Generator().manual_seed(3)
    image = torch.randn(3, 32, 32, generator=g)
    text = bundle.tokenizer(["a small red circle"])[0]
    sim_image = F.normalize(torch.randn(5, 64, generator=g), dim=-1)
    sim_text = F.normalize(torch.randn(5, 64, generator=g), dim=-1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    with torch.no_grad():
        out = ClipLoss().get_output(model, params, buffers, image, text, sim_image, sim_text)
        img, txt, scale = model(image[None], text[None])[:3]
    row = torch.cat([img @ txt.T, img @ sim_text.T], 1) * scale  # (1, 6), own caption first
    col = torch.cat([txt @ img.T, txt @ sim_image.T], 1) * scale
    want = -(F.cross_entropy(row, torch.tensor([0])) + F.cross_entropy(col, torch.tensor([0]))) / 2
    assert float(out) == pytest.approx(float(want), rel=1e-5)
    ones = ClipLoss().out_to_loss(img, txt, scale, torch.zeros(1, 5, dtype=torch.long))
    assert ones.tolist() == [[1.0]]
    assert float(
        ClipMargin().get_output(model, params, buffers, image, text, sim_image, sim_text)
    ) != float(out)


def test_settings_are_checked():
    cfg = BuildConfig(checkpoints=["x.pt"])
    assert resolve(BuildConfig(checkpoints=["x.pt"], estimator="modules"), 1000).module_dim == 256
    with pytest.raises(ConfigError, match="--estimator must be one of trak, modules, got 'ekf'"):
        resolve(BuildConfig(checkpoints=["x.pt"], estimator="ekf"), 1000)
    with pytest.raises(ConfigError, match="--output must be one of margin, loss"):
        resolve(BuildConfig(checkpoints=["x.pt"], output="logits"), 1000)
    with pytest.raises(ConfigError, match="--module-dim is the dimensions per module"):
        resolve(BuildConfig(checkpoints=["x.pt"], module_dim=64), 1000)
    assert resolve(cfg, 1000).estimator == "trak" and resolve(cfg, 1000).module_dim == 0


@pytest.fixture(scope="module")
def module_run(tmp_path_factory, pairs, checkpoints):
    out = tmp_path_factory.mktemp("modules") / "run"
    cfg = BuildConfig(
        checkpoints=[str(p) for p in checkpoints],
        estimator="modules",
        output="loss",
        module_dim=24,
        topk=20,
    )
    return build(*pairs, cfg, out), cfg


def test_modules_run_is_deterministic_resumable_recorded_and_queried(module_run, pairs, tmp_path):
    run, cfg = module_run
    scores = np.load(run / "scores.npy")
    again = build(*pairs, cfg, tmp_path / "again")
    np.testing.assert_array_equal(np.load(again / "scores.npy"), scores)
    # resumable: the features and scores of a stopped build are computed again, the same
    layout = RunLayout(again)
    for marker in layout.units_dir.glob("*.json"):
        if marker.name.startswith(("features-1", "scores-", "gather-scores", "gather-trak-1")):
            marker.unlink()
    layout.manifest.unlink()
    np.testing.assert_array_equal(np.load(build(*pairs, cfg, again) / "scores.npy"), scores)
    manifest = open_manifest(run)
    assert manifest.config.estimator == "modules" and manifest.config.output == "loss"
    assert "estimator    modules (24 dimensions per module), training output loss" in summary(
        manifest
    )
    k = manifest.counts.proj_dim
    assert np.load(RunLayout(run).trak_features(0), mmap_mode="r").shape[1] == k
    assert np.load(RunLayout(run).trak_xtx(0)).ndim == 1  # the diagonal blocks, packed
    assert (np.load(RunLayout(run).trak_out_to_loss(0)) == 1).all()  # the loss carries it
    # a new query of a validation pair's own image and caption reproduces its stored scores
    engine = QueryEngine.load(run)
    for j in (0, 7):
        rec = engine.val[j]
        got = engine.query(open_image(str(run / rec["image"])), rec["caption"], k=3).scores
        np.testing.assert_allclose(
            got, scores[:, j], rtol=1e-3, atol=1e-5 * abs(scores[:, j]).max()
        )


def test_modules_scores_find_the_planted_near_duplicates(module_run, run_dir):
    """Not TRAK's scores, and like them: each validation pair's planted near-duplicate is among
    its top-5 helpers."""
    run, _ = module_run
    modules = np.load(run / "scores.npy")
    assert not np.allclose(np.load(run_dir / "scores.npy"), modules)
    train, val = read_jsonl(run / "train.jsonl"), read_jsonl(run / "val.jsonl")
    index = {r["id"]: j for j, r in enumerate(val)}
    copies = [
        (i, index[r["near_duplicate_of"]]) for i, r in enumerate(train) if r["near_duplicate_of"]
    ]
    assert len(copies) == 4
    for i, j in copies:
        assert i in np.argsort(-modules[:, j], kind="stable")[:5], (i, j)
