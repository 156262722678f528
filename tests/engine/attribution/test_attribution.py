"""traker extension points checked against plain autograd and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.attribution.gradients import (
    CheckpointStack,
    SelectiveGradientComputer,
    select_parameters,
)
from engine.attribution.margin import ClipMargin, SimulatedBatch
from engine.attribution.projection import KeyedProjector
from engine.attribution.scoring import RegularizedScoreComputer
from engine.models.checkpoints import load_into
from engine.models.factory import create


def test_simulated_batch_is_seeded_uniform_and_excludes_the_pair():
    sim = SimulatedBatch(n_train=50, size=10, seed=4)
    rows = sim.for_train(range(50), model_id=0)  # (50, 10)
    assert rows.shape == (50, 10)
    for i, row in enumerate(rows.tolist()):
        assert i not in row and len(set(row)) == 10
    # independent of batching and repeatable
    assert torch.equal(sim.for_train([7, 3], 0), rows[[7, 3]])
    assert torch.equal(SimulatedBatch(50, 10, seed=4).for_train(range(50), 0), rows)
    assert not torch.equal(sim.for_train(range(50), model_id=1), rows)
    # uniform: pair 0 is drawn (traker's multinomial(arange(N)) never draws it) and early and
    # late pairs are drawn about equally often
    counts = np.bincount(
        SimulatedBatch(500, 50, seed=0).for_train(range(500), 0).ravel(), minlength=500
    )
    assert counts[0] > 0
    assert 0.8 < counts[:50].sum() / counts[-50:].sum() < 1.25
    targets = sim.for_targets(3, 0)
    assert targets.shape == (3, 10) and torch.equal(targets[0], targets[2])


def test_simulated_batch_is_capped_by_the_training_set():
    assert SimulatedBatch(n_train=8, size=300).size == 7
    with pytest.raises(ValueError, match="at least 2 training pairs"):
        SimulatedBatch(n_train=1, size=3)


def test_select_parameters():
    model = create("trakview-tiny").model
    names = [n for n, _ in model.named_parameters()]
    assert select_parameters(model, "all") == names
    no_tok = select_parameters(model, "no-token-embedding")
    assert "token_embedding.weight" not in no_tok and len(no_tok) == len(names) - 1
    assert all(n.startswith("visual.") for n in select_parameters(model, "visual"))
    assert select_parameters(model, "text_projection,ln_final") == [
        "text_projection",
        "ln_final.weight",
        "ln_final.bias",
    ]
    with pytest.raises(ValueError, match=r"prefixes \['nope'\] match no parameter"):
        select_parameters(model, "nope")


def _margin_by_autograd(model, image, text, sim_image, sim_text):
    img, txt, _ = model(image[None], text[None])
    s_ii = (img * txt).sum()
    return -torch.logsumexp((img @ sim_text.T).squeeze(0) - s_ii, 0) - torch.logsumexp(
        (txt @ sim_image.T).squeeze(0) - s_ii, 0
    )


@pytest.mark.parametrize("grad_params", ["all", "no-token-embedding"])
def test_projected_gradient_equals_autograd_times_projection(tensors, checkpoints, grad_params):
    model = load_into(create("trakview-tiny").model, checkpoints[0])
    images, tokens = tensors["train"]
    with torch.no_grad():
        img_emb, txt_emb, _ = model(images, tokens)
    task = ClipMargin()
    task.set_embeddings(img_emb, txt_emb)
    names = select_parameters(model, grad_params)
    computer = SelectiveGradientComputer(model, task, 0, torch.float32, "cpu", grad_wrt=names)
    params = dict(model.named_parameters())
    projector = KeyedProjector(
        {n: tuple(params[n].shape) for n in names}, computer.token_name, proj_dim=64, seed=1
    )
    sim = SimulatedBatch(len(images), 30, seed=0)
    idx = [5, 11, 17]
    batch = (images[idx], tokens[idx], sim.for_train(idx, 0))
    projected = projector.project(computer.compute_per_sample_grad(batch), model_id=0)  # (3, 64)

    for b, i in enumerate(idx):
        model.zero_grad()
        rows = batch[2][b]
        _margin_by_autograd(model, images[i], tokens[i], img_emb[rows], txt_emb[rows]).backward()
        expected = torch.zeros(64, dtype=torch.float64)
        for name in names:
            grad = params[name].grad
            if grad is None:
                continue
            if name == computer.token_name:  # only the caption's rows are non-zero
                touched = torch.unique(tokens[i])
                assert torch.count_nonzero(grad.abs().sum(1)) <= len(touched)
                block = torch.cat([projector.token_block(int(t)) for t in touched])
                expected += (grad[touched].reshape(-1) @ block).double()
            else:
                expected += (grad.reshape(-1) @ projector.dense_block(name)).double()
        assert torch.allclose(projected[b].double(), expected, rtol=1e-4, atol=1e-5)


def test_out_to_loss_is_one_minus_the_match_probability(tensors, checkpoints):
    model = load_into(create("trakview-tiny").model, checkpoints[0])
    images, tokens = tensors["train"]
    with torch.no_grad():
        img, txt, scale = model(images, tokens)
    task = ClipMargin()
    task.set_embeddings(img, txt)
    sim_idx = SimulatedBatch(len(images), 20).for_train([0, 1, 2, 3], 0)
    weights = dict(model.named_parameters())
    out = task.get_out_to_loss_grad(
        model, weights, dict(model.named_buffers()), (images[:4], tokens[:4], sim_idx)
    )
    assert out.shape == (4, 1)  # traker's saver needs (B, 1)
    for b in range(4):
        cand_t = torch.cat([txt[b : b + 1], txt[sim_idx[b]]])  # own caption first
        cand_i = torch.cat([img[b : b + 1], img[sim_idx[b]]])
        p_row = torch.softmax(scale * img[b] @ cand_t.T, 0)[0]
        p_col = torch.softmax(scale * txt[b] @ cand_i.T, 0)[0]
        assert out[b, 0].item() == pytest.approx(1 - (p_row + p_col).item() / 2, abs=1e-5)


def test_score_computer_regularises_a_rank_deficient_xtx(caplog):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(40, 64)).astype(np.float32))  # rank 40 < 64
    computer = RegularizedScoreComputer(torch.float32, "cpu", lambda_reg=None, lambda_rel=1e-3)
    xtx = computer.get_xtx(x)
    feats = computer.get_x_xtx_inv(x, xtx)
    diag = computer.diagnostics[-1]
    assert diag["rank"] == 40 and diag["lambda"] > 0
    xd = x.double().numpy()
    expected = xd @ np.linalg.inv(xd.T @ xd + diag["lambda"] * np.eye(64))
    np.testing.assert_allclose(feats.numpy(), expected, rtol=1e-3, atol=1e-5)
    with caplog.at_level("WARNING"):
        RegularizedScoreComputer(torch.float32, "cpu", lambda_reg=0.0).get_x_xtx_inv(
            x, xtx + 1e-9 * torch.eye(64, dtype=torch.float64)
        )
    assert "badly conditioned (rank 40 of 64 over 40 training pairs" in caplog.text


@pytest.mark.parametrize("grad_params", ["all", "no-token-embedding"])
def test_checkpoint_stack_equals_each_checkpoint_alone(tensors, checkpoints, grad_params):
    """One pair's gradients at every checkpoint in one vmap equal each checkpoint's own, the
    token embedding's looked-up rows included."""
    images, tokens = tensors["train"]
    computers, sims = [], []
    for m, path in enumerate(checkpoints):
        model = load_into(create("trakview-tiny").model, path)
        with torch.no_grad():
            img_emb, txt_emb, _ = model(images, tokens)
        task = ClipMargin()
        task.set_embeddings(img_emb, txt_emb)
        names = select_parameters(model, grad_params)
        computers.append(
            SelectiveGradientComputer(model, task, 0, torch.float32, "cpu", grad_wrt=names)
        )
        sims.append(
            task.batch_embeddings(SimulatedBatch(len(images), 30, seed=0).for_targets(1, m))
        )
    stack = CheckpointStack(computers)
    x, t = images[9], tokens[9]
    got = stack.margin_grads(x, t, torch.cat([s[0] for s in sims]), torch.cat([s[1] for s in sims]))
    img, txt = stack.embeddings(x, t)
    for m, computer in enumerate(computers):
        sim_idx = SimulatedBatch(len(images), 30, seed=0).for_targets(1, m)
        alone = computer.compute_per_sample_grad((x[None], t[None], sim_idx))
        for name, g in alone["dense"].items():
            torch.testing.assert_close(got["dense"][name][m], g[0], rtol=1e-4, atol=1e-6)
        if grad_params == "all":
            torch.testing.assert_close(got["token"][m], alone["token"][0], rtol=1e-4, atol=1e-6)
        else:
            assert got["token"] is None and alone["token"] is None
        with torch.no_grad():
            ref_img, ref_txt, _ = computer.model(x[None], t[None])
        torch.testing.assert_close(img[m], ref_img[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(txt[m], ref_txt[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["ids"], t.expand(len(computers), -1))
