"""Fixtures shared by the dashboard tests."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.files import read_jsonl
from engine.run.invocation import write_toml
from engine.run.layout import RunLayout


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


def csv_sourced_copy(run_dir: Path, folder: Path) -> Path:
    """The session's run copied to ``folder/run`` (at the same depth: its relative paths still
    resolve), as if built from open_clip_train CSVs: ``run.toml`` names ``data/{train,val}.csv``
    (id, filepath, title, mislabeled) holding the run's pairs."""
    run = folder / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval", "baskets"))
    layout = RunLayout(run)
    listings = {}
    for split in ("train", "val"):
        listing = folder / "data" / f"{split}.csv"
        listing.parent.mkdir(exist_ok=True)
        with open(listing, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(["id", "filepath", "title", "mislabeled"])
            for rec in read_jsonl(layout.pairs(split)):
                path = (run / rec["image"]).resolve()
                writer.writerow([rec["id"], path, rec["caption"], rec.get("mislabeled", "")])
        listings[f"{split}_data"] = str(listing)
    write_toml(layout.run_toml, listings, run, "test: the run as built from CSVs")
    return run


@pytest.fixture
def csv_run(run_dir, tmp_path):
    return csv_sourced_copy(run_dir, tmp_path)
