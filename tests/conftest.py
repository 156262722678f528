"""Shared fixtures: a small demo world, a tiny trained ensemble and a run built from them.

Everything is built once per session in a temporary folder and is deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.assemble.orchestrate import build
from engine.attribution.settings import BuildConfig
from engine.data import synthetic
from engine.data.loading import image_tensors, tokenize
from engine.data.pairs import PairSet, read_pairs, save_pairs
from engine.data.sources import read_source
from engine.models import train
from engine.models.factory import create

SMALL_WORLD = synthetic.WorldConfig(n_train=240, n_val=40, seed=3, near_duplicate_fraction=0.1)
# 20 epochs: the small world is learnt (validation retrieval far above chance, lift ~0.9)
SMALL_TRAIN = train.TrainConfig(members=2, epochs=20, batch_size=30, lr=3e-3, warmup_steps=4)


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own temporary working directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    """The small world on disk: train.jsonl, val.jsonl and PNGs."""
    folder = tmp_path_factory.mktemp("world")
    world = synthetic.generate_world(SMALL_WORLD)
    save_pairs(folder, "train", world.train, world.train_images)
    save_pairs(folder, "val", world.val, world.val_images)
    return folder


@pytest.fixture(scope="session")
def pairs(world_dir) -> tuple[PairSet, PairSet]:
    return read_pairs(world_dir / "train.jsonl"), read_pairs(world_dir / "val.jsonl")


@pytest.fixture(scope="session")
def tensors(pairs):
    """Preprocessed images and tokens of both splits for trakview-tiny."""
    bundle = create("trakview-tiny")
    train_pairs, val_pairs = pairs
    return {
        "train": (
            image_tensors(train_pairs, bundle.preprocess, progress=False),
            tokenize(bundle.tokenizer, train_pairs.captions),
        ),
        "val": (
            image_tensors(val_pairs, bundle.preprocess, progress=False),
            tokenize(bundle.tokenizer, val_pairs.captions),
        ),
    }


@pytest.fixture(scope="session")
def small_train() -> train.TrainConfig:
    """How the session's ensemble is trained."""
    return SMALL_TRAIN


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tensors) -> list[Path]:
    """A tiny two-member ensemble trained on the small world."""
    folder = tmp_path_factory.mktemp("ensemble")
    images, tokens = tensors["train"]
    return train.train_ensemble(images, tokens, SMALL_TRAIN, folder)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, pairs, checkpoints) -> Path:
    """A finished run on the small world."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = BuildConfig(checkpoints=[str(p) for p in checkpoints], topk=20, projector="gaussian")
    return build(*pairs, cfg, out)


@pytest.fixture(scope="session")
def sharded_config(checkpoints) -> BuildConfig:
    """Several units per checkpoint: 3 training shards of 80 pairs (two gradient batches each)
    and 1 shard of 40 validation pairs."""
    return BuildConfig(
        checkpoints=[str(p) for p in checkpoints],
        topk=20,
        projector="gaussian",
        shard_size=80,
        batch_size=40,
    )


@pytest.fixture
def one_thread():
    """torch on one CPU thread, as in a Ray task of one CPU (float sums depend on the count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sharded_run(tmp_path_factory, pairs, sharded_config) -> Path:
    """The small run built in this process with ``sharded_config`` on one CPU thread; the
    executor and resume tests compare other builds with it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build(*pairs, sharded_config, tmp_path_factory.mktemp("sharded") / "run")
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory, pairs):
    """The small world attributed with two randomly initialised checkpoints."""
    folder = tmp_path_factory.mktemp("untrained")
    paths = []
    for seed in (11, 12):
        path = folder / f"random-{seed}.pt"
        torch.save(create("trakview-tiny", seed=seed).model.state_dict(), path)
        paths.append(str(path))
    cfg = BuildConfig(checkpoints=paths, topk=5, projector="gaussian")
    return build(*pairs, cfg, folder / "run")


@pytest.fixture(scope="session")
def absolute_paths_run(tmp_path_factory, pairs, checkpoints) -> Path:
    """The small world listed as users' CSVs usually are: absolute image paths, no id column."""
    folder = tmp_path_factory.mktemp("absolute")
    listings = []
    for split, split_pairs in zip(("train", "val"), pairs, strict=True):
        rows = [
            f"{split_pairs.image_path(i).resolve()}\t{split_pairs.captions[i]}"
            for i in range(len(split_pairs))
        ]
        listing = folder / f"{split}.csv"
        listing.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
        listings.append(read_source(listing))
    cfg = BuildConfig(checkpoints=[str(p) for p in checkpoints], topk=5, projector="gaussian")
    return build(*listings, cfg, folder / "run")


def _encoded(img, fmt: str, **kw) -> bytes:
    import io

    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def hostile_images(pairs) -> dict[str, tuple[bytes, str | None]]:
    """Image files a user may upload: name -> (bytes, None for a usable image or a phrase of
    the error it must get)."""
    import numpy as np
    from PIL import Image

    base = Image.open(pairs[1].image_path(0)).convert("RGB").resize((96, 80))
    rng = np.random.default_rng(0)
    jpeg, png, webp = _encoded(base, "JPEG"), _encoded(base, "PNG"), _encoded(base, "WEBP")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    palette = base.convert("RGBA").quantize(16)
    palette.info["transparency"] = 0
    deep = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 250)
    bomb = Image.new("1", (20_000, 20_000))  # 400 megapixels, a few kB of PNG
    return {
        "random bytes": (rng.bytes(4096), "is not an image"),
        "zero bytes": (b"", "is empty"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated png": (png[: len(png) // 2], "truncated"),
        "truncated webp": (webp[: len(webp) // 2], "not an image"),
        "animated gif": (_encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), None),
        "exif-rotated jpeg": (_encoded(base, "JPEG", exif=exif), None),
        "16-bit png": (_encoded(deep, "PNG"), None),
        "cmyk jpeg": (_encoded(base.convert("CMYK"), "JPEG"), None),
        "palette+alpha png": (_encoded(palette, "PNG"), None),
        "decompression bomb": (_encoded(bomb, "PNG"), "downscale it first"),
        "20 MB + 1": (png + b"\0" * (20 * 2**20 + 1 - len(png)), "the limit is 20 MB"),
    }


# Captions a user may type: (text, None for a usable one or a phrase of the error it must get).
HOSTILE_CAPTIONS = {
    "empty": ("", "caption is empty"),
    "whitespace": (" \t\n  ", "caption is empty"),
    "10 kB": ("a red circle " * 800, None),
    "control characters": ("a red\x00 circle\x1b[31m on the\x07 left", None),
    "mixed scripts and emoji": ("un cercle rouge 赤い円 красный круг 🔴🟥", None),
    "markdown and html": ("**bold** [x](javascript:alert(1)) <script>alert(1)</script> $x$", None),
}


@pytest.fixture(scope="session")
def hostile_captions() -> dict[str, tuple[str, str | None]]:
    return HOSTILE_CAPTIONS


# Validation ids a URL may carry: none of them is in a run.
HOSTILE_IDS = ("../../etc/passwd", "'\"><script>alert(1)</script>", "a`b*c_d[e](f)", "%00\u202e")


@pytest.fixture(scope="session")
def hostile_ids() -> tuple[str, ...]:
    return HOSTILE_IDS


COMPARE_BASKET = 12  # run B: run A (the session's run) without its 12 most suspect pairs
COMPARE_SKIPPED_VAL = 3  # ... and without A's first 3 validation pairs


@pytest.fixture(scope="session")
def compare_runs(tmp_path_factory, run_dir, pairs, tensors) -> tuple[Path, Path]:
    """(A, B) for `trakview compare`: A a copy of the session's run (at its depth, so that its
    checkpoint paths resolve) holding the basket ``sus`` of its 12 most suspect pairs; B retrained
    without them (the session's trainer) and built on A's validation pairs but the first 3."""
    import shutil
    from dataclasses import replace

    import numpy as np

    from engine.curate import baskets, select
    from engine.files import read_jsonl
    from engine.run.layout import RunLayout
    from engine.run.manifest import open_manifest

    base = tmp_path_factory.mktemp("compare")
    a, b = base / "run_a", base / "run_b"
    shutil.copytree(run_dir, a, ignore=shutil.ignore_patterns("eval", "baskets"))
    records = read_jsonl(RunLayout(a).pairs("train"))
    gone = select.top_suspects(np.load(RunLayout(a).suspect), COMPARE_BASKET)
    baskets.add_rows(RunLayout(a), "sus", records, gone, "suspect", "suspects")
    keep = np.setdiff1d(np.arange(len(records)), gone)
    images, tokens = tensors["train"]
    models = train.train_ensemble(images[keep], tokens[keep], SMALL_TRAIN, base / "models")
    cfg = replace(open_manifest(a).config, checkpoints=[str(p) for p in models])
    kept = PairSet([pairs[0].records[i] for i in keep], pairs[0].root)
    build(kept, PairSet(pairs[1].records[COMPARE_SKIPPED_VAL:], pairs[1].root), cfg, b)
    return a, b
