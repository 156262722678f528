"""Training an ensemble of CLIP checkpoints with the standard contrastive loss.

TRAK averages over several independently trained checkpoints (TRAK paper, Section 3.4), so
``train_ensemble`` trains M members, each with its own seed (initialisation and data order), and
saves each in open_clip_train's layout and format: ``OUT/member-K/checkpoints/epoch_N.pt``.
``save_epochs`` keeps earlier epochs of each member too (as open_clip_train's
``--save-frequency`` does): checkpoints along one training run are a cheaper way to grow the
ensemble than more members (measured on the demo world in BENCHMARKS.md).
A member whose checkpoints all exist is skipped; one with an ``epoch_latest.pt`` resumes there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from tqdm.auto import tqdm

from engine import files, parallel
from engine.errors import ConfigError
from engine.models import checkpoints
from engine.models.factory import create

log = logging.getLogger(__name__)
# Members train side by side (``auto_jobs``) from this many samples (images x epochs) on: starting
# a worker process costs a few seconds. Up to this many bytes of images are copied to each.
PARALLEL_MIN_SAMPLES = 10_000
PARALLEL_MAX_BYTES = 1 << 30
# The trainer's settings, written beside an ensemble so that `trakview eval` retrains alike.
TRAIN_CONFIG_FILE = "train_config.json"


@dataclass
class TrainConfig:
    """How an ensemble is trained."""

    model: str = "trakview-tiny"  # open_clip architecture or trakview config
    members: int = 4  # number of independently trained checkpoints
    epochs: int = 15  # passes over the training set per member
    batch_size: int = 128  # pairs per contrastive batch
    lr: float = 3e-3  # peak AdamW learning rate (cosine decay after warm-up)
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 30  # linear warm-up steps
    seed: int = 0  # member K uses seed + K
    init: str | None = None  # checkpoint to fine-tune from (default: random init)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    save_epochs: list[int] = field(default_factory=list)  # earlier epochs kept as epoch_N.pt


def snapshot_epochs(epochs: int, snapshots: int) -> list[int]:
    """``snapshots`` evenly spaced epochs of a run of ``epochs``, ending with the last one:
    (15, 3) -> [5, 10, 15]."""
    if not 1 <= snapshots <= epochs:
        raise ConfigError(f"snapshots must be between 1 and the epochs ({epochs}), got {snapshots}")
    return sorted({round(epochs * k / snapshots) for k in range(1, snapshots + 1)})


def check_save_epochs(cfg: TrainConfig) -> None:
    bad = [e for e in cfg.save_epochs if not 1 <= e <= cfg.epochs]
    if bad:
        raise ConfigError(
            f"save epochs {bad} outside 1..{cfg.epochs} (the training has {cfg.epochs} epochs)"
        )


def member_dir(out: Path, member: int) -> Path:
    return Path(out) / f"member-{member}" / "checkpoints"


def final_checkpoint(out: Path, member: int, epochs: int) -> Path:
    return member_dir(out, member) / f"epoch_{epochs}.pt"


def member_checkpoints(out: Path, member: int, cfg: TrainConfig) -> list[Path]:
    """Every checkpoint a member keeps, earliest first (its ``save_epochs`` and the final one)."""
    epochs = sorted({*cfg.save_epochs, cfg.epochs})
    return [member_dir(out, member) / f"epoch_{e}.pt" for e in epochs]


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def train_member(
    images: torch.Tensor,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    member: int,
    out: Path,
    device: str = "cpu",
    progress: bool = True,
    on_step: Callable[[int], Any] | None = None,
) -> Path:
    """Trains (or resumes) one ensemble member and returns its final checkpoint path.

    Args:
        images: (n, 3, H, W) preprocessed training images.
        tokens: (n, context_length) token ids of the captions.
        cfg: training settings.
        member: index of the member; its seed is ``cfg.seed + member``.
        out: ensemble folder.
        device: torch device.
        progress: show a progress bar.
        on_step: called with the number of steps done since its last call (every epoch).
    """
    final = final_checkpoint(out, member, cfg.epochs)
    keep = set(cfg.save_epochs) - {cfg.epochs}
    wanted = member_checkpoints(out, member, cfg)
    if all(p.is_file() for p in wanted):
        return final
    if final.is_file():  # finished before without an epoch now wanted: train it again (same seed)
        log.info("member %d: training again to keep epochs %s", member, sorted(keep))
        final.unlink()
    seed = cfg.seed + member
    bundle = create(cfg.model, seed=seed, device=device)
    model = bundle.model
    if cfg.init:
        checkpoints.load_into(model, cfg.init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = open_clip.ClipLoss()
    latest = member_dir(out, member) / "epoch_latest.pt"
    start_epoch = 0
    if latest.is_file():
        meta = checkpoints.read_checkpoint_meta(latest)
        checkpoints.load_into(model, latest)
        optimizer.load_state_dict(meta["optimizer"])
        start_epoch = int(meta["epoch"])
        log.info("member %d: resuming after epoch %d", member, start_epoch)

    n = images.shape[0]
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    bar = tqdm(
        total=total,
        initial=start_epoch * steps_per_epoch,
        desc=f"member {member}",
        disable=not progress,
    )
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, cfg)
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            img_f, txt_f, scale = model(images[idx].to(device), tokens[idx].to(device))
            loss = loss_fn(img_f, txt_f, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # as open_clip_train: keep the temperature below 100
                model.logit_scale.clamp_(0, math.log(100))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
        done = epoch + 1
        if on_step is not None:
            on_step(steps_per_epoch)
        if done in keep and done < cfg.epochs:
            checkpoints.save_checkpoint(
                member_dir(out, member) / f"epoch_{done}.pt",
                model,
                epoch=done,
                name=cfg.model,
                extra={"trakview_train": asdict(cfg), "member": member},
            )
        target = final if done == cfg.epochs else latest
        checkpoints.save_checkpoint(
            target,
            model,
            epoch=done,
            name=cfg.model,
            optimizer=optimizer if done < cfg.epochs else None,
            extra={"trakview_train": asdict(cfg), "member": member},
        )
    bar.close()
    latest.unlink(missing_ok=True)
    model.eval()
    return final


def auto_jobs(cfg: TrainConfig, n_images: int, members: int, device: str, nbytes: int) -> int:
    """Members trained side by side for ``jobs=0``: on a CPU, one per core (at most
    ``parallel.MAX_AUTO_JOBS``) when there are several members, enough work to pay for starting the
    processes, and images small enough to copy to each; else one."""
    if device != "cpu" or members < 2 or n_images * cfg.epochs < PARALLEL_MIN_SAMPLES:
        return 1
    if nbytes > PARALLEL_MAX_BYTES:
        return 1
    return max(1, min(parallel.cpus(), parallel.MAX_AUTO_JOBS, members))


def recorded_settings(cfg: TrainConfig, out: Path) -> dict:
    """``cfg`` as ``OUT/train_config.json`` records it: a starting checkpoint (``init``) in the
    folder that holds OUT (the demo's ``base/``) relative to OUT, so that the two can move
    together; any other as given. ``read_settings`` resolves it back."""
    out_cfg = asdict(cfg)
    if cfg.init:
        init = Path(cfg.init).absolute()
        if init.is_relative_to(Path(out).absolute().parent):
            out_cfg["init"] = os.path.relpath(init, Path(out).absolute())
    return out_cfg


def read_settings(path: Path) -> dict:
    """The settings recorded in a ``train_config.json`` at ``path``, with a relative ``init``
    resolved against its folder."""
    recorded = files.read_json(path)
    init = recorded.get("init")
    if init and not Path(init).is_absolute():
        recorded["init"] = str((Path(path).parent / init).resolve())
    return recorded


def train_ensemble(
    images: torch.Tensor,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    out: Path,
    device: str = "cpu",
    jobs: int = 0,
) -> list[Path]:
    """Trains every member of the ensemble (skipping finished ones); returns checkpoint paths.

    With ``jobs`` > 1 the members train side by side in worker processes of ``cfg.threads``
    torch threads each (default: the CPU count shared out); ``jobs=0`` picks with
    ``auto_jobs``. A member's weights depend on its seed and its number of threads only.
    The settings are recorded in ``OUT/train_config.json``, so that ``trakview eval`` retrains
    with the same trainer as the run's checkpoints.
    """
    if cfg.members < 1:
        raise ConfigError(f"members must be at least 1, got {cfg.members}")
    check_save_epochs(cfg)
    if images.shape[0] < cfg.batch_size:
        raise ConfigError(
            f"the training set has {images.shape[0]} pairs, fewer than one batch "
            f"({cfg.batch_size}); lower --batch-size"
        )
    if jobs < 0:
        raise ConfigError(f"jobs must be 0 (auto) or a number of processes, got {jobs}")
    files.write_json(Path(out) / TRAIN_CONFIG_FILE, recorded_settings(cfg, Path(out)))
    t0 = time.perf_counter()
    todo = [
        m
        for m in range(cfg.members)
        if not all(p.is_file() for p in member_checkpoints(out, m, cfg))
    ]
    nbytes = images.element_size() * images.nelement()
    jobs = min(jobs or auto_jobs(cfg, images.shape[0], len(todo), device, nbytes), len(todo))
    if jobs <= 1:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        paths = [train_member(images, tokens, cfg, m, out, device) for m in range(cfg.members)]
    else:
        _train_side_by_side(images, tokens, cfg, out, device, todo, jobs)
        paths = [final_checkpoint(out, m, cfg.epochs) for m in range(cfg.members)]
    log.info("trained %d members in %.1f s", cfg.members, time.perf_counter() - t0)
    return paths


def _train_side_by_side(
    images: torch.Tensor,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    out: Path,
    device: str,
    todo: list[int],
    jobs: int,
) -> None:
    """``todo`` members in ``jobs`` processes; one progress bar over all their steps."""
    per_epoch = max(1, images.shape[0] // cfg.batch_size)
    resumed = 0  # steps that members resuming from epoch_latest.pt have done already
    for m in todo:
        latest = member_dir(out, m) / "epoch_latest.pt"
        if latest.is_file():
            resumed += int(checkpoints.read_checkpoint_meta(latest)["epoch"]) * per_epoch
    # numpy arrays are pickled by value: a torch tensor would go through /dev/shm, which
    # containers often keep small
    x, t = images.numpy(), tokens.numpy()
    progress = parallel.queue()
    threads = parallel.threads_per_job(jobs, cfg.threads)
    bar = tqdm(
        total=per_epoch * cfg.epochs * len(todo),
        initial=resumed,
        desc=f"training {len(todo)} members ({jobs} processes)",
        unit="step",
    )
    with bar, parallel.Pool(jobs, threads, _set_progress_queue, (progress,)) as pool:
        futures = [pool.submit(_train_in_worker, x, t, cfg, m, str(out), device) for m in todo]
        while not all(f.done() for f in futures):
            with contextlib.suppress(queue.Empty):
                bar.update(progress.get(timeout=0.5))
            for f in futures:
                if f.done() and f.exception() is not None:
                    f.result()  # a member's error stops the training at once (finished kept)
        for f in futures:
            f.result()
        bar.update(bar.total - bar.n)  # steps still in the queue
    progress.close()


_PROGRESS: Any = None  # a training worker's queue of steps done, to the parent's progress bar


def _set_progress_queue(progress: Any) -> None:
    global _PROGRESS
    _PROGRESS = progress


def _train_in_worker(
    images: np.ndarray,
    tokens: np.ndarray,
    cfg: TrainConfig,
    member: int,
    out: str,
    device: str,
) -> str:
    """A worker's member: ``train_member`` reporting its steps to the parent's bar."""
    path = train_member(
        torch.from_numpy(images),
        torch.from_numpy(tokens),
        cfg,
        member,
        Path(out),
        device,
        progress=False,
        on_step=_PROGRESS.put,
    )
    return str(path)
