"""--projector factored (LoGra) on a real-size CLIP: featurize throughput against trakview's
current path and traker's stock pipeline with the FLOP floor, and faithfulness on the demo.

    python bench/bench_factored.py throughput                      # CPU table (~12 min here)
    python bench/bench_factored.py throughput --device cuda --out gpu-factored.json
    python bench/bench_factored.py throughput --from-json gpu-factored.json   # section only
    python bench/bench_factored.py faithfulness --run DEMO/run --factored FACTORED_RUN

**throughput**: ViT-B-32 by default (random init, 224 px; random pixels: the cost does not
depend on them), captions of ~80 words drawn Zipf-like from the tokenizer's whole-word
vocabulary (truncated to the 77-token context), simulated batch 256, the same proj_dim and
the device's default attributed parameters for every path. Each trakview path runs through
the build's own featurize (``InMemoryWork``: the TRAKer of ``engine.assemble.context``); warm-up,
then the median of the repeats. traker's stock pipeline cannot run ViT-B-32 on a 24 GiB CPU (its
BasicProjector allocates a D x 100 float32 block): its rate is estimated from a measured
per-sample gradient batch and one measured slice of a projection block, scaled to the whole.
The FLOP floor: the FLOPs of one batched forward + backward of the margin per pair
(``torch.utils.flop_counter.FlopCounterMode``, weight gradients included) at the measured
float32 matmul rate of the device. Sections ``bench_factored`` (CPU) / ``bench_factored_gpu``.

**faithfulness**: the LDS of two runs of the same data and checkpoints (the demo's default
build and the same build with ``--projector factored``) against the LDS cache of the first
(``trakview eval lds RUN``): paired bootstrap over subsets and targets; the demo's ground
truth (near-duplicates in the top 5, mislabeled ROC AUC); each build's featurize cost from its
manifest. Section ``bench_factored_lds``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench_common import InMemoryWork, arguments, machine, md_table, warm_up, write_section
from engine.attribution.gradients import select_parameters
from engine.attribution.settings import BuildConfig, resolve
from engine.models.factory import ClipBundle, create

RESULTS: dict[str, Any] = {}
# label -> (--projector, pairs per batch on CPU, on CUDA); the current path's per-sample
# gradients of ViT-B-32 take 450 MB per pair: batch 50 (the default) does not fit in 24 GiB
PATHS = {
    "trakview current (sketch)": ("sketch", 8, 64),
    "trakview factored": ("factored", 32, 256),
    "trakview factored-bf16": ("factored-bf16", 32, 256),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def captions(tokenizer: Any, n: int, seed: int = 0) -> list[str]:
    """Captions of ~80 words drawn Zipf-like (p ~ 1/(rank + 10)) from the 20,000 first
    whole-word tokens of the BPE vocabulary (ranked by merge order, roughly by frequency)."""
    words = [w[:-4] for w in tokenizer.encoder if w.endswith("</w>") and w[:-4].isalpha()]
    words = words[:20_000]
    p = 1.0 / (np.arange(len(words)) + 10)
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=80, p=p / p.sum())) for _ in range(n)]


class Inputs:
    """n images (CPU, as the build holds them), their tokens, training embeddings for the
    simulated batches (random unit vectors: the cost does not depend on them)."""

    def __init__(self, bundle: ClipBundle, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        size = bundle.image_size
        self.images = torch.randn(n, 3, size, size, generator=gen)
        self.tokens = bundle.tokenizer(captions(bundle.tokenizer, n, seed))
        d = int(bundle.model.text_projection.shape[1])
        n_emb = max(n, 512)
        self.img_emb = F.normalize(torch.randn(n_emb, d, generator=gen), dim=1)
        self.txt_emb = F.normalize(torch.randn(n_emb, d, generator=gen), dim=1)


def settings(name: str, device: str, proj_dim: int, projector: str, batch: int) -> BuildConfig:
    cfg = BuildConfig(
        model=name,
        checkpoints=["(in memory)"],
        device=device,
        proj_dim=proj_dim,
        projector=projector,
        sim_batch_size=256,
        batch_size=batch,
    )
    return resolve(cfg, 512, check_device=False)


def trakview_rate(
    bundle: ClipBundle, inputs: Inputs, cfg: BuildConfig, pairs: int, repeats: int
) -> dict[str, Any]:
    """Pairs/s of the build's featurize (TRAKer with trakview's extension points)."""
    work = InMemoryWork(cfg, bundle, inputs.img_emb, inputs.txt_emb)
    t = time.perf_counter()
    warm_up(work.projector, cfg.device)
    traker = work.traker(pairs)  # the factored layout probe and factors happen here
    setup = time.perf_counter() - t
    state = bundle.model.state_dict()
    images, tokens = inputs.images[:pairs], inputs.tokens[:pairs]
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for r in range(repeats + 1):  # the first is the warm-up
        sync(cfg.device)
        t = time.perf_counter()
        work.featurize(traker, state, r, images, tokens)
        sync(cfg.device)
        times.append(time.perf_counter() - t)
        print(f"  {cfg.projector} repeat {r}: {pairs / times[-1]:.2f} pairs/s", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cfg.device.startswith("cuda") else None
    return {
        "pairs": pairs,
        "batch": cfg.batch_size,
        "pairs_per_s": pairs / statistics.median(times[1:]),
        "all_repeats": [round(pairs / x, 3) for x in times[1:]],
        "setup_s": round(setup, 2),
        "peak_gpu_gib": None if peak is None else round(peak, 2),
    }


def stock_estimate(
    bundle: ClipBundle, inputs: Inputs, names: list[str], proj_dim: int, batch: int, device: str
) -> dict[str, Any]:
    """traker's stock pipeline (FunctionalGradientComputer + BasicProjector) on CPU, estimated:
    one measured batch of per-sample gradients, plus the BasicProjector's per-batch work
    (ceil(proj_dim / 100) blocks, each D x 100 normal draws and a (batch, D) @ (D, 100) product)
    scaled from one measured slice of 2^20 rows. The out-to-loss term is not counted."""
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.modelout_functions import CLIPModelOutput

    model = bundle.model
    dim = sum(p.numel() for n, p in model.named_parameters() if n in names)
    CLIPModelOutput.image_embeddings = inputs.img_emb.to(device)
    CLIPModelOutput.text_embeddings = inputs.txt_emb.to(device)
    CLIPModelOutput.num_computed_embeddings = len(inputs.img_emb)
    task = CLIPModelOutput(simulated_batch_size=256)
    computer = FunctionalGradientComputer(model, task, dim, torch.float32, device, grad_wrt=names)
    b = (inputs.images[:batch].to(device), inputs.tokens[:batch].to(device))
    computer.compute_per_sample_grad(b)  # warm-up
    sync(device)
    t = time.perf_counter()
    grads = computer.compute_per_sample_grad(b)
    sync(device)
    grad_s = time.perf_counter() - t
    del grads
    rows = 2**20
    block = torch.empty(rows, 100, device=device)
    g = torch.randn(batch, rows, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    t = time.perf_counter()
    block.normal_(generator=gen)
    g @ block
    sync(device)
    slice_s = time.perf_counter() - t
    blocks = math.ceil(proj_dim / 100)
    project_s = slice_s * dim / rows * blocks
    return {
        "pairs_per_s": batch / (grad_s + project_s),
        "batch": batch,
        "grad_s_per_batch": round(grad_s, 2),
        "project_s_per_batch": round(project_s, 1),
        "block_gib": round(dim * 100 * 4 / 2**30, 1),
        "attributed": dim,
    }


def margin_sum(model: torch.nn.Module, inputs: Inputs, rows: slice, device: str) -> torch.Tensor:
    """Sum over pairs of ClipMargin's margin (each pair against 256 training embeddings)."""
    images, tokens = inputs.images[rows].to(device), inputs.tokens[rows].to(device)
    img, txt = model(images, tokens)[:2]  # (B, d) unit embeddings
    n = len(images)
    sim = torch.arange(256, device=device)
    sim_img, sim_txt = inputs.img_emb.to(device)[sim], inputs.txt_emb.to(device)[sim]
    s_ii = (img * txt).sum(1, keepdim=True)  # (B, 1)
    out = -torch.logsumexp(img @ sim_txt.T - s_ii, 1) - torch.logsumexp(txt @ sim_img.T - s_ii, 1)
    return out.sum() if n else out


def flop_floor(
    bundle: ClipBundle, inputs: Inputs, names: list[str], device: str, batch: int
) -> dict[str, Any]:
    """FLOPs of one batched forward + backward per pair (attributed parameters require grad,
    so their weight gradients count), the float32 matmul rate, and the plain batched pass's own
    pairs/s (what a training step of this size reaches here)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(bundle.model).to(device)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    counter = FlopCounterMode(display=False)
    with counter:
        margin_sum(model, inputs, slice(0, 4), device).backward()
    per_pair = counter.get_total_flops() / 4
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        sync(device)
        t = time.perf_counter()
        margin_sum(model, inputs, slice(0, batch), device).backward()
        sync(device)
        times.append(time.perf_counter() - t)
    del model
    size = 2048 if device == "cpu" else 8192
    a, c = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.backends.cuda.matmul.allow_tf32 = False  # plain float32
    rates = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(3):
            a @ c
        sync(device)
        rates.append(3 * 2 * size**3 / (time.perf_counter() - t))
    rate = statistics.median(rates)
    return {
        "flops_per_pair": per_pair,
        "matmul_flops_per_s": rate,
        "floor_pairs_per_s": rate / per_pair,
        "plain_batched_pairs_per_s": batch / statistics.median(times[1:]),
        "plain_batch": batch,
    }


def throughput(args: Any) -> None:
    device = args.device
    cuda = device.startswith("cuda")
    RESULTS.update({"machine": machine(), "device": device, "model": args.model})
    RESULTS.update({"proj_dim": args.proj_dim, "load_before": load()})
    bundle = create(args.model, seed=0, device=device)
    names = select_parameters(
        bundle.model, settings(args.model, device, 64, "sketch", 8).grad_params
    )
    RESULTS["grad_params"] = settings(args.model, device, 64, "sketch", 8).grad_params
    RESULTS["attributed"] = sum(p.numel() for n, p in bundle.model.named_parameters() if n in names)
    args.pairs_current = args.pairs_current or (256 if cuda else 16)
    args.pairs_factored = args.pairs_factored or (1024 if cuda else 64)
    n_max = max(args.pairs_current, args.pairs_factored)
    inputs = Inputs(bundle, n_max)
    RESULTS["floor"] = flop_floor(bundle, inputs, names, device, 8 if not cuda else 64)
    print(json.dumps(RESULTS["floor"]), flush=True)
    rows = RESULTS.setdefault("paths", {})
    for label, (kind, b_cpu, b_cuda) in PATHS.items():
        batch = b_cuda if cuda else b_cpu
        pairs = args.pairs_current if kind == "sketch" else args.pairs_factored
        cfg = settings(args.model, device, args.proj_dim, kind, batch)
        try:
            rows[label] = trakview_rate(bundle, inputs, cfg, max(pairs, batch), args.repeats)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # reported, not fatal
            rows[label] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
        print(label, json.dumps(rows[label]), flush=True)
    if not args.skip_stock:
        try:
            rows["traker stock (estimate)"] = stock_estimate(
                bundle, inputs, names, args.proj_dim, 4 if not cuda else 16, device
            )
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            rows["traker stock (estimate)"] = {"error": f"{type(err).__name__}: {err}"[:200]}
        print(json.dumps(rows["traker stock (estimate)"]), flush=True)
    RESULTS["load_after"] = load()


def throughput_markdown(res: dict[str, Any]) -> str:
    floor = res["floor"]
    gflop = floor["flops_per_pair"] / 1e9
    current = res["paths"].get("trakview current (sketch)", {}).get("pairs_per_s")
    table = []
    for label, row in res["paths"].items():
        if "error" in row:
            table.append((label, "", "", "", "", row["error"]))
            continue
        rate = row["pairs_per_s"]
        vs = f"{rate / current:.1f}x" if current else ""
        if "estimate" in label:
            detail = (
                f"batch {row['batch']}: per-sample gradients {row['grad_s_per_batch']} s + "
                f"BasicProjector {row['project_s_per_batch']} s per batch (extrapolated; cannot "
                f"run here: one D x 100 block = {row['block_gib']} GiB)"
            )
        else:
            spread = ", ".join(f"{v:.2f}" for v in row["all_repeats"])
            gpu = f", peak {row['peak_gpu_gib']} GiB" if row.get("peak_gpu_gib") else ""
            detail = f"batch {row['batch']}, {row['pairs']} pairs x repeats: {spread}{gpu}"
        share = f"{100 * rate / floor['floor_pairs_per_s']:.0f}%"
        table.append((label, f"{rate:.3g}", vs, f"{1e3 / rate:.0f}", share, detail))
    header = ("path", "pairs/s", "vs current", "ms per pair", "share of floor", "details")
    note = (
        f"{res['model']} (random init, {res['attributed']:,} attributed parameters: "
        f"grad_params {res['grad_params']}), proj_dim {res['proj_dim']}, simulated batch 256, "
        f"float32 features, {res['device']}; {res['machine']}. FLOP floor: one batched "
        f"forward + backward = {gflop:.3g} GFLOP per pair (FlopCounterMode) at "
        f"{floor['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (float32 matmul measured here) = "
        f"{floor['floor_pairs_per_s']:.2f} pairs/s; a plain batched forward + backward "
        f"(batch {floor['plain_batch']}, no per-sample anything) reaches "
        f"{floor['plain_batched_pairs_per_s']:.2f} pairs/s "
        f"({100 * floor['plain_batched_pairs_per_s'] / floor['floor_pairs_per_s']:.0f}%). "
        f"Load average before / after: {res['load_before']} / {res['load_after']} "
        "(another process may have shared the cores when above ~0.5)."
    )
    return f"{note}\n\n{md_table(header, table)}\n"


# --- faithfulness on the demo --------------------------------------------------------------


def faithfulness(args: Any) -> str:
    from engine import files
    from engine.evaluate import groundtruth, stats
    from engine.evaluate.lds import load_lds_cache
    from engine.run.layout import RunLayout
    from engine.run.manifest import open_manifest

    runs = {"default": Path(args.run), "factored": Path(args.factored)}
    manifests = {k: open_manifest(r) for k, r in runs.items()}
    same = ("proj_dim", "seed", "grad_params", "sim_batch_size", "lambda_rel")
    a, b = (manifests[k].config for k in runs)
    differ = [f for f in same if getattr(a, f) != getattr(b, f)]
    hashes = [[c.sha256 for c in manifests[k].checkpoints] for k in runs]
    differ += ["checkpoints"] if hashes[0] != hashes[1] else []
    if differ:
        raise SystemExit(f"the two runs differ in {differ}: compare builds of the same settings")
    layouts = {k: RunLayout(r) for k, r in runs.items()}
    train = files.read_jsonl(layouts["default"].pairs("train"))
    val = files.read_jsonl(layouts["default"].pairs("val"))
    masks, outputs = load_lds_cache(runs["default"], args.subsets)
    scores = {k: files.load_npy(lay.scores) for k, lay in layouts.items()}
    preds = {k: stats.subset_predictions(v, masks) for k, v in scores.items()}
    lds = stats.bootstrap_lds(preds, outputs, args.bootstrap, seed=0, reference="default")
    rows = []
    for k, man in manifests.items():
        timings = {s: v for s, v in man.timings_seconds.items() if v is not None}
        featurize = sum(v for s, v in timings.items() if s.startswith("featurize"))
        dup = groundtruth.near_duplicate_hits(scores[k], train, val, k=5)
        auc_self = groundtruth.mislabeled_auc(files.load_npy(layouts[k].self_influence), train)
        auc_suspect = groundtruth.mislabeled_auc(files.load_npy(layouts[k].suspect), train)
        r = lds[k]
        diff = r.get("reference_minus_this")
        rows.append(
            (
                f"{k} (--projector {man.config.projector})",
                f"{r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
                ""
                if diff is None
                else f"{diff['mean']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]",
                f"{dup['hits']}/{dup['n']}",
                f"{auc_self:.3f} / {auc_suspect:.3f}",
                f"{featurize:.0f}",
                f"{man.build_seconds_this_session:.0f}",
            )
        )
    header = (
        "run",
        f"LDS [{int(100 * 0.95)}%]",
        "default minus this [paired 95%]",
        "near-duplicate in top 5",
        "mislabeled AUC: self-influence / suspect ranking",
        "featurize s",
        "build s (wall)",
    )
    cfg = manifests["default"].config
    note = (
        f"The demo's run ({len(train)} train / {len(val)} val pairs, "
        f"{len(cfg.checkpoints)} checkpoints of trakview-tiny, proj_dim {cfg.proj_dim}) and the "
        "same build with `--projector factored` (`trakview build --config RUN/run.toml --out "
        "OUT --projector factored`), scored against the same "
        f"{len(masks)} subsets' retrained models (`trakview eval lds`): bootstrap over subsets "
        f"and targets ({args.bootstrap} resamples, the same for both: the difference has its "
        "own paired interval). Cost: each build's featurize seconds (its units, summed over "
        f"the worker processes) and its wall-clock seconds (manifest). {args.note} {machine()}. "
        "`python bench/bench_factored.py faithfulness --run RUN --factored OUT`"
    )
    return f"{note}\n\n{md_table(header, rows)}\n"


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("command", choices=("throughput", "faithfulness"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--pairs-current", type=int, help="pairs per repeat (16; CUDA 256)")
    parser.add_argument("--pairs-factored", type=int, help="pairs per repeat (64; CUDA 1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--from-json", type=Path, help="only write the section from a JSON")
    parser.add_argument("--run", help="faithfulness: the default build (with its LDS cache)")
    parser.add_argument("--factored", help="faithfulness: the --projector factored build")
    parser.add_argument("--subsets", type=int, default=None)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--note", default="", help="faithfulness: a note (load, build times)")
    args = parser.parse_args()
    if args.command == "faithfulness":
        body = "### Faithfulness of --projector factored on the demo\n\n" + faithfulness(args)
        print(body)
        if not args.no_write:
            write_section("bench_factored_lds", body)
        return
    if args.from_json:
        RESULTS.update(json.loads(args.from_json.read_text()))
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        throughput(args)
        if args.out:
            args.out.write_text(json.dumps(RESULTS, indent=1))
    cuda = RESULTS["device"].startswith("cuda")
    title = "on one GPU" if cuda else "on this CPU"
    body = f"### Featurize on a real-size model: --projector factored {title}\n\n"
    body += throughput_markdown(RESULTS)
    print(body)
    if not args.no_write:
        write_section("bench_factored_gpu" if cuda else "bench_factored", body)


if __name__ == "__main__":
    main()
