"""`trakview demo`: the generated world, a tiny CLIP ensemble trained on it, and its run.

Layout of the demo folder::

    OUT/data/{train,val}.jsonl, OUT/data/images/{train,val}/*.png   the world (with ground truth)
    OUT/models/member-K/checkpoints/epoch_N.pt                     the ensemble
    OUT/run/                                                        the attribution run

Each step is skipped when its output exists, so an interrupted demo resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from engine.attribution.settings import BuildConfig
from engine.build.orchestrate import build
from engine.data import synthetic
from engine.data.loading import image_tensors, tokenize
from engine.data.pairs import PairSet, pair_list_path, read_pairs, save_pairs
from engine.models import train
from engine.models.factory import create

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """The demo's settings (defaults: the world and ensemble the README describes)."""

    n_train: int = 3000  # training pairs of the world
    n_val: int = 300  # validation pairs of the world
    members: int = 4  # independently trained CLIP models
    epochs: int = 15  # epochs per model
    snapshots: int = 3  # checkpoints attributed per model: its last epoch and evenly spaced ones
    lr: float = 3e-3  # peak learning rate
    model: str = "trakview-tiny"  # architecture
    seed: int = 0  # world, training and attribution seed


def make_world(cfg: DemoConfig, folder: Path) -> tuple[PairSet, PairSet]:
    """Generates the world into ``folder`` unless it is already there; returns its two splits."""
    train_jsonl, val_jsonl = pair_list_path(folder, "train"), pair_list_path(folder, "val")
    if not (train_jsonl.is_file() and val_jsonl.is_file()):
        t0 = time.perf_counter()
        world = synthetic.generate_world(
            synthetic.WorldConfig(n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed)
        )
        save_pairs(folder, "val", world.val, world.val_images)
        save_pairs(folder, "train", world.train, world.train_images)
        log.info("generated the demo world in %.1f s", time.perf_counter() - t0)
    return read_pairs(train_jsonl), read_pairs(val_jsonl)


def train_config(cfg: DemoConfig) -> train.TrainConfig:
    """The demo's trainer: ``members`` models, each keeping ``snapshots`` checkpoints."""
    epochs = train.snapshot_epochs(cfg.epochs, cfg.snapshots)
    return train.TrainConfig(
        model=cfg.model,
        members=cfg.members,
        epochs=cfg.epochs,
        lr=cfg.lr,
        seed=cfg.seed,
        save_epochs=[e for e in epochs if e != cfg.epochs],
    )


def train_models(cfg: DemoConfig, train_pairs: PairSet, folder: Path) -> list[Path]:
    """Trains the demo ensemble into ``folder`` (finished members are skipped); returns every
    checkpoint to attribute, member by member, earliest epoch first."""
    tcfg = train_config(cfg)
    wanted = [p for m in range(cfg.members) for p in train.member_checkpoints(folder, m, tcfg)]
    if not all(p.is_file() for p in wanted):
        bundle = create(cfg.model)
        images = image_tensors(train_pairs, bundle.preprocess)
        tokens = tokenize(bundle.tokenizer, train_pairs.captions)
        train.train_ensemble(images, tokens, tcfg, folder)
    return wanted


def run_demo(cfg: DemoConfig, out: str | Path) -> Path:
    """Runs the whole demo into ``out`` and returns the run directory."""
    out = Path(out)
    train_pairs, val_pairs = make_world(cfg, out / "data")
    checkpoints = train_models(cfg, train_pairs, out / "models")
    build_cfg = BuildConfig(
        model=cfg.model, checkpoints=[str(p) for p in checkpoints], seed=cfg.seed
    )
    invocation = {  # the same run as a `trakview build` command (see RUN/run.toml)
        "train_data": str(pair_list_path(out / "data", "train")),
        "val_data": str(pair_list_path(out / "data", "val")),
        "checkpoint": [str(p) for p in checkpoints],
        "model": cfg.model,
        "seed": cfg.seed,
    }
    return build(train_pairs, val_pairs, build_cfg, out / "run", invocation=invocation)
