"""``--projector factored`` (LoGra) against plain autograd and an explicit Kronecker matrix, and
its builds: deterministic, resumable, recorded, and reproduced by the query path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trak import TRAKer

from engine.assemble.orchestrate import build
from engine.attribution.factored import (
    FactoredGradientComputer,
    block_key,
    factored_layout,
    gradient_computer_for,
    side_dim,
)
from engine.attribution.gradients import CheckpointStack, select_parameters
from engine.attribution.kronecker import Block, KroneckerFactors, TapMode
from engine.attribution.margin import ClipMargin, SimulatedBatch
from engine.attribution.projection import projector_for
from engine.attribution.settings import BuildConfig, resolve
from engine.explore.query import QueryEngine
from engine.models.checkpoints import load_into
from engine.models.factory import create
from engine.run.layout import RunLayout


def _task(n: int, d: int, seed: int) -> ClipMargin:
    gen = torch.Generator().manual_seed(seed)
    task = ClipMargin()
    task.set_embeddings(
        F.normalize(torch.randn(n, d, generator=gen), dim=1),
        F.normalize(torch.randn(n, d, generator=gen), dim=1),
    )
    return task


def _autograd(model, names, task, image, tokens, sim_idx) -> dict[str, torch.Tensor]:
    """One pair's margin gradient by plain autograd (no vmap, no taps)."""
    params = dict(model.named_parameters())
    model.zero_grad()
    sim_image, sim_text = task.batch_embeddings(sim_idx)
    img, txt, _ = model(image[None], tokens[None])
    s_ii = (img * txt).sum()
    margin = -torch.logsumexp((img @ sim_text.T)[0] - s_ii, 0)
    margin = margin - torch.logsumexp((txt @ sim_image.T)[0] - s_ii, 0)
    margin.backward()
    grads = {  # logit_scale is not in the margin: no gradient
        n: torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad.clone()
        for n in names
    }
    model.zero_grad()
    return grads


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory) -> list[str]:
    """Two randomly initialised trakview-tiny checkpoints (the projection does not need
    trained ones; the session's trained ensemble would cost this file its training)."""
    folder = tmp_path_factory.mktemp("random-ckpts")
    paths = []
    for seed in (0, 1):
        path = folder / f"m{seed}.pt"
        torch.save(create("trakview-tiny", seed=seed).model.state_dict(), path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def tiny(random_checkpoints):
    return load_into(create("trakview-tiny").model, random_checkpoints[0]).eval()


def test_layout_factors_every_matrix_weight_of_a_vit_clip(tiny):
    names = select_parameters(tiny, "all")
    blocks = factored_layout(tiny, names, proj_dim=64)
    k = side_dim(64)
    assert k == 16 and side_dim(512) == 48 and side_dim(2048) == 96
    for tower in ("visual.transformer", "transformer"):
        for i in range(2):
            for w in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight"):
                assert f"{tower}.resblocks.{i}.{w}" in blocks
    assert {"visual.conv1.weight", "visual.proj", "text_projection"} <= set(blocks)
    assert "token_embedding.weight" in blocks  # a linear layer over one-hot rows
    assert len(blocks) == 20
    no_token = factored_layout(tiny, select_parameters(tiny, "no-token-embedding"), 64)
    assert set(no_token) == set(blocks) - {"token_embedding.weight"}
    # biases, norms, embeddings and the token embedding stay exact
    assert not any(n.endswith(("bias", "embedding", "scale")) or ".ln" in n for n in blocks)
    assert blocks["visual.conv1.weight"] == Block(64, 3 * 8 * 8, k, k)
    assert blocks["transformer.resblocks.0.attn.in_proj_weight"] == Block(192, 64, k, k)
    assert blocks["token_embedding.weight"] == Block(49408, 64, k, k)


class _Toy(torch.nn.Module):
    """A linear layer used twice, a grouped convolution, a transposed use, a matmul and two
    embeddings (one with a padding row)."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.image_size = 8
        self.context_length = 4
        self.fc = torch.nn.Linear(8, 8)
        self.dw = torch.nn.Conv2d(3, 3, 3, groups=3)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.tied = torch.nn.Parameter(torch.randn(8, 8))
        self.proj = torch.nn.Parameter(torch.randn(8, 2))
        self.emb = torch.nn.Embedding(10, 8)
        self.padded = torch.nn.Embedding(10, 8, padding_idx=0)  # row 0 gets no gradient

    def forward(self, image, text):
        x = self.conv(self.dw(image)).mean((2, 3)).repeat(1, 2)  # (B, 8)
        x = x + self.emb(text).mean(1) + self.padded(text).mean(1)
        x = self.fc(self.fc(x)) + x @ self.tied.T  # .T: not a weight use a tap can perturb
        return x @ self.proj, x, torch.tensor(1.0)


def test_layout_leaves_other_uses_to_the_exact_path():
    toy = _Toy()
    names = [n for n, _ in toy.named_parameters()]
    assert set(factored_layout(toy, names, 64)) == {
        "fc.weight",
        "conv.weight",
        "proj",
        "emb.weight",
    }


@pytest.mark.parametrize("grad_params", ["all", "no-token-embedding"])
def test_factored_block_is_the_kronecker_matrix_times_the_autograd_gradient(
    tiny, tensors, grad_params
):
    """For each pair: the block of every factored weight = kron(P_r, P_c) vec(grad) (LoGra),
    every other parameter's gradient and the token rows' = autograd's; and the projector maps
    the whole dict with exactly the dense blocks it reports (one linear map)."""
    names = select_parameters(tiny, grad_params)
    cfg = BuildConfig(checkpoints=["x"], proj_dim=64, projector="factored")
    make = gradient_computer_for(tiny, cfg, names)
    task = _task(60, 64, seed=1)
    computer = make(
        model=tiny, task=task, grad_dim=0, dtype=torch.float32, device="cpu", grad_wrt=names
    )
    assert isinstance(computer, FactoredGradientComputer)
    images, tokens = tensors["train"]
    rows = [3, 17, 29]
    sim_idx = SimulatedBatch(60, 20, seed=0).for_train(rows, 0)
    batch = (images[rows], tokens[rows], sim_idx)
    out = computer.compute_per_sample_grad(batch)
    assert out["token"] is None  # the token embedding, when attributed, has a block too
    factors = computer.factors
    projector = projector_for(tiny, cfg, names)
    projected = projector.project(out, model_id=0)  # (3, 64)
    for b, i in enumerate(rows):
        grads = _autograd(tiny, names, task, images[i], tokens[i], sim_idx[b])
        expected_proj = torch.zeros(64, dtype=torch.float64)
        for name in factors.blocks:
            p_r, p_c = factors.pair(name)
            kron = torch.kron(p_r, p_c).double()  # (k_r k_c, rows cols)
            expected = kron @ grads[name].reshape(-1).double()
            got = out["dense"][block_key(name)][b].reshape(-1).double()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
            expected_proj += expected @ projector.dense_block(block_key(name)).double()
        for name in computer.dense_names:
            got = out["dense"][name][b]
            torch.testing.assert_close(got, grads[name], rtol=1e-4, atol=1e-6)
            expected_proj += grads[name].reshape(-1).double() @ projector.dense_block(name).double()
        torch.testing.assert_close(projected[b].double(), expected_proj, rtol=1e-4, atol=1e-5)
    # the out-to-loss term from the pass's embeddings equals a forward pass's
    again = FactoredGradientComputer(
        tiny, task, 0, torch.float32, "cpu", grad_wrt=names, factors=factors
    )
    torch.testing.assert_close(
        computer.compute_loss_grad(batch), again.compute_loss_grad(batch), rtol=1e-5, atol=1e-6
    )


def test_attention_in_plain_ops_equals_torch():
    """TapMode's F.multi_head_attention_forward (zero taps) = torch's: self-attention with a
    causal float mask, cross-attention with a padding mask and weights, separate projections."""
    torch.manual_seed(0)
    x, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    causal = torch.full((5, 5), -math.inf).triu(1)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    packed = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    separate = torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True).eval()
    calls = [
        (packed, (x, x, x), {"attn_mask": causal, "need_weights": False}),
        (packed, (x, kv, kv), {"key_padding_mask": padding}),
        (separate, (x, kv[..., :8], kv[..., 8:]), {"average_attn_weights": False}),
    ]
    for module, args, kwargs in calls:
        weights = {n: p for n, p in module.named_parameters() if p.dim() == 2 and "bias" not in n}
        blocks = {n: Block(*p.shape, 4, 4) for n, p in weights.items()}
        factors = KroneckerFactors(blocks, seed=0, device="cpu")
        taps = {n: z[0] for n, z in factors.zeros(1).items()}  # one pair's (k_r, k_c)
        mode = TapMode({id(p): n for n, p in weights.items()}, taps, factors)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():
                expected = module(*args, **kwargs)
                with mode:
                    got = module(*args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
        if expected[1] is not None:
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_checkpoint_stack_gives_each_checkpoints_factored_gradient(random_checkpoints, tensors):
    """A new query's one-vmap gradient at every checkpoint = each checkpoint's own."""
    models = [load_into(create("trakview-tiny").model, c).eval() for c in random_checkpoints]
    names = select_parameters(models[0], "no-token-embedding")
    cfg = BuildConfig(checkpoints=["x"], proj_dim=64, projector="factored")
    make = gradient_computer_for(models[0], cfg, names)
    tasks = [_task(60, 64, seed=m) for m in range(2)]
    computers = [
        make(model=mod, task=t, grad_dim=0, dtype=torch.float32, device="cpu", grad_wrt=names)
        for mod, t in zip(models, tasks, strict=True)
    ]
    images, tokens = tensors["val"]
    sim_idx = SimulatedBatch(60, 20, seed=0).for_targets(1, 0)
    sims = [t.batch_embeddings(sim_idx) for t in tasks]
    stacked = CheckpointStack(computers).margin_grads(
        images[4], tokens[4], torch.cat([s[0] for s in sims]), torch.cat([s[1] for s in sims])
    )
    for m, computer in enumerate(computers):
        one = computer.compute_per_sample_grad((images[4:5], tokens[4:5], sim_idx))
        assert set(one["dense"]) == set(stacked["dense"])
        for name, g in one["dense"].items():
            torch.testing.assert_close(stacked["dense"][name][m], g[0], rtol=1e-4, atol=1e-6)


def test_bfloat16_pass_stays_close(tiny, tensors):
    names = select_parameters(tiny, "no-token-embedding")
    out = {}
    for kind in ("factored", "factored-bf16"):
        cfg = BuildConfig(checkpoints=["x"], proj_dim=64, projector=kind)
        make = gradient_computer_for(tiny, cfg, names)
        computer = make(tiny, _task(60, 64, 1), 0, torch.float32, "cpu", grad_wrt=names)
        images, tokens = tensors["train"]
        batch = (images[:4], tokens[:4], SimulatedBatch(60, 20).for_train(range(4), 0))
        out[kind] = projector_for(tiny, cfg, names).project(
            computer.compute_per_sample_grad(batch), 0
        )
    cos = F.cosine_similarity(out["factored"], out["factored-bf16"], dim=1)
    assert not torch.equal(out["factored"], out["factored-bf16"]) and cos.min() > 0.97


def test_factored_build_is_deterministic_resumable_recorded_and_queried_alike(
    tmp_path, pairs, random_checkpoints, tensors, monkeypatch, one_thread
):
    """Built once, and again killed in checkpoint 1's featurization and resumed: bit-identical
    scores; the manifest records the projector; the query path (gradient_computer_for,
    projector_for, CheckpointStack) reproduces the stored validation gradients."""
    cfg = BuildConfig(  # 3 training shards of 80 pairs (two batches each), as sharded_config
        checkpoints=random_checkpoints, topk=20, projector="factored", shard_size=80, batch_size=40
    )
    assert resolve(cfg, 240).projector == "factored"
    first = build(*pairs, cfg, tmp_path / "first")
    original = TRAKer.featurize
    calls = {"n": 0}

    def dying_featurize(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # checkpoint 1, inside its second unit
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TRAKer, "featurize", dying_featurize)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(*pairs, cfg, out)
    assert not RunLayout(out).stage_done("featurize-1")
    calls["n"] = -(10**6)
    build(*pairs, cfg, out)
    assert calls["n"] == -(10**6) + 4  # only the unfinished units' batches
    assert np.array_equal(np.load(out / "scores.npy"), np.load(first / "scores.npy"))

    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["config"]["projector"] == "factored"
    assert "factored" in manifest["projection"]

    # a new query (QueryEngine: gradient_computer_for, projector_for, CheckpointStack) of a
    # stored validation pair reproduces its stored column of scores
    engine = QueryEngine.load(first)
    column = np.load(first / "scores.npy")
    for j in (3, 7):
        rec = engine.val[j]
        result = engine.query(first / rec["image"], rec["caption"], k=10)
        assert np.corrcoef(column[:, j], result.scores)[0, 1] >= 0.999
        top = list(np.argsort(-column[:, j], kind="stable")[:10])
        assert [c.index for c in result.positive] == top


def _resnet_and_convnext_clips() -> dict[str, torch.nn.Module]:
    from open_clip.model import CLIP

    text = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
    torch.manual_seed(0)
    resnet = dict(layers=(1, 1, 1, 1), width=8, image_size=32, head_width=8)
    convnext = dict(  # a timm tower, as open_clip's convnext_* models
        timm_model_name="convnext_atto",
        timm_model_pretrained=False,
        timm_pool="",
        timm_proj="linear",
        image_size=32,
    )
    return {
        "resnet": CLIP(embed_dim=16, vision_cfg=resnet, text_cfg=text).eval(),
        "convnext": CLIP(embed_dim=16, vision_cfg=convnext, text_cfg=text).eval(),
    }


@pytest.mark.parametrize("tower", ["resnet", "convnext"])
def test_resnet_and_convnext_towers_factor_their_convolutions_exactly(tower):
    """ModifiedResNet: convolutions and attention-pool projections factored, batch norms exact;
    timm ConvNeXt: stem, downsampling, MLPs and head factored, depthwise convolutions exact. For
    every weight, the factored block = kron(P_r, P_c) vec(autograd gradient), the rest =
    autograd's."""
    model = _resnet_and_convnext_clips()[tower]
    names = select_parameters(model, "all")
    blocks = factored_layout(model, names, proj_dim=64)
    convs = {
        n
        for n, m in model.visual.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1
    }
    depthwise = {
        n
        for n, m in model.visual.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1
    }
    assert convs and {f"visual.{n}.weight" for n in convs} <= set(blocks)
    assert not {f"visual.{n}.weight" for n in depthwise} & set(blocks)
    assert not any("bn" in n or "norm" in n or n.endswith("bias") for n in blocks)
    if tower == "convnext":
        assert depthwise  # ConvNeXt's 7x7 depthwise convolutions fall back
        assert any(".mlp.fc1." in n for n in blocks) and "visual.head.proj.weight" in blocks
    else:
        assert {"visual.attnpool.q_proj.weight", "visual.attnpool.c_proj.weight"} <= set(blocks)
    cfg = BuildConfig(checkpoints=["x"], proj_dim=64, projector="factored")
    task = _task(30, 16, seed=2)
    computer = gradient_computer_for(model, cfg, names)(
        model=model, task=task, grad_dim=0, dtype=torch.float32, device="cpu", grad_wrt=names
    )
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    tokens = torch.randint(1, 100, (2, 16), generator=gen)
    sim_idx = SimulatedBatch(30, 8, seed=0).for_train([4, 9], 0)
    out = computer.compute_per_sample_grad((images, tokens, sim_idx))
    for b in range(2):
        grads = _autograd(model, names, task, images[b], tokens[b], sim_idx[b])
        for name in blocks:
            p_r, p_c = computer.factors.pair(name)
            expected = torch.kron(p_r, p_c).double() @ grads[name].reshape(-1).double()
            got = out["dense"][block_key(name)][b].reshape(-1).double()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
        for name in computer.dense_names:
            scale = grads[name].abs().max()
            torch.testing.assert_close(
                out["dense"][name][b], grads[name], rtol=1e-4, atol=1e-5 * scale + 1e-8
            )
