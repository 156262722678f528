"""How the costs grow with the training set: 10k, 100k and 1M training pairs, 5k validation pairs.

Runs of the real shape are made with synthetic TRAK features (Gaussian, M checkpoints x k
dimensions, as a build of a tiny model would store them), synthetic embeddings and a pool of
demo images, then go through the build's own scoring stage (its ``scores`` and
``gather-scores`` units, in a child process whose peak memory is measured) and derived stages,
in the top-k form (no dense ``scores.npy``). A real build at 100k is measured separately
(``--real RUN``, a run built by ``trakview demo --n-train 100000 ...``). Then per run:

- disk: every file of the run, and the dense ``scores.npy`` it would have needed;
- one new query (`QueryEngine.query`, two tiny random-init checkpoints: the gradient, and the
  scan of every training pair's features), median of repeats, with the scan's read bandwidth
  against the machine's (a plain read of the same bytes);
- the dashboard in headless Chromium (`trakview serve`): the first load of Explore, and a
  selection (a click on another pair in the picker) until the page stops running, median;
  the server's resident memory after them.

    python bench/bench_scale.py --sizes 10000,100000,1000000 [--real DIR] [--phase make|measure]
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import arguments, machine, md_table, run_child, write_section
from engine import files
from engine.assemble import derive
from engine.attribution.settings import BuildConfig
from engine.data import synthetic
from engine.data.pairs import save_pairs
from engine.models.factory import create
from engine.run.health import health
from engine.run.layout import MODALITIES, RunLayout
from engine.run.manifest import CheckpointEntry, Counts, Manifest, write_manifest

N_VAL = 5000
M, K, D = 2, 512, 64  # checkpoints, projection dimension, embedding dimension of trakview-tiny
POOL = 256  # distinct images the records point at
ROWS = 100_000  # rows generated at a time

SCORING = (
    "import json, sys, torch; from pathlib import Path\n"
    "from engine.attribution.settings import BuildConfig\n"
    "from engine.assemble import graph, units\n"
    "from engine.assemble.context import WorkContext\n"
    "torch.set_num_threads(2)\n"
    "out = Path(sys.argv[2]); cfg = BuildConfig(**json.loads(sys.argv[3]))\n"
    "ctx = WorkContext(out, cfg)\n"
    "n_train, n_val = int(sys.argv[4]), int(sys.argv[5])\n"
    "for unit in graph.plan(n_train, n_val, len(cfg.checkpoints), cfg.shard_size):\n"
    "    if unit.kind in ('scores', 'gather-scores'):\n"
    "        units.run_unit(unit, ctx)\n"
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write_rows(path: Path, n: int, width: int, make, dtype=np.float32) -> None:
    with files.atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, "w+", dtype, (n, width))
        for s in range(0, n, ROWS):
            out[s : s + ROWS] = make(min(ROWS, n - s))
        out.flush()
        del out


def synthesize(out: Path, n_train: int, work: Path) -> tuple[Path, BuildConfig]:
    """A run directory of the real shape with synthetic features; returns it and its config."""
    layout = RunLayout(out / "run")
    rng = np.random.default_rng(n_train)
    world = synthetic.generate_world(synthetic.WorldConfig(n_train=POOL, n_val=30, seed=1))
    save_pairs(out, "pool", world.train, world.train_images)
    for split, n in (("train", n_train), ("val", N_VAL)):
        files.write_jsonl(
            layout.pairs(split),
            (
                {
                    "id": f"{split[0]}{i:07d}",
                    "caption": world.train[i % POOL]["caption"],
                    "image": f"../images/pool/{world.train[i % POOL]['id']}.png",
                }
                for i in range(n)
            ),
        )
    checkpoints = []
    for m in range(M):
        path = work / f"random-{m}.pt"
        torch.save(create("trakview-tiny", seed=m).model.state_dict(), path)
        checkpoints.append(str(path))
    for split, n in (("train", n_train), ("val", N_VAL)):
        per = {mod: [] for mod in MODALITIES}
        for m in range(M):
            for mod in MODALITIES:
                path = layout.checkpoint_embeddings(split, mod, m)
                _write_rows(path, n, D, lambda r: _unit(rng, r, D))
                per[mod].append(path)
        for mod in MODALITIES:
            parts = [np.load(p, mmap_mode="r") for p in per[mod]]
            _write_rows(
                layout.embeddings(split, mod),
                n,
                M * D,
                _Concat(parts, M).rows,
            )
        files.save_npy(layout.clip_sim(split), rng.uniform(-0.1, 0.5, n).astype(np.float32))
        files.save_npy(layout.margin(split), rng.normal(-5, 1, n).astype(np.float32))
        files.save_npy(layout.caption_rank(split), rng.integers(1, n, n).astype(np.int32))

    def gaussian(r: int, width: int = K) -> np.ndarray:
        return rng.standard_normal((r, width), dtype=np.float32) / np.sqrt(width)

    for m in range(M):
        _write_rows(layout.trak_features(m), n_train, K, gaussian)
        _write_rows(
            layout.trak_out_to_loss(m),
            n_train,
            1,
            lambda r: rng.uniform(0.2, 1, (r, 1)).astype(np.float32),
        )
        _write_rows(layout.trak_target_grads(m), N_VAL, K, gaussian)
    files.save_npy(layout.self_influence, rng.gamma(2.0, 1.0, n_train).astype(np.float32))
    files.save_npy(layout.suspect, rng.random(n_train).astype(np.float32))
    cfg = BuildConfig(
        checkpoints=checkpoints,
        proj_dim=K,
        grad_params="no-token-embedding",
        projector="sketch",
        topk=100,
        scores="topk",
        shard_size=20_000,
        workers=0,
    )
    return layout.root, cfg


class _Concat:
    """Row blocks of the ensemble embedding: each checkpoint's / sqrt(M), side by side."""

    def __init__(self, parts: list[np.ndarray], m: int) -> None:
        self.parts, self.m, self.at = parts, m, 0

    def rows(self, r: int) -> np.ndarray:
        block = np.concatenate([p[self.at : self.at + r] for p in self.parts], axis=1)
        self.at += r
        return (block / np.sqrt(self.m)).astype(np.float32)


def finish(run: Path, cfg: BuildConfig, n_train: int) -> dict:
    """The scoring stage in a child process (time, peak memory), then what the build derives."""
    from dataclasses import asdict

    layout = RunLayout(run)
    scoring = run_child(SCORING, str(run), json.dumps(asdict(cfg)), str(n_train), str(N_VAL))
    t0 = time.perf_counter()
    derive.write_similar(layout, cfg.topk)
    similar = time.perf_counter() - t0
    manifest = Manifest(
        config=cfg,
        counts=Counts(n_train, N_VAL, M, K, M * D),
        checkpoints=[CheckpointEntry(p, "synthetic") for p in cfg.checkpoints],
        health={"retrieval": health(layout, M)},
    )
    write_manifest(layout, manifest)
    return {
        "scoring_s": scoring["seconds"],
        "scoring_mib": max(scoring["main_mib"], scoring["worker_mib"]),
        "similar_s": similar,
    }


def measure(run: Path, repeats: int = 5) -> dict:
    """One new query (median), the scan's bandwidth, and the dashboard in Chromium."""
    from bench_dashboard import measure as browse

    from engine.explore.query import QueryEngine

    engine = QueryEngine.load(run).warm()
    val = engine.val[0]
    image = engine.image_path(val["image"])
    times, scans = [], []
    for _ in range(repeats + 1):  # the first warms the page cache
        t0 = time.perf_counter()
        result = engine.query(image, val["caption"], k=10)
        times.append(time.perf_counter() - t0)
        scans.append(result.timings["search"])
    scanned = sum(RunLayout(run).trak_features(m).stat().st_size for m in range(engine.n_models))
    t0 = time.perf_counter()
    for m in range(engine.n_models):  # a plain read of the same bytes, from the page cache
        features = files.load_npy(RunLayout(run).trak_features(m), mmap=True)
        for s in range(0, len(features), 65536):
            np.asarray(features[s : s + 65536]).sum()
    read = time.perf_counter() - t0
    del engine
    clicks = browse(run, repeats, with_memory=True)
    return {
        "query_s": statistics.median(times[1:]),
        "scan_gbps": scanned / statistics.median(scans[1:]) / 1e9,
        "read_gbps": scanned / read / 1e9,
        "first_load_s": clicks["cold load (first after start)"][0][1],
        "selection_s": statistics.median(c[1] for c in clicks["new selection (click)"]),
        "selection_plots_s": statistics.median(
            c[1] for c in clicks["new selection, plots open (click)"]
        ),
        "server_mib": clicks["server_mib"],
    }


def disk(run: Path) -> dict:
    sizes = {p: p.stat().st_size for p in run.rglob("*") if p.is_file()}
    return {"disk_gib": sum(sizes.values()) / 2**30}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trakview-bench/scale"))
    parser.add_argument("--real", type=Path, help="a real build's run directory (100k)")
    parser.add_argument(
        "--phase",
        choices=("all", "make", "measure"),
        default="all",
        help="make: build the runs and cost them (kept in --work); measure: time queries and "
        "the dashboard on the kept runs (on a quiet machine), then write the table",
    )
    parser.add_argument(
        "--remeasure", action="store_true", help="measure runs measured before again"
    )
    args = parser.parse_args()
    saved = args.work / "results.json"
    results = json.loads(saved.read_text()) if saved.exists() else []
    if args.phase != "measure":
        sizes = [int(x) for x in args.sizes.split(",") if x]
        # runs made before (another --sizes) are kept; those remade now are replaced
        results = [r for r in results if r["n_train"] not in sizes and "synthetic" in r["run"]]
        for n in sizes:
            folder = args.work / f"synthetic-{n}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            t0 = time.perf_counter()
            run, cfg = synthesize(folder, n, folder)
            made = time.perf_counter() - t0
            result = {"run": f"synthetic {n:,}", "n_train": n, "made_s": made}
            result.update(finish(run, cfg, n), path=str(run), **disk(run))
            result["dense_gib"] = n * N_VAL * 4 / 2**30
            print(json.dumps(result), flush=True)
            results.append(result)
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(results, indent=2))  # a size at a time
        if args.real:
            from engine.run.manifest import open_manifest

            manifest = open_manifest(args.real)
            counts = manifest.counts
            results.append(
                {
                    "run": f"real build {counts.n_train:,}",
                    "n_train": counts.n_train,
                    "scoring_s": manifest.timings_seconds.get("scores") or float("nan"),
                    "path": str(args.real),
                    **disk(args.real),
                    "dense_gib": counts.n_train * counts.n_val * 4 / 2**30,
                }
            )
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(results, indent=2))
    if args.phase == "make":
        return
    for result in results:
        if "query_s" in result and not args.remeasure:
            continue  # measured by an earlier --phase measure
        result.update(measure(Path(result["path"])))
        print(json.dumps(result), flush=True)
        saved.write_text(json.dumps(results, indent=2))
    table = md_table(
        (
            "run",
            "scoring stage s",
            "scoring peak MiB",
            "run on disk GiB",
            "dense scores GiB (not stored)",
            "one new query s",
            "scan GB/s (read GB/s)",
            "first load s",
            "selection s (median; plots section closed)",
            "selection s, plots open",
            "server MiB",
        ),
        [
            (
                r["run"],
                f"{r['scoring_s']:.1f}" if "scoring_s" in r else "-",
                f"{r['scoring_mib']:.0f}" if "scoring_mib" in r else "- (not measured)",
                f"{r['disk_gib']:.2f}",
                f"{r['dense_gib']:.1f}",
                f"{r['query_s']:.2f}",
                f"{r['scan_gbps']:.1f} ({r['read_gbps']:.1f})",
                f"{r['first_load_s']:.1f}",
                f"{r['selection_s']:.2f}",
                f"{r['selection_plots_s']:.2f}" if "selection_plots_s" in r else "-",
                f"{r['server_mib']:.0f}",
            )
            for r in results
        ],
    )
    print(table)
    if not args.no_write:
        write_section(
            "bench_scale",
            "### Growing the training set: 10k to 1M pairs, 5k validation pairs (`bench_scale`)\n\n"
            f"Synthetic runs of the real shape (M = {M} checkpoints, k = {K}, trakview-tiny "
            f"embeddings of {D}; Gaussian features) through the build's own scoring stage in the "
            "top-k form; a real build where marked. The query: two tiny random-init "
            "checkpoints, the gradient and the scan of every training pair's features; scan "
            "bandwidth against a plain read of the same bytes. Dashboard: headless Chromium "
            "on `trakview serve`, median of clicks on other pairs until the page is complete, "
            f"with the Explore page's plots section closed (its default) and open. {machine()}.\n\n{table}\n",
        )


if __name__ == "__main__":
    main()
