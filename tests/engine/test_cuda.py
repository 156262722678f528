"""The CUDA path (skipped without a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import attribute
from engine.query import QueryEngine

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_build_matches_cpu_and_its_own_queries(tmp_path, pairs, checkpoints, run_dir):
    cfg = attribute.BuildConfig(
        checkpoints=[str(p) for p in checkpoints],
        topk=20,
        device="cuda",
        grad_params="no-token-embedding",
        projector="gaussian",
    )
    run = attribute.build(*pairs, cfg, tmp_path / "cuda")
    scores = np.load(run / "scores.npy")
    cpu = np.load(run_dir / "scores.npy")
    if "fast_jl" not in (run / "manifest.json").read_text():  # same keyed projection as on CPU
        assert min(np.corrcoef(scores[:, j], cpu[:, j])[0, 1] for j in range(cpu.shape[1])) > 0.99
    engine = QueryEngine.load(run, device="cuda")
    rec = engine.val[3]
    result = engine.query(run / rec["image"], rec["caption"], k=10)
    assert np.corrcoef(result.scores, scores[:, 3])[0, 1] >= 0.999
