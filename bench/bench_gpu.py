"""The CUDA path on one GPU: CPU vs CUDA score agreement, featurize and embedding throughput.

On a CUDA machine it measures and writes a JSON file (after every measurement, so a run cut
short keeps what it measured), then the BENCHMARKS.md section ``bench_gpu``:

    python bench/bench_gpu.py --out gpu.json [--budget-s 360]
    python bench/bench_gpu.py --from-json gpu.json     # only the BENCHMARKS.md section

1. Agreement: a small generated world, a tiny two-member ensemble, the same build on CPU and on
   CUDA (``BuildConfig(device=...)``, grad_params all, same projector), compared per validation
   pair (Pearson of the score columns, top-10 overlap).
2. Featurize throughput per checkpoint (pairs/s) through the build's own path (the TRAKer of
   ``engine.assemble.context.WorkContext``, batches handed over as a featurize unit does, CPU
   batches moved per batch), for trakview-tiny and ViT-B-32 (random init, no download),
   grad_params all: median of repeats after a warm-up, peak GPU memory.
3. Embedding throughput of ViT-B-32 (``engine.models.embed.encode``; also TF32 and bf16
   autocast).

Without a GPU, ``--smoke-cpu`` runs everything at tiny sizes on CPU to check the script itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_common import InMemoryWork, arguments, machine, train_on, warm_up, write_section

RESULTS: dict[str, Any] = {}
OUT: Path | None = None
T0 = time.perf_counter()
BUDGET = 1e9
DEVICE = "cuda"  # --smoke-cpu runs everything small on CPU to check the script itself
SMOKE = False


def save() -> None:
    if OUT is not None:
        OUT.write_text(json.dumps(RESULTS, indent=1, default=str))


def left() -> float:
    return BUDGET - (time.perf_counter() - T0)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


# --- 1. agreement -----------------------------------------------------------------------------


def _agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict[str, float]:
    corr = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]
    overlap = [
        len(set(np.argsort(-a[:, j])[:k]) & set(np.argsort(-b[:, j])[:k])) / k
        for j in range(a.shape[1])
    ]
    return {
        "pearson_min": float(np.min(corr)),
        "pearson_median": float(np.median(corr)),
        f"top{k}_overlap_mean": float(np.mean(overlap)),
        f"top{k}_overlap_min": float(np.min(overlap)),
        "finite": bool(np.isfinite(a).all() and np.isfinite(b).all()),
    }


def agreement(tmp: Path, n_train: int, n_val: int) -> None:
    from engine import demo, files
    from engine.assemble.orchestrate import build
    from engine.attribution.settings import BuildConfig
    from engine.models.train import TrainConfig
    from engine.run.layout import RunLayout
    from engine.run.manifest import open_manifest

    tr, va = demo.make_world(demo.DemoConfig(n_train=n_train, n_val=n_val, seed=1), tmp / "world")
    t = time.perf_counter()
    ckpts = train_on(
        tr,
        TrainConfig(members=2, epochs=2 if SMOKE else 6, batch_size=100, warmup_steps=10),
        tmp / "models",
    )
    RESULTS["agreement_setup"] = {
        "n_train": n_train,
        "n_val": n_val,
        "members": 2,
        "epochs": 6,
        "train_seconds": round(time.perf_counter() - t, 1),
    }
    runs: dict[str, np.ndarray] = {}
    timing: dict[str, Any] = {}
    for label, kw in (
        ("cpu-gaussian", {"device": "cpu", "projector": "gaussian"}),
        ("cuda-gaussian", {"device": DEVICE, "projector": "gaussian"}),
        (
            "cuda-gaussian-half",
            {"device": DEVICE, "projector": "gaussian", "half": DEVICE != "cpu"},
        ),
        ("cpu-sketch", {"device": "cpu", "projector": "sketch"}),
        ("cuda-sketch", {"device": DEVICE, "projector": "sketch"}),
    ):
        cfg = BuildConfig(checkpoints=[str(p) for p in ckpts], grad_params="all", topk=20, **kw)
        t = time.perf_counter()
        run = build(tr, va, cfg, tmp / label)
        manifest = open_manifest(run)
        timing[label] = {
            "build_seconds": round(time.perf_counter() - t, 2),
            "featurize_seconds": sum(
                v for k, v in manifest.timings_seconds.items() if k.startswith("featurize")
            ),
            "projection": manifest.projection,
            "proj_dim": manifest.counts.proj_dim,
        }
        runs[label] = files.load_npy(RunLayout(run).scores)
        print(label, timing[label], flush=True)
    RESULTS["agreement_builds"] = timing
    RESULTS["agreement"] = {
        "cuda vs cpu, gaussian, float32": _agreement(runs["cuda-gaussian"], runs["cpu-gaussian"]),
        "cuda half vs cpu, gaussian": _agreement(runs["cuda-gaussian-half"], runs["cpu-gaussian"]),
        "cuda vs cpu, sketch": _agreement(runs["cuda-sketch"], runs["cpu-sketch"]),
        "cpu sketch vs cpu gaussian (another JL map, for scale)": _agreement(
            runs["cpu-sketch"], runs["cpu-gaussian"]
        ),
    }
    print(json.dumps(RESULTS["agreement"], indent=1), flush=True)
    save()


# --- 2. featurize throughput ------------------------------------------------------------------


class Inputs:
    """Images (CPU, as the build holds them), tokens, and the checkpoint's train embeddings."""

    def __init__(self, bundle: Any, n: int, captions: str, seed: int = 0) -> None:
        from engine.data import synthetic

        gen = torch.Generator().manual_seed(seed)
        size = bundle.image_size
        self.images = torch.randn(n, 3, size, size, generator=gen)
        if captions == "demo":
            world = synthetic.generate_world(
                synthetic.WorldConfig(n_train=max(n, 50), n_val=10, seed=seed)
            )
            texts = [r["caption"] for r in world.train][:n]
            self.tokens = bundle.tokenizer(texts)
        else:  # "random": 12 tokens drawn uniformly from the vocabulary (worst case for the
            # token-block cache; real captions repeat tokens Zipf-like, in between)
            ctx = bundle.context_length
            tok = torch.zeros(n, ctx, dtype=torch.long)
            tok[:, 0] = 49406
            tok[:, 1:13] = torch.randint(1, 49405, (n, 12), generator=gen)
            tok[:, 13] = 49407
            self.tokens = tok
        with torch.no_grad():
            out = bundle.model(
                self.images[:256].to(next(bundle.model.parameters()).device),
                self.tokens[:256].to(next(bundle.model.parameters()).device),
            )
        d = out[0].shape[1]
        emb = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
        self.img_emb, self.txt_emb = emb, torch.roll(emb, 1, 0)


_PROJECTORS: dict[tuple, Any] = {}


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA matmuls in TF32 inside the block (torch's default is off)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def featurize_rate(
    bundle: Any,
    inputs: Inputs,
    *,
    proj_dim: int,
    projector: str,
    batch: int,
    half: bool,
    n_batches: int,
    repeats: int,
    sim_batch: int = 256,
    breakdown: bool = True,
    grad_params: str = "all",
) -> dict[str, Any]:
    from engine.attribution.settings import BuildConfig

    model = bundle.model
    n = batch * n_batches
    images, tokens = inputs.images[:n], inputs.tokens[:n]
    cfg = BuildConfig(
        model=bundle.name,
        device=DEVICE,
        proj_dim=proj_dim,
        projector=projector,
        half=half,
        grad_params=grad_params,
        sim_batch_size=sim_batch,
        batch_size=batch,
    )
    work = InMemoryWork(cfg, bundle, inputs.img_emb[:n], inputs.txt_emb[:n])
    key = (bundle.name, proj_dim, projector, grad_params)
    t = time.perf_counter()
    if key not in _PROJECTORS:  # kept for the next settings (ViT-B-32's sketch takes a while)
        _PROJECTORS.clear()
        torch.cuda.empty_cache()
        _PROJECTORS[key] = work.projector  # the build's projector_for
        warm_up(_PROJECTORS[key], DEVICE)  # the matrix / the sketch's buckets, now
    work.projector = proj = _PROJECTORS[key]
    setup = time.perf_counter() - t
    state = model.state_dict()
    reset_peak()
    times = []
    traker = work.traker(n)
    for r in range(repeats + 1):  # the first is the warm-up
        sync()
        t = time.perf_counter()
        work.featurize(traker, state, r, images, tokens)
        sync()
        times.append(time.perf_counter() - t)
    parts: dict[str, float] = {}
    if breakdown:  # one more pass, each step synchronised and timed (slightly slower)
        comp = traker.gradient_computer
        parts = {"sim_draw": 0.0, "grad": 0.0, "project": 0.0, "out_to_loss": 0.0}
        for s in range(0, n, batch):
            inds = list(range(s, min(n, s + batch)))
            t = time.perf_counter()
            b = (images[inds], tokens[inds], work.sim.for_train(inds, 0))
            parts["sim_draw"] += time.perf_counter() - t
            sync()
            t = time.perf_counter()
            g = comp.compute_per_sample_grad(b)
            sync()
            parts["grad"] += time.perf_counter() - t
            t = time.perf_counter()
            proj.project(g, model_id=0)
            sync()
            parts["project"] += time.perf_counter() - t
            del g
            t = time.perf_counter()
            comp.compute_loss_grad(b)
            sync()
            parts["out_to_loss"] += time.perf_counter() - t
        parts = {k: round(v / n * 1e3, 4) for k, v in parts.items()}  # ms per pair
    med = statistics.median(times[1:])
    return {
        "pairs": n,
        "pairs_per_s": round(n / med, 1),
        "pairs_per_s_all_repeats": [round(n / x, 1) for x in times[1:]],
        "warmup_pairs_per_s": round(n / times[0], 1),
        "setup_seconds": round(setup, 2),
        "peak_gpu_gib": peak_gib(),
        "ms_per_pair_breakdown": parts,
    }


def featurize_all(quick: bool) -> None:
    from engine.attribution.projection import KeyedProjector
    from engine.models.factory import create

    RESULTS.setdefault("featurize", [])
    n_params = {}
    tiny = [
        {"captions": "demo", "proj_dim": k, "projector": p, "batch": b, "half": h}
        for k in (2048, 1024)
        for p in ("gaussian", "sketch")
        for b in (256, 1024)
        for h in (False, True)
        if not (h and b == 256)
    ]
    vit = [
        {"captions": cap, "proj_dim": k, "projector": "sketch", "batch": b, "half": h}
        for k in (2048, 1024)
        for cap, b, h in (
            ("demo", 32, False),
            ("demo", 64, False),
            ("demo", 128, False),
            ("demo", 64, True),
            ("random", 64, False),
        )
    ]
    vit.append({**vit[-4], "tf32": True})  # proj_dim 1024, batch 64, TF32 matmuls
    plans: list[tuple[str, list[dict[str, Any]]]] = [("trakview-tiny", tiny), ("ViT-B-32", vit)]
    if SMOKE:
        plans = [(n, [{**cfgs[0], "batch": 4, "proj_dim": 64}]) for n, cfgs in plans]
    for name, configs in plans:
        bundle = create(name, seed=0, device=DEVICE)
        n_params[name] = sum(p.numel() for p in bundle.model.parameters())
        big = name != "trakview-tiny"
        n_max = max(c["batch"] for c in configs) * (4 if big else 6)
        inputs = {cap: Inputs(bundle, n_max, cap) for cap in {c["captions"] for c in configs}}
        for c in configs:
            if left() < (40 if big else 15):
                print("budget: skipping", name, c, flush=True)
                continue
            n_batches = max(2, min(4 if big else 6, (512 if big else 4096) // c["batch"]))
            if SMOKE:
                n_batches = 2
            row = {"model": name, "grad_params": "all", **c}
            kw = {k: v for k, v in c.items() if k not in ("captions", "tf32")}
            try:
                with tf32_matmuls(c.get("tf32", False)):
                    row.update(
                        featurize_rate(
                            bundle,
                            inputs[c["captions"]],
                            n_batches=n_batches,
                            repeats=3 if not quick else 2,
                            **kw,
                        )
                    )
            except torch.cuda.OutOfMemoryError as err:
                row["error"] = f"OOM: {str(err).splitlines()[0][:160]}"
            except Exception as err:  # keep measuring the others; the error is reported
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            torch.cuda.empty_cache()
            RESULTS["featurize"].append(row)
            print(json.dumps(row), flush=True)
            save()
        _PROJECTORS.clear()
        del bundle, inputs
        torch.cuda.empty_cache()
    RESULTS["n_params"] = n_params
    # what the dense Gaussian would cost for ViT-B-32 without fast_jl: the (D, k) matrix does not
    # fit (KeyedProjector regenerates every block on CPU, per batch); time one block to say so
    bundle = create("ViT-B-32", seed=0)
    shapes = {n: tuple(p.shape) for n, p in bundle.model.named_parameters()}
    dense = sum(math.prod(s) for n, s in shapes.items() if not n.endswith("token_embedding.weight"))
    proj = KeyedProjector(shapes, "token_embedding.weight", 1024, device="cpu")
    rows = 65_536  # rows of one block (ViT-B-32's largest block has 2.4 M): time per row
    t = time.perf_counter()
    proj._gaussian_cpu(rows, "probe")
    per = (time.perf_counter() - t) / rows
    RESULTS["vit_b32_dense_gaussian"] = {
        "dense_params": dense,
        "matrix_gib_at_k1024": round(dense * 1024 * 4 / 2**30, 1),
        "cpu_generation_seconds_per_batch_at_k1024": round(per * dense, 1),
    }
    save()


# --- 3. embedding throughput ------------------------------------------------------------------


def embedding() -> None:
    from engine.models.embed import encode
    from engine.models.factory import create

    bundle = create("ViT-B-32", seed=0, device=DEVICE)
    model = bundle.model
    n = 16 if SMOKE else 4096
    images = torch.randn(n, 3, 224, 224)
    tokens = bundle.tokenizer(["a photo of a red square on a blue background"] * n)
    rows = []
    for label, ctx in (
        ("fp32 (engine.models.embed.encode)", {}),
        ("fp32 + TF32 matmul", {"tf32": True}),
        ("bf16 autocast", {"bf16": True}),
    ):
        for bs in (8,) if SMOKE else (256, 1024):
            if left() < 10:
                continue
            if SMOKE and ctx.get("bf16"):
                continue
            torch.backends.cuda.matmul.allow_tf32 = bool(ctx.get("tf32"))
            torch.backends.cudnn.allow_tf32 = True  # torch's default
            rates = {}
            for what, x, t in (("images", images, None), ("captions", None, tokens)):
                times = []
                for _r in range(4):
                    sync()
                    t0 = time.perf_counter()
                    with torch.autocast(DEVICE, torch.bfloat16, enabled=bool(ctx.get("bf16"))):
                        encode(model, x, t, batch_size=bs, device=DEVICE)
                    sync()
                    times.append(time.perf_counter() - t0)
                rates[f"{what}_per_s"] = round(n / statistics.median(times[1:]), 1)
            # on-GPU input (no host-to-device copy): the model alone
            x = images[:bs].to(DEVICE)
            times = []
            with torch.no_grad():
                for _r in range(6):
                    sync()
                    t0 = time.perf_counter()
                    with torch.autocast(DEVICE, torch.bfloat16, enabled=bool(ctx.get("bf16"))):
                        model.encode_image(x, normalize=True)
                    sync()
                    times.append(time.perf_counter() - t0)
            rates["images_per_s_input_on_gpu"] = round(bs / statistics.median(times[1:]), 1)
            row = {"variant": label, "batch": bs, **rates}
            rows.append(row)
            print(json.dumps(row), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    RESULTS["embedding"] = rows
    save()


def sim_draw_cost() -> None:
    from engine.attribution.margin import SimulatedBatch

    out = {}
    for n in (10_000, 1_000_000):
        sim = SimulatedBatch(n, 256)
        t = time.perf_counter()
        sim.for_train(range(512), 0)
        out[str(n)] = round((time.perf_counter() - t) / 512 * 1e6, 1)
    RESULTS["sim_draw_us_per_pair_cpu"] = out
    save()


# --- markdown ---------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    env = res.get("env", {})
    lines = [
        "### The CUDA path on one GPU",
        "",
        f"{env.get('machine', '?')}; {env.get('gpu', '')}. "
        f"`python bench/bench_gpu.py --out gpu.json` on the GPU machine, "
        f"`python bench/bench_gpu.py --from-json gpu.json` to write this section. "
        "Median of the repeats after a warm-up pass.",
        "",
    ]
    if "agreement" in res:
        s = res.get("agreement_setup", {})
        lines += [
            f"**CPU vs CUDA scores.** Generated world ({s.get('n_train')} train / {s.get('n_val')} "
            f"val pairs), trakview-tiny ensemble of {s.get('members')} checkpoints, grad_params "
            "all, same settings on both devices; per validation pair: Pearson of the score "
            "columns and overlap of the top-10 positive influencers.",
            "",
            "| compared | Pearson min | Pearson median | top-10 overlap mean | top-10 overlap min |",
            "|---|---:|---:|---:|---:|",
        ]
        for k, v in res["agreement"].items():
            lines.append(
                f"| {k} | {v['pearson_min']:.7f} | {v['pearson_median']:.7f} | "
                f"{v['top10_overlap_mean']:.3f} | {v['top10_overlap_min']:.2f} |"
            )
        lines += [
            "",
            "| build | projection | proj_dim | build s | featurize s |",
            "|---|---|---:|---:|---:|",
        ]
        for k, v in res.get("agreement_builds", {}).items():
            lines.append(
                f"| {k} | {v['projection']} | {v['proj_dim']} | {v['build_seconds']} | "
                f"{v['featurize_seconds']:.2f} |"
            )
        lines.append("")
    if res.get("featurize"):
        np_ = res.get("n_params", {})
        lines += [
            "**Featurize throughput per checkpoint** (pairs/s), the build's path "
            "(`TRAKer.featurize` with trakview's extension points, batches handed over in CPU "
            "memory as the build's DataLoader yields them; image decoding not included), "
            "grad_params all (token embedding through its rows), simulated batch 256, "
            + ", ".join(f"{k} {v / 1e6:.1f} M parameters" for k, v in np_.items())
            + ". `half`: float16 TRAK features (the gradients are computed in float32 either way). "
            "Breakdown: ms per pair, each step synchronised (simulated-batch draw on CPU, "
            "per-sample gradients, projection, out-to-loss term). *demo* captions: the generated "
            "world's (small vocabulary); *random*: 12 uniformly drawn tokens per caption (worst "
            "case for the token-block cache).",
            "",
            "| model | captions | projector | proj_dim | batch | half | pairs/s | repeats | peak GPU GiB | breakdown ms/pair: draw / grad / project / out-to-loss |",
            "|---|---|---|---:|---:|---|---:|---|---:|---|",
        ]
        for r in res["featurize"]:
            half = ("yes" if r["half"] else "no") + (", TF32 matmuls" if r.get("tf32") else "")
            head = f"| {r['model']} | {r['captions']} | {r['projector']} | {r['proj_dim']} | {r['batch']} | {half} |"
            if "error" in r:
                lines.append(f"{head} {r['error'][:90]} | | | |")
                continue
            b = r.get("ms_per_pair_breakdown") or {}
            parts = " / ".join(
                f"{b[k]:.3f}" for k in ("sim_draw", "grad", "project", "out_to_loss") if k in b
            )
            reps = ", ".join(f"{x:.0f}" for x in r["pairs_per_s_all_repeats"])
            lines.append(
                f"{head} {r['pairs_per_s']:.0f} | {reps} | {r['peak_gpu_gib']} | {parts} |"
            )
        lines.append("")
    for note in res.get("notes", []):
        lines += [note, ""]
    if "vit_b32_dense_gaussian" in res:
        g = res["vit_b32_dense_gaussian"]
        lines += [
            f"ViT-B-32 with `--projector gaussian` and no `fast_jl`: the dense matrix of its "
            f"{g['dense_params'] / 1e6:.0f} M non-token parameters would take "
            f"{g['matrix_gib_at_k1024']} GiB at proj_dim 1024, so KeyedProjector regenerates it "
            f"on CPU every batch: about {g['cpu_generation_seconds_per_batch_at_k1024']} s per "
            "batch (extrapolated from the time to generate 65,536 of its rows). Not usable; the "
            "table uses `--projector sketch`.",
            "",
        ]
    if res.get("embedding"):
        lines += [
            "**ViT-B-32 embedding throughput** (random init, 224 px; 4096 inputs from CPU memory "
            "as the build does; *on GPU*: one batch already on the device).",
            "",
            "| variant | batch | images/s | captions/s | images/s, input on GPU |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in res["embedding"]:
            lines.append(
                f"| {r['variant']} | {r['batch']} | {r['images_per_s']:.0f} | "
                f"{r['captions_per_s']:.0f} | {r['images_per_s_input_on_gpu']:.0f} |"
            )
        lines.append("")
    if "sim_draw_us_per_pair_cpu" in res:
        d = res["sim_draw_us_per_pair_cpu"]
        lines.append(
            "Simulated-batch draw (`SimulatedBatch.for_train`, CPU, one thread): "
            + ", ".join(f"{v} us per pair at n_train {int(k):,}" for k, v in d.items())
            + "."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    global OUT, BUDGET, DEVICE, SMOKE
    parser = arguments(__doc__)
    parser.add_argument("--out", type=Path, help="JSON file to write the measurements to")
    parser.add_argument("--from-json", type=Path, help="only write BENCHMARKS.md from this JSON")
    parser.add_argument("--budget-s", type=float, default=420, help="skip what would run past it")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", default="", help="comma list: agreement,featurize,embedding")
    parser.add_argument("--smoke-cpu", action="store_true", help="tiny sizes on CPU (checks)")
    args = parser.parse_args()
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        md = markdown(res)
        print(md)
        if not args.no_write:
            write_section("bench_gpu", md)
        return
    if args.smoke_cpu:
        DEVICE, SMOKE = "cpu", True
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA device (use --from-json to write the section)")
    OUT, BUDGET = args.out, args.budget_s
    gpu = "no GPU"
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        )
    RESULTS["env"] = {
        "machine": machine(),
        "gpu": gpu,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    skip = set(args.skip.split(","))
    sim_draw_cost()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (
            ("agreement", lambda: agreement(Path(tmp), *((200, 20) if SMOKE else (800, 80)))),
            ("embedding", embedding),
            ("featurize", lambda: featurize_all(args.quick)),
        ):
            if name in skip:
                continue
            try:
                fn()
            except Exception as err:
                import traceback

                traceback.print_exc()
                RESULTS.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
                save()
    RESULTS["seconds"] = round(time.perf_counter() - T0, 1)
    save()
    md = markdown(RESULTS)
    print(md)


if __name__ == "__main__":
    main()
