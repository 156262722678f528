"""Fixtures shared by the dashboard tests."""

from __future__ import annotations

import numpy as np
import pytest

from engine.files import read_jsonl


@pytest.fixture(scope="module")
def arrays(run_dir):
    """What the small run stores, read straight from its files (the tests' ground truth)."""
    return {
        "scores": np.load(run_dir / "scores.npy"),
        "train": read_jsonl(run_dir / "train.jsonl"),
        "val": read_jsonl(run_dir / "val.jsonl"),
        "train_img": np.load(run_dir / "train_image_emb.npy"),
        "val_img": np.load(run_dir / "val_image_emb.npy"),
        "val_txt": np.load(run_dir / "val_text_emb.npy"),
        "suspect": np.load(run_dir / "suspect_mislabeled.npy"),
    }
