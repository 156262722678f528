"""The demo build on the local executor and on Ray (1 and 2 workers), the cost of each kind of
unit, and an estimate for a million pairs with a ViT-B/32 on 8 GPUs.

Builds the default demo run (3000 train / 300 val pairs, 4 x trakview-tiny; world and ensemble
made once in --demo) with each executor, alternating them in every repeat. Ray runs on a cluster
started here before the builds (its start is timed on its own), with ``num_cpus`` 1 or 2 and one
CPU per task; ``RAY_worker_niceness=0`` so that its workers compete with the other jobs of this
shared machine on equal terms (Ray lowers its workers' priority by default). The per-unit costs
come from the runs' manifests (``units``); the estimate combines them with the GPU throughput
measured in the ``bench_gpu`` section of BENCHMARKS.md.

    python bench/bench_ray.py [--demo DIR] [--repeats 2] [--results JSON] [--from-json]
    python bench/bench_ray.py --quick --repeats 1   # a small demo, to check the script; no write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from bench_common import (
    QUICK_DEMO,
    QUICK_DEMO_DIR,
    arguments,
    machine,
    read_section,
    warm_up,
    write_section,
)
from engine import demo, files
from engine.assemble.executors import Executor, LocalExecutor, RayExecutor
from engine.assemble.orchestrate import build
from engine.attribution.gradients import select_parameters
from engine.attribution.projection import projector_for
from engine.attribution.settings import BuildConfig
from engine.data.pairs import read_pairs
from engine.models.checkpoints import read_state_dict
from engine.models.factory import create
from engine.run.layout import SCORES, RunLayout
from engine.run.manifest import open_manifest

os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet that ray.init starts

CONFIGS = {  # label: (executor, torch threads of the driver, Ray CPUs)
    "local (2 threads)": ("local", 2, 0),
    "local (1 thread)": ("local", 1, 0),
    "ray, 1 worker": ("ray", 1, 1),
    "ray, 2 workers": ("ray", 1, 2),
}
KINDS = (
    "embed",
    "gather-embed",
    "featurize",
    "xtx",
    "features",
    "gather-trak",
    "targets",
    "gather-targets",
    "scores",
    "gather-scores",
)


def kind_of(unit: str) -> str:
    return next(k for k in sorted(KINDS, key=len, reverse=True) if unit.startswith(k))


def build_once(label: str, train, val, cfg, folder: Path) -> dict:
    kind, threads, cpus = CONFIGS[label]
    torch.set_num_threads(threads)
    executor: Executor = LocalExecutor(jobs=1)  # this process, as labelled
    cluster_s = 0.0
    if kind == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
        cluster_s = time.perf_counter() - t0
        executor = RayExecutor()
    out = folder / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    t0 = time.perf_counter()
    try:
        build(train, val, cfg, out, overwrite=True, executor=executor)
    finally:
        if kind == "ray":
            ray.shutdown()
    wall = time.perf_counter() - t0
    manifest = open_manifest(out)
    shutil.rmtree(out)
    return {
        "wall": wall,
        "graph": manifest.executor["graph_seconds_this_session"],
        "cluster": cluster_s,
        "units": manifest.units,
        "load": os.getloadavg()[0],
    }


def per_kind(units: list[dict]) -> dict[str, dict[str, float]]:
    """Per kind of unit: count, median seconds, total seconds and pairs."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for u in units:
        groups[kind_of(u["unit"])].append(u)
    return {
        k: {
            "n": len(g),
            "median": statistics.median(u["seconds"] for u in g),
            "total": sum(u["seconds"] for u in g),
            "pairs": sum(u.get("pairs", 0) for u in g),
        }
        for k, g in groups.items()
    }


def gpu_numbers() -> dict[str, float | str]:
    """ViT-B-32 throughput on one GPU from the bench_gpu section (or stated assumptions)."""
    body = read_section("bench_gpu")
    gpu = re.search(r"NVIDIA [^,;]+", body)
    feat = re.search(r"\| ViT-B-32 \| demo \| sketch \| 1024 \| 64 \| no \| (\d+) \|", body)
    worst = re.search(r"\| ViT-B-32 \| random \| sketch \| 1024 \| 64 \| no \| (\d+) \|", body)
    emb = re.search(
        r"\| fp32 \(engine(\.models)?\.embed\.encode\) \| 256 \| (\d+) \| (\d+) \|", body
    )
    if not (feat and worst and emb):
        return {
            "source": "assumed (no bench_gpu section): refresh with bench/bench_gpu.py",
            "gpu": "an H100-class GPU",
            "featurize": 200.0,
            "featurize_worst": 50.0,
            "images": 3000.0,
            "captions": 5000.0,
        }
    return {
        "source": "measured, BENCHMARKS.md section bench_gpu",
        "gpu": gpu.group(0).strip() if gpu else "the bench_gpu GPU",
        "featurize": float(feat.group(1)),
        "featurize_worst": float(worst.group(1)),
        "images": float(emb.group(2)),
        "captions": float(emb.group(3)),
    }


def setup_costs(folder: Path) -> dict[str, float]:
    """What every unit pays before its work at ViT-B-32 scale, measured on this CPU: the model,
    its weights from disk, and the run's 1M-line train.jsonl."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bundle = create("ViT-B-32")
    create_s = time.perf_counter() - t0
    ckpt = folder / "vitb32.pt"
    torch.save(bundle.model.state_dict(), ckpt)
    t0 = time.perf_counter()
    read_state_dict(ckpt)
    weights = time.perf_counter() - t0
    cfg = BuildConfig(checkpoints=["-"], proj_dim=1024, projector="sketch")
    names = select_parameters(bundle.model, "all")
    t0 = time.perf_counter()
    warm_up(projector_for(bundle.model, cfg, names))  # the sketch's buckets and signs
    sketch = time.perf_counter() - t0
    size_mb = ckpt.stat().st_size / 2**20
    ckpt.unlink()
    pairs = RunLayout(folder).pairs("train")
    files.write_jsonl(
        pairs,
        ({"id": f"p{i:07d}", "caption": f"a photo {i}", "image": f"{i}.jpg"} for i in range(10**6)),
    )
    t0 = time.perf_counter()
    read_pairs(pairs)
    read = time.perf_counter() - t0
    pairs.unlink()
    return {
        "create": create_s,
        "weights": weights,
        "weights_mb": size_mb,
        "sketch": sketch,
        "pairs": read,
    }


def estimate(gpu: dict, setup: dict) -> tuple[str, float]:
    """The 1M-pair, ViT-B/32, 8-GPU estimate as a markdown table, and its total hours."""
    n, n_val, m, k, gpus, shard = 1_000_000, 10_000, 4, 1024, 8, 20_000
    storage = 1.0  # GB/s aggregate read or write of the shared run directory (assumed)
    shards = math.ceil(n / shard)
    per_scores = max(1, min(shard, 2**28 // n))
    score_units = math.ceil(n_val / per_scores)
    gb = 1e9
    # what a unit of each kind pays before its work (WorkContext: pairs, model, weights, sketch)
    model = setup["create"] + setup["weights"] + setup["pairs"]
    rows = [
        # phase, units, setup s per unit, GPU-seconds of work, storage seconds (serial)
        (
            "embed (images + captions)",
            m * (shards + 1),
            model,
            m * (n + n_val) * (1 / gpu["images"] + 1 / gpu["captions"]),
            0.0,
        ),
        (
            "featurize (demo-like captions)",
            m * shards,
            model + setup["sketch"],
            m * n / gpu["featurize"],
            0.0,
        ),
        ("targets", m, model + setup["sketch"], m * n_val / gpu["featurize"], 0.0),
        (
            "X^T X reduce + features",
            m * (shards + 1),
            0.0,
            m * shards * 0.5,
            m * 2 * n * k * 4 / gb / storage,
        ),
        (
            "gathers (trak/, embeddings)",
            m * 3,
            setup["pairs"],
            0.0,
            m * 3 * 2 * n * k * 4 / gb / storage,
        ),
        (
            f"scores ({per_scores} targets per unit)",
            score_units,
            setup["create"] + setup["pairs"],
            score_units * 1.0,
            score_units * m * n * k * 4 / gb / storage,
        ),
        (
            f"gather-scores (40 GB {SCORES})",
            1,
            setup["pairs"],
            0.0,
            2 * n * n_val * 4 / gb / storage,
        ),
    ]
    lines = [
        "| phase | units | GPU work s | per-unit setup s | storage s | wall on 8 GPUs, min |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total = 0.0
    for phase, units, unit_setup, work, io in rows:
        setup_s = units * unit_setup
        wall = (work + setup_s) / gpus + io
        total += wall
        lines.append(
            f"| {phase} | {units} | {work:,.0f} | {setup_s:,.0f} | {io:,.0f} | {wall / 60:.1f} |"
        )
    worst = m * n / gpu["featurize_worst"] / gpus
    lines.append(f"| **total** | | | | | **{total / 60:.0f}** |")
    notes = (
        f"Assumptions: {m} checkpoints, n_val {n_val:,}, proj_dim {k} (the default at this size), "
        f"--shard-size {shard:,} ({shards} training shards per checkpoint), one unit per GPU "
        f"(--gpus-per-task 1), GPU throughput of {gpu['gpu']} ({gpu['source']}: featurize "
        f"{gpu['featurize']:.0f} pairs/s with demo captions, sketch projector, batch 64; embedding "
        f"{gpu['images']:.0f} images/s and {gpu['captions']:.0f} captions/s in float32), shared "
        f"storage at {storage:.0f} GB/s in all (not measured; the storage column is serial), "
        f"0.5 GPU-s per features unit and 1 GPU-s per scores unit of compute (float64 solve, "
        f"matmul; not measured). Per-unit setup measured here on one CPU thread: ViT-B-32 "
        f"creation {setup['create']:.1f} s, its {setup['weights_mb']:.0f} MB weights "
        f"{setup['weights']:.1f} s, its sketch projection (buckets and signs of every "
        f"parameter, drawn on the CPU) {setup['sketch']:.1f} s, reading a 1M-line train.jsonl "
        f"{setup['pairs']:.1f} s (a unit reads the run's pairs): {model + setup['sketch']:.1f} s "
        f"for a featurize unit. With captions that "
        f"miss the token-block cache (bench_gpu *random*: {gpu['featurize_worst']:.0f} pairs/s) "
        f"featurize alone takes {worst / 3600:.1f} h."
    )
    return "\n".join(lines) + "\n\n" + notes, total / 3600


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--demo", type=Path, help="default: TMP/tv-ray-demo (--quick: its own)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--results", type=Path, default=Path(tempfile.gettempdir()) / "bench_ray.json"
    )
    parser.add_argument("--from-json", action="store_true", help="only write the section")
    parser.add_argument("--note", default="", help="a paragraph added to the section")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the small demo world of bench_eval --quick, its final checkpoints (implies --no-write)",
    )
    args = parser.parse_args()
    cfg_demo = replace(QUICK_DEMO, snapshots=1) if args.quick else demo.DemoConfig()
    if args.demo is None:
        args.demo = QUICK_DEMO_DIR if args.quick else Path(tempfile.gettempdir()) / "tv-ray-demo"
    if not args.from_json:
        measure(args, cfg_demo)
    saved = json.loads(args.results.read_text())
    if "setup" not in saved:  # measurement stopped early: the builds saved so far
        with tempfile.TemporaryDirectory() as tmp:
            saved["setup"] = setup_costs(Path(tmp))
        saved["load_end"] = os.getloadavg()[0]
        saved["repeats"] = 1 + max(b["repeat"] for b in saved["builds"])
        args.results.write_text(json.dumps(saved))
    write(saved, args.note, args.no_write or args.quick)


def measure(args: argparse.Namespace, cfg_demo: demo.DemoConfig) -> None:
    """Runs the builds, saving every result to --results as it comes."""
    saved = {"load_start": os.getloadavg()[0], "repeats": args.repeats, "builds": []}
    train, val = demo.make_world(cfg_demo, args.demo / "data")
    checkpoints = demo.train_models(cfg_demo, train, args.demo / "models")
    cfg = BuildConfig(
        model=cfg_demo.model, checkpoints=[str(p) for p in checkpoints], seed=cfg_demo.seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for label in CONFIGS:
                res = build_once(label, train, val, cfg, Path(tmp))
                saved["builds"].append({"repeat": r, "label": label, **res})
                args.results.write_text(json.dumps(saved))
                print(f"repeat {r}: {label}: {res['wall']:.1f} s, load {res['load']:.1f}")
        saved["setup"] = setup_costs(Path(tmp))
    saved["load_end"] = os.getloadavg()[0]
    args.results.write_text(json.dumps(saved))


def write(saved: dict, note: str = "", no_write: bool = False) -> None:
    """The bench_ray section of BENCHMARKS.md from the saved results."""
    import ray

    results: dict[str, list[dict]] = defaultdict(list)
    for b in saved["builds"]:
        results[b["label"]].append(b)
    repeats = saved["repeats"]
    local_of = {r["repeat"]: r["wall"] for r in results["local (2 threads)"]}
    rows = []
    for label, runs in results.items():
        walls = [r["wall"] for r in runs]
        each = ", ".join(f"{r['wall']:.0f} ({r['load']:.1f})" for r in runs)
        ratio = statistics.median(local_of[r["repeat"]] / r["wall"] for r in runs)
        rows.append(
            f"| {label} | {each} | {min(walls):.1f} | {statistics.median(walls):.1f} | "
            f"{min(r['graph'] for r in runs):.1f} | "
            f"{statistics.median(r['cluster'] for r in runs):.1f} | {ratio:.2f}x |"
        )
    # per-unit costs from the least loaded repeat of each executor
    quiet = {label: min(runs, key=lambda r: r["load"]) for label, runs in results.items()}
    kinds = {label: per_kind(run["units"]) for label, run in quiet.items()}
    unit_rows = []
    for kind in KINDS:
        local, local1, ray1 = (kinds[c].get(kind) for c in list(CONFIGS)[:3])
        if not local:
            continue
        per_pair = f"{1000 * local['total'] / local['pairs']:.2f}" if local["pairs"] else "-"
        unit_rows.append(
            f"| {kind} | {local['n']} | {local['median']:.3f} | {per_pair} | "
            f"{local1['median']:.3f} | {ray1['median']:.3f} | "
            f"{ray1['median'] - local1['median']:+.3f} |"
        )
    table, hours = estimate(gpu_numbers(), saved["setup"])
    body = f"""### Scaling out: the demo build on Ray

`python bench/bench_ray.py --repeats {repeats}`: the default demo build (3000 train / 300 val pairs, 4 x trakview-tiny, proj_dim 512, sketch projector, default --shard-size: one shard per checkpoint, 38 units) with each executor; {repeats} repeats, the executors alternating within each repeat. {machine()}. Ray {ray.__version__} on a local cluster started before each build (*cluster start*, not in the build time), one CPU and one torch thread per task, `RAY_worker_niceness=0`. Load average {saved["load_start"]:.1f} at the start, {saved["load_end"]:.1f} at the end, and after each build in parentheses: other jobs share the 2 cores, so builds of one repeat compare with each other (*speed vs local*: median over repeats of the ratio within a repeat), and the least loaded build is the best measure of each executor.

| executor | build s (load) per repeat | min s | median s | graph of units, min s | cluster start s | speed vs local |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

*build*: `engine.assemble.orchestrate.build` from start to manifest (pairs check, units, top-k, ensemble, self-influence, indexes); *graph*: the units alone. {note}

**Per-unit costs** (least loaded build of each executor; median seconds per unit; per pair: the unit kind's total seconds / its pairs, in ms: an embed unit's images of one split, a featurize unit's training pairs of one checkpoint, a targets unit's validation pairs, a scores unit's validation pairs over all checkpoints). *Ray overhead*: a unit on a Ray worker minus the same unit in-process, both on one thread: the task makes its own model, weights, pairs and projection (the local executor keeps them between units).

| unit | per build | local, 2 threads s | ms per pair | local, 1 thread s | ray, 1 worker s | ray overhead s |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(unit_rows)}

**Estimate: 1M training pairs, ViT-B/32, 8 GPUs** (about {hours:.1f} h for the graph of units):

{table}

Not in the table: the stages the driver runs after the units. `ensemble` computes each split's caption ranks from an (n, n) similarity matrix (`embed.caption_ranks`): 4 TB at 1M pairs, so a 1M-pair build cannot finish until it is computed in blocks (O(n^2 d): about 2e15 FLOP, minutes on a GPU, hours on the driver's CPU); self-influence reads X and the features in blocks (32 GB); the TRAK index holds 1M x 4096 float32 (16 GB) in memory to train IVF. On this machine (2 cores) Ray cannot beat the in-process build: both use the same 2 cores, and each Ray task pays its own setup; the point of Ray is more machines.
"""
    print(body)
    if not no_write:
        write_section("bench_ray", body)


if __name__ == "__main__":
    main()
