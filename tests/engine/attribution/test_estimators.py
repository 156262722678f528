"""The estimators of ``--estimator``, ``--output`` and ``--normalize``: the block-diagonal
(per-module) solve against the joint one, the loss output against cross-entropy, unit
normalisation against the whitened gradient's length, and whole builds on the small world:
deterministic, resumable, recorded, and reproduced by a new query."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.assemble.orchestrate import build
from engine.attribution.margin import ClipBatchLoss, ClipLoss, ClipMargin
from engine.attribution.projection import module_groups, module_of
from engine.attribution.scoring import RegularizedScoreComputer
from engine.attribution.settings import BuildConfig, estimator_label, resolve
from engine.data.images import open_image
from engine.errors import ConfigError
from engine.explore.query import QueryEngine
from engine.files import read_jsonl
from engine.models.factory import create
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest, summary


def _features(x: torch.Tensor, blocks=None, lambda_rel=1e-3, normalize="none") -> torch.Tensor:
    scorer = RegularizedScoreComputer(
        torch.float32, "cpu", lambda_rel=lambda_rel, blocks=blocks, normalize=normalize
    )
    return scorer.get_x_xtx_inv(x, scorer.get_xtx(x))


def test_unit_normalisation_divides_by_the_whitened_gradients_length():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 12, generator=g) * torch.linspace(0.1, 5, 400)[:, None]  # lengths vary
    x[5] = 0  # a pair whose gradient is zero keeps zero features
    plain = _features(x, lambda_rel=0.01).double()
    unit = _features(x, lambda_rel=0.01, normalize="unit").double()
    xd = x.double()
    r = xd.T @ xd + 0.01 * torch.trace(xd.T @ xd) / 12 * torch.eye(12, dtype=torch.float64)
    whitened = (xd * torch.linalg.solve(r, xd.T).T).sum(1).sqrt()  # |R^-1/2 x_i|
    keep = whitened > 0
    np.testing.assert_allclose(unit[keep], plain[keep] / whitened[keep, None], rtol=1e-4)
    assert torch.all(unit[5] == 0) and torch.isfinite(unit).all()
    # every training pair's whitened features have length 1: phi^T R phi = 1
    np.testing.assert_allclose(((unit @ r) * unit).sum(1)[keep], 1.0, rtol=1e-4)
    # a target's ranking changes: the long gradients no longer lead it
    target = torch.randn(12, generator=g).double()
    top_plain = torch.argsort(-(plain @ target))[:20]
    top_unit = torch.argsort(-(unit @ target))[:20]
    assert top_plain.float().mean() > top_unit.float().mean() + 50
    # per module: each block solved alone, then one length over every block
    blocked = _features(x, [8, 4], lambda_rel=0.01, normalize="unit").double()
    raw = _features(x, [8, 4], lambda_rel=0.01).double()
    length = (xd * raw).sum(1).sqrt()
    np.testing.assert_allclose(blocked[keep], raw[keep] / length[keep, None], rtol=1e-4)


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


def _one_pair(seed: int, batch: int, grad: bool = False) -> tuple:
    """The tiny model (eval), its parameters and buffers, one image and caption, and a simulated
    batch of ``batch`` unit image and text embeddings."""
    bundle = create("trakview-tiny")
    model = bundle.model.eval()
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, 32, 32, generator=g)
    text = bundle.tokenizer(["a small red circle"])[0]
    sim_image = F.normalize(torch.randn(batch, 64, generator=g), dim=-1)
    sim_text = F.normalize(torch.randn(batch, 64, generator=g), dim=-1)
    params = {n: p.detach().requires_grad_(grad) for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    return model, params, buffers, image, text, sim_image, sim_text


def test_loss_output_is_minus_the_pairs_cross_entropy():
    model, params, buffers, image, text, sim_image, sim_text = _one_pair(3, 5)
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


def test_batch_loss_gradient_is_the_batch_losss_gradient_through_the_pair():
    """``--output batch-loss``: its gradient is that of the whole contrastive loss (open_clip's,
    times 2 x the batch size) of a batch made of the pair and its simulated batch, the other
    pairs' embeddings held fixed; the loss output's is only the pair's own term."""
    inputs = _one_pair(4, 6, grad=True)
    model, params, buffers, image, text, sim_image, sim_text = inputs
    names = ["visual.proj", "text_projection"]

    def grads(out: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad(out, [params[n] for n in names])

    got = grads(ClipBatchLoss().get_output(*inputs))
    own = grads(ClipLoss().get_output(*inputs))
    img, txt, scale = torch.func.functional_call(
        model, (params, buffers), (image[None], text[None])
    )
    images = torch.cat([img, sim_image])  # (7, d): the pair first, then its batch
    texts = torch.cat([txt, sim_text])
    logits = scale.detach() * images @ texts.T  # the batch's own terms: constants
    logits[0] = scale * (img @ texts.T)[0]
    logits[:, 0] = scale * (images @ txt.T)[:, 0]
    labels = torch.arange(7)
    batch = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    want = grads(-batch * 7)
    for a, b, c in zip(got, want, own, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
        assert not np.allclose(a.numpy(), c.numpy(), rtol=1e-2)


def test_settings_are_checked():
    cfg = BuildConfig(checkpoints=["x.pt"])
    assert resolve(BuildConfig(checkpoints=["x.pt"], estimator="modules"), 1000).module_dim == 256
    with pytest.raises(ConfigError, match="--estimator must be one of trak, modules, got 'ekf'"):
        resolve(BuildConfig(checkpoints=["x.pt"], estimator="ekf"), 1000)
    with pytest.raises(ConfigError, match="--output must be one of margin, loss"):
        resolve(BuildConfig(checkpoints=["x.pt"], output="logits"), 1000)
    with pytest.raises(ConfigError, match="--normalize must be one of none, unit, got 'l2'"):
        resolve(BuildConfig(checkpoints=["x.pt"], normalize="l2"), 1000)
    with pytest.raises(ConfigError, match="--module-dim is the dimensions per module"):
        resolve(BuildConfig(checkpoints=["x.pt"], module_dim=64), 1000)
    assert resolve(cfg, 1000).estimator == "trak" and resolve(cfg, 1000).module_dim == 0


@pytest.fixture(scope="module")
def module_run(tmp_path_factory, pairs, checkpoints):
    out = tmp_path_factory.mktemp("modules") / "run"
    cfg = BuildConfig(
        checkpoints=[str(p) for p in checkpoints],
        estimator="modules",
        output="batch-loss",
        module_dim=24,
        normalize="unit",
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
    assert manifest.config.estimator == "modules" and manifest.config.output == "batch-loss"
    assert manifest.config.normalize == "unit"
    assert (
        "estimator    modules (24 dimensions per module), training output batch-loss, "
        "unit-normalised features" in summary(manifest)
    )
    assert estimator_label(manifest.config) == (
        "modules (24 per module), output batch-loss, unit-normalised"
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
