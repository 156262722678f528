"""Real-size images: a build on 20k generated JPEGs (256-640 px, mixed modes) with a tiny model.

Measures, per build, the images per second of the embedding stage with 0 and 2 DataLoader
workers, the time of every stage, and the peak resident memory of the build's main process and
of its loader workers, for two data-set sizes: the memory of a streamed build must not grow with
the number of images beyond the arrays the run keeps (scores, features, embeddings).

Each build runs in its own process (``trakview build`` on an open_clip_train CSV) so its peak
memory is its own. The JPEGs are generated once into ``--data`` and reused.

    python bench/bench_load.py [--n 20000] [--small 5000] [--val 500] [--data DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench_common import arguments, machine, run_child, write_section
from engine.models.checkpoints import save_checkpoint
from engine.models.factory import create
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest

MODES = ("RGB", "RGB", "RGB", "L", "CMYK", "RGBA")  # RGBA is saved as PNG, the rest as JPEG
WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "star", "cat")


def make_image(n: int, folder: str) -> tuple[str, str]:
    """One generated photo-like image (gradients, shapes, noise), 256-640 px a side."""
    caption = f"a {WORDS[n % 6]} {WORDS[6 + n % 4]} photo number {n}"
    mode = MODES[n % len(MODES)]
    ext = "png" if mode == "RGBA" else "jpg"
    name = f"{n // 1000:03d}/{n:06d}.{ext}"
    path = Path(folder) / "images" / name
    if path.is_file():  # an earlier, interrupted generation made it
        return f"images/{name}", caption
    rng = np.random.default_rng(n)
    w, h = (int(v) for v in rng.integers(256, 641, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-0.4, 0.4, (2, 3))
    pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(30, 160)
    disk = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    pixels[disk] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 12, pixels.shape)
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG" if ext == "png" else "JPEG", quality=90)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(path)
    return f"images/{name}", caption


def make_data(folder: Path, n: int) -> None:
    """Generates ``n`` images with two processes (skipped when already there)."""
    listing = folder / "all.csv"
    if listing.is_file() and len(listing.read_text().splitlines()) - 1 >= n:
        return
    t0 = time.perf_counter()
    with multiprocessing.Pool(2) as pool:
        rows = pool.starmap(make_image, [(i, str(folder)) for i in range(n)], chunksize=200)
    with open(listing, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    size = sum(p.stat().st_size for p in (folder / "images").rglob("*.*")) / 2**20
    print(f"generated {n} images ({size:.0f} MiB) in {time.perf_counter() - t0:.0f} s")


def split(folder: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    """train_N.csv (the first n_train rows) and val.csv (the last n_val rows of all.csv)."""
    with open(folder / "all.csv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    header, body = rows[0], rows[1:]
    paths = []
    for name, part in ((f"train_{n_train}.csv", body[:n_train]), ("val.csv", body[-n_val:])):
        path = folder / name
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(header)
            writer.writerows(part)
        paths.append(path)
    return paths[0], paths[1]


EMBED_CHILD = """
import sys, time
from engine.data.loading import loader
from engine.data.sources import read_source
from engine.models.checkpoints import load_into
from engine.models.embed import encode
from engine.models.factory import create
csv_path, ckpt, workers = sys.argv[2], sys.argv[3], int(sys.argv[4])
pairs = read_source(csv_path)
bundle = create("trakview-tiny")
load_into(bundle.model, ckpt)
t0 = time.perf_counter()
n = 0
chunks = []
for _, x, tokens in loader(pairs, bundle.preprocess, bundle.tokenizer, 256, workers):
    img, txt = encode(bundle.model, x, tokens, batch_size=len(x))
    chunks.append(img.numpy())
    n += len(x)
result = {"seconds": time.perf_counter() - t0, "images": n}
"""


def embed_stage(train: Path, ckpt: Path, workers: int) -> dict:
    """The embedding stage alone (stream, preprocess, encode), in its own process."""
    result = run_child(EMBED_CHILD, str(train), str(ckpt), str(workers))
    result["embed_img_s"] = result["images"] / result["seconds"]
    return result


BUILD_CHILD = "import sys; from engine.cli import app; app(sys.argv[2:], standalone_mode=False)"


def build(train: Path, val: Path, ckpt: Path, out: Path, workers: int) -> dict:
    """``trakview build`` in its own process; its seconds, peak memory, stages and sizes."""
    args = ["build", "--train-data", str(train), "--val-data", str(val), "--checkpoint", str(ckpt)]
    args += ["--out", str(out), "--workers", str(workers), "--overwrite"]
    result = run_child(BUILD_CHILD, *args)
    layout = RunLayout(out)
    stages = {name: layout.read_stage(name) for name in layout.stages()}
    result["stages"] = {k: v.get("seconds") for k, v in stages.items()}
    result["embed_img_s"] = stages["embed-0"]["images_per_second"]
    counts = open_manifest(out).counts
    result["n_train"], result["proj_dim"] = counts.n_train, counts.proj_dim
    arrays = sum(p.stat().st_size for p in out.rglob("*.npy")) + sum(
        p.stat().st_size for p in layout.trak_dir.rglob("*") if p.is_file()
    )
    result["run_arrays_mib"] = arrays / 2**20
    return result


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=int, default=20000, help="training images of the big build")
    parser.add_argument("--small", type=int, default=5000, help="training images, small build")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tv-load")
    parser.add_argument(
        "--full",
        action="store_true",
        help="time whole builds (check, embed, featurize, score); default: the embedding stage",
    )
    args = parser.parse_args()

    args.data.mkdir(parents=True, exist_ok=True)
    make_data(args.data, args.n + args.val)
    ckpt = args.data / "tiny.pt"
    if not ckpt.is_file():
        save_checkpoint(ckpt, create("trakview-tiny", seed=0).model, epoch=0, name="trakview-tiny")
    if not args.full:
        embed_only(args, ckpt)
        return
    rows = []
    work = Path(tempfile.mkdtemp(prefix="tv-load-runs-"))
    try:
        for n, workers in ((args.n, 0), (args.n, 2), (args.small, 2)):
            train, val = split(args.data, n, args.val)
            t0 = time.perf_counter()
            res = build(train, val, ckpt, work / f"run-{n}-{workers}", workers)
            res.update(n=n, workers=workers, load=os.getloadavg()[0], wall=time.perf_counter() - t0)
            rows.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "stages"}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tiny_pixels = 3 * 32 * 32 * 4 / 2**20  # MiB per preprocessed image, trakview-tiny
    header = (
        "| training images | loader workers | check s | embed s | embed img/s | featurize s "
        "| build s | peak RSS main MiB | peak RSS per worker MiB | run arrays MiB |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        st = r["stages"]
        lines.append(
            f"| {r['n_train']:,} | {r['workers']} | {st['pairs']:.0f} | {st['embed-0']:.0f} | "
            f"{r['embed_img_s']:.0f} | {st['featurize-0']:.0f} | {r['seconds']:.0f} | "
            f"{r['main_mib']:.0f} | {r['worker_mib']:.0f} | {r['run_arrays_mib']:.0f} |"
        )
    big0, big2, small2 = rows
    note = (
        f"Machine: {machine()}. `trakview build` on an open_clip_train CSV of generated images "
        f"(256-640 px a side; JPEG in RGB, L and CMYK, PNG in RGBA), {args.val} validation "
        f"images, one random-init trakview-tiny checkpoint, proj_dim {big2['proj_dim']}, "
        "default settings otherwise; each build in its own process. `check` is the pairs "
        "stage (every image opened and fully decoded once), `embed` the embedding stage of "
        "both splits. Load average at the start of each build: "
        + ", ".join(f"{r['load']:.1f}" for r in rows)
        + ".\n\n"
        f"- Embedding stage: {big0['embed_img_s']:.0f} images/s with 0 workers, "
        f"{big2['embed_img_s']:.0f} with 2 ({big2['embed_img_s'] / big0['embed_img_s']:.2f}x).\n"
        f"- Memory: the main process peaked at {small2['main_mib']:.0f} MiB for "
        f"{small2['n_train']:,} images and {big2['main_mib']:.0f} MiB for {big2['n_train']:,} "
        f"(+{big2['main_mib'] - small2['main_mib']:.0f} MiB for 4x the images, while the run's "
        f"own arrays grew by {big2['run_arrays_mib'] - small2['run_arrays_mib']:.0f} MiB). "
        f"Holding the preprocessed images in memory, as the build did before streaming, would "
        f"take {big2['n_train'] * tiny_pixels:.0f} MiB for the tiny model's 32 px inputs and "
        f"{big2['n_train'] * 3 * 224 * 224 * 4 / 2**30:.1f} GiB at ViT-B/32's 224 px.\n"
    )
    text = "\n".join(lines)
    print(text)
    print(note)
    if not args.no_write:
        write_section("bench_load", f"### Real-size images: streaming build\n\n{note}\n{text}\n")


def embed_only(args: argparse.Namespace, ckpt: Path) -> None:
    """0 vs 2 workers at the big size, 2 workers at the small size: images/s and peak memory."""
    rows = []
    for n, workers in ((args.n, 0), (args.n, 2), (args.small, 2), (args.small, 0)):
        train, _ = split(args.data, n, args.val)
        load = os.getloadavg()[0]
        res = embed_stage(train, ckpt, workers)
        res.update(n=n, workers=workers, load=load)
        rows.append(res)
        print(json.dumps(res), flush=True)
    lines = [
        "| images | loader workers | seconds | images/s | peak RSS main MiB "
        "| peak RSS of one worker MiB | load average |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['workers']} | {r['seconds']:.0f} | {r['embed_img_s']:.0f} | "
            f"{r['main_mib']:.0f} | {r['worker_mib'] if r['workers'] else 0:.0f} | "
            f"{r['load']:.1f} |"
        )
    big0, big2, small2, small0 = rows
    tiny_mib = args.n * 3 * 32 * 32 * 4 / 2**20
    note = (
        f"Machine: {machine()}. The build's embedding stage (`engine.data.loading.loader` streaming batches of "
        "256 through the checkpoint's open_clip preprocessing, then `encode`), each setting in its "
        f"own process, over generated images 256-640 px a side (JPEG in RGB, L and CMYK, PNG in "
        "RGBA) listed in an open_clip_train CSV, with one trakview-tiny checkpoint.\n\n"
        f"- {big0['embed_img_s']:.0f} images/s with 0 workers, {big2['embed_img_s']:.0f} with 2 "
        f"({big2['embed_img_s'] / big0['embed_img_s']:.2f}x, same run).\n"
        f"- Peak memory of the main process: {small2['main_mib']:.0f} MiB for "
        f"{args.small:,} images and {big2['main_mib']:.0f} MiB for {args.n:,} with 2 workers "
        f"({small0['main_mib']:.0f} and {big0['main_mib']:.0f} MiB with none), the embeddings "
        f"kept being {args.n * 64 * 4 / 2**20:.0f} MiB at {args.n:,}. Holding the preprocessed "
        f"images, as builds did before streaming, would take {tiny_mib:.0f} MiB at 32 px and "
        f"{args.n * 3 * 224 * 224 * 4 / 2**30:.1f} GiB at ViT-B/32's 224 px.\n"
        "- Caveat: other jobs shared the 2 cores (load average column), so the absolute rates "
        "are low and the worker speed-up is understated; on 2 cores the main process's own "
        "torch threads also compete with the workers.\n"
    )
    text = "\n".join(lines)
    print(text)
    print(note)
    if not args.no_write:
        write_section(
            "bench_load", f"### Real-size images: the streamed embedding stage\n\n{note}\n{text}\n"
        )


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    main()
