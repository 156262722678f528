"""A run's health: how well its checkpoints match each split's images and captions, the
evidence of its trust verdict (``engine.explore.trust``). The build records it in the manifest;
a run built before it existed gets it measured from its stored embeddings."""

from __future__ import annotations

import numpy as np

from engine import files
from engine.models.retrieval import split_retrieval
from engine.run.layout import MODALITIES, SPLITS, RunLayout

HEALTH_SAMPLE = 5000  # pairs per split on which retrieval is measured (n x n similarities)


def health(layout: RunLayout, n_models: int, seed: int = 0) -> dict[str, object]:
    """How well the checkpoints match each split's images and captions (retrieval against
    chance, mean over checkpoints): the evidence of the run's trust verdict. A split larger than
    ``HEALTH_SAMPLE`` is measured on a seeded sample of that many pairs."""
    out: dict[str, object] = {}
    for split in SPLITS:
        n = files.load_npy(layout.checkpoint_embeddings(split, "image", 0), mmap=True).shape[0]
        rows = np.arange(n)
        if n > HEALTH_SAMPLE:
            rows = np.sort(np.random.default_rng([seed, 7]).choice(n, HEALTH_SAMPLE, False))
        per_checkpoint = [
            tuple(
                np.asarray(
                    files.load_npy(layout.checkpoint_embeddings(split, mod, m), mmap=True)[rows]
                )
                for mod in MODALITIES
            )
            for m in range(n_models)
        ]
        out[split] = {**split_retrieval(per_checkpoint), "of": int(n)}
    return out
