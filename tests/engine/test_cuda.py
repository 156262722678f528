"""The CUDA path (skipped without a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.assemble.orchestrate import build
from engine.attribution.gradients import SelectiveGradientComputer, select_parameters
from engine.attribution.margin import ClipMargin
from engine.attribution.projection import KeyedProjector
from engine.attribution.settings import BuildConfig
from engine.explore.query import QueryEngine
from engine.models.checkpoints import load_into
from engine.models.factory import create

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cuda_cfg(checkpoints, **kw) -> BuildConfig:
    return BuildConfig(
        checkpoints=[str(p) for p in checkpoints],
        topk=20,
        device="cuda",
        grad_params="no-token-embedding",  # as the CPU run_dir fixture
        projector="gaussian",
        **kw,
    )


def _min_column_corr(a: np.ndarray, b: np.ndarray) -> float:
    return min(np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1]))


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, pairs, checkpoints):
    return build(*pairs, _cuda_cfg(checkpoints), tmp_path_factory.mktemp("cuda") / "run")


def test_cuda_build_matches_cpu_and_its_own_queries(cuda_run, run_dir):
    scores = np.load(cuda_run / "scores.npy")
    cpu = np.load(run_dir / "scores.npy")
    assert np.isfinite(scores).all()
    if "fast_jl" not in (cuda_run / "manifest.json").read_text():  # same keyed projection as CPU
        assert _min_column_corr(scores, cpu) > 0.99
    engine = QueryEngine.load(cuda_run, device="cuda")
    rec = engine.val[3]
    result = engine.query(cuda_run / rec["image"], rec["caption"], k=10)
    assert np.corrcoef(result.scores, scores[:, 3])[0, 1] >= 0.999


def test_a_run_built_on_cuda_is_queried_on_cpu(cuda_run):
    if "fast_jl" in (cuda_run / "manifest.json").read_text():
        pytest.skip("fast_jl's projection exists on CUDA only")
    scores = np.load(cuda_run / "scores.npy")
    engine = QueryEngine.load(cuda_run, device="cpu")
    rec = engine.val[5]
    result = engine.query(cuda_run / rec["image"], rec["caption"], k=10)
    assert np.corrcoef(result.scores, scores[:, 5])[0, 1] >= 0.999


def test_half_precision_build_agrees_with_float32(tmp_path, pairs, checkpoints, cuda_run):
    run = build(*pairs, _cuda_cfg(checkpoints, half=True), tmp_path / "half")
    scores = np.load(run / "scores.npy")
    assert np.isfinite(scores).all()
    assert _min_column_corr(scores, np.load(cuda_run / "scores.npy")) > 0.99


def test_gradients_take_cpu_batches_and_embeddings(tensors, checkpoints):
    """The build hands CPU batches and CPU embeddings to a model on the GPU."""
    images, tokens = tensors["train"]
    model = load_into(create("trakview-tiny", device="cuda").model, checkpoints[0])
    with torch.no_grad():
        img, txt, _ = model(images.cuda(), tokens.cuda())
    task = ClipMargin()
    task.set_embeddings(img.cpu(), txt.cpu())
    names = select_parameters(model, "all")
    computer = SelectiveGradientComputer(model, task, 0, torch.float32, "cuda", grad_wrt=names)
    sim_idx = torch.randint(0, len(images), (4, 16))
    batch = (images[:4], tokens[:4], sim_idx)  # on CPU
    grads = computer.compute_per_sample_grad(batch)
    assert grads["token"].is_cuda and all(g.is_cuda for g in grads["dense"].values())
    assert computer.compute_loss_grad(batch).shape == (4, 1)


@pytest.mark.parametrize("sketch_dim", [0, 256])
def test_keyed_projection_is_the_same_on_cuda_and_cpu(sketch_dim):
    model = create("trakview-tiny", seed=0).model
    names = select_parameters(model, "all")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    token = "token_embedding.weight"
    gen = torch.Generator().manual_seed(0)
    grads = {
        "dense": {n: torch.randn(3, *s, generator=gen) for n, s in shapes.items() if n != token},
        "token": torch.randn(3, 24, shapes[token][1], generator=gen),
        "ids": torch.randint(0, 49408, (3, 24), generator=gen),
    }
    on_gpu = {
        "dense": {n: g.cuda() for n, g in grads["dense"].items()},
        "token": grads["token"].cuda(),
        "ids": grads["ids"].cuda(),
    }
    out = {}
    for device, g in (("cpu", grads), ("cuda", on_gpu)):
        projector = KeyedProjector(shapes, token, 64, seed=1, device=device, sketch_dim=sketch_dim)
        out[device] = projector.project(g, model_id=0).cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("projector", ["factored", "factored-bf16"])
def test_factored_build_on_cuda_matches_cpu_and_its_queries(
    tmp_path, pairs, checkpoints, projector
):
    """--projector factored on CUDA: the same projection as on CPU (float32: scores agree;
    bfloat16 autocast: close), and a new query on CUDA reproduces a stored column."""
    cfg = BuildConfig(
        checkpoints=[str(p) for p in checkpoints], topk=20, projector=projector, device="cuda"
    )
    run = build(*pairs, cfg, tmp_path / "cuda")
    scores = np.load(run / "scores.npy")
    assert np.isfinite(scores).all()
    cpu_cfg = BuildConfig(checkpoints=cfg.checkpoints, topk=20, projector="factored")
    cpu = np.load(build(*pairs, cpu_cfg, tmp_path / "cpu") / "scores.npy")
    assert _min_column_corr(scores, cpu) > (0.99 if projector == "factored" else 0.9)
    engine = QueryEngine.load(run, device="cuda")
    rec = engine.val[3]
    result = engine.query(run / rec["image"], rec["caption"], k=10)
    assert np.corrcoef(result.scores, scores[:, 3])[0, 1] >= 0.99
