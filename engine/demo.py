"""`trakview demo`: the generated world, a tiny CLIP ensemble trained on it, and its run.

Layout of the demo folder::

    OUT/data/{train,val}.jsonl, OUT/data/images/{train,val}/*.png   the world (with ground truth,
                                                                    a planted failure included)
    OUT/base/data/, OUT/base/model/member-0/checkpoints/epoch_N.pt  the base model and its world
    OUT/models/member-K/checkpoints/epoch_N.pt                     the ensemble
    OUT/run/                                                        the attribution run

The ensemble is fine-tuned from a base model trained on a second world of the same generator
(seed + 1), the way users fine-tune a pretrained CLIP. Fine-tuned from one start, two seeds on
the same data agree (split-half reliability 0.78 against 0.13 from random initialisation,
BENCHMARKS.md ``bench_reliability``), so counterfactual effects (LDS, removal, cleaning) can be
measured on the demo. ``base_epochs=0`` trains the members from random initialisation instead.

Each step is skipped when its output exists, so an interrupted demo resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from engine.assemble.orchestrate import build
from engine.attribution.settings import BuildConfig
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
    lr: float = 1e-3  # members' peak learning rate when fine-tuned from the base model
    warmup_steps: int = 10  # members' warm-up steps when fine-tuned from the base model
    base_epochs: int = 15  # epochs of the base model (0: members from random initialisation)
    base_lr: float = 3e-3  # peak learning rate from random initialisation (the base model)
    base_warmup_steps: int = 30  # warm-up steps from random initialisation
    model: str = "trakview-tiny"  # architecture
    seed: int = 0  # world, training and attribution seed (the base model's world: seed + 1)
    failure: str = "watermark"  # planted systematic failure (engine.data.failures.FAILURES)


def make_world(cfg: DemoConfig, folder: Path) -> tuple[PairSet, PairSet]:
    """Generates the world into ``folder`` unless it is already there; returns its two splits."""
    train_jsonl, val_jsonl = pair_list_path(folder, "train"), pair_list_path(folder, "val")
    if not (train_jsonl.is_file() and val_jsonl.is_file()):
        t0 = time.perf_counter()
        world = synthetic.generate_world(
            synthetic.WorldConfig(
                n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed, failure=cfg.failure
            )
        )
        save_pairs(folder, "val", world.val, world.val_images)
        save_pairs(folder, "train", world.train, world.train_images)
        log.info("generated the demo world in %.1f s", time.perf_counter() - t0)
    return read_pairs(train_jsonl), read_pairs(val_jsonl)


def base_config(cfg: DemoConfig) -> train.TrainConfig:
    """The base model's trainer: one model from random initialisation on the world seed + 1."""
    return train.TrainConfig(
        model=cfg.model,
        members=1,
        epochs=cfg.base_epochs,
        lr=cfg.base_lr,
        warmup_steps=cfg.base_warmup_steps,
        seed=cfg.seed + 1,
    )


def train_config(cfg: DemoConfig, init: str | Path | None = None) -> train.TrainConfig:
    """The demo's trainer: ``members`` models, each keeping ``snapshots`` checkpoints, fine-tuned
    from the base checkpoint ``init`` (from random initialisation, with the base model's
    schedule, when ``init`` is None)."""
    epochs = train.snapshot_epochs(cfg.epochs, cfg.snapshots)
    return train.TrainConfig(
        model=cfg.model,
        members=cfg.members,
        epochs=cfg.epochs,
        lr=cfg.lr if init else cfg.base_lr,
        warmup_steps=cfg.warmup_steps if init else cfg.base_warmup_steps,
        seed=cfg.seed,
        init=str(init) if init else None,
        save_epochs=[e for e in epochs if e != cfg.epochs],
    )


def _checkpoints(tcfg: train.TrainConfig, folder: Path) -> list[Path]:
    """Every checkpoint ``tcfg``'s members keep in ``folder``, member by member."""
    return [p for m in range(tcfg.members) for p in train.member_checkpoints(folder, m, tcfg)]


def _train(pairs: PairSet, tcfg: train.TrainConfig, folder: Path) -> list[Path]:
    """Trains ``tcfg``'s members into ``folder`` unless done; returns their checkpoints."""
    wanted = _checkpoints(tcfg, folder)
    if not all(p.is_file() for p in wanted):
        bundle = create(tcfg.model)
        images = image_tensors(pairs, bundle.preprocess)
        tokens = tokenize(bundle.tokenizer, pairs.captions)
        train.train_ensemble(images, tokens, tcfg, folder)
    return wanted


def train_base(cfg: DemoConfig, folder: Path) -> Path | None:
    """Generates the base model's world into ``folder/data`` and trains the base model into
    ``folder/model`` (each skipped when done); returns its checkpoint (None: ``base_epochs=0``)."""
    if cfg.base_epochs <= 0:
        return None
    tcfg = base_config(cfg)
    final = train.final_checkpoint(folder / "model", 0, tcfg.epochs)
    if final.is_file():
        return final
    base_world = replace(cfg, seed=cfg.seed + 1, failure="none")  # a clean "pretraining" world
    log.info("training the base model on a second world (seed %d)", base_world.seed)
    pairs, _ = make_world(base_world, folder / "data")
    return _train(pairs, tcfg, folder / "model")[-1]


def train_models(cfg: DemoConfig, train_pairs: PairSet, folder: Path) -> list[Path]:
    """Trains the demo ensemble into ``folder`` (finished members are skipped), fine-tuned from
    the base model in ``folder/../base``; returns every checkpoint to attribute, member by
    member, earliest epoch first."""
    wanted = _checkpoints(train_config(cfg), Path(folder))
    if all(p.is_file() for p in wanted):  # trained before (the base model is not needed)
        return wanted
    init = train_base(cfg, Path(folder).parent / "base")
    return _train(train_pairs, train_config(cfg, init), Path(folder))


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
