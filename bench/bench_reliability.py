"""How much two seeds of the demo's trainer agree: the split-half reliability `eval lds` reports.

For each trainer variant, trains on ``--subsets`` random halves of the default demo world's
training pairs (the LDS evaluation's subsets, ``stats.subset_masks``) two models each, with the
LDS evaluation's two seeds per subset, measures every model's CLIP margin on the validation pairs
(the run's simulated target batches, as ``eval lds`` does) and reports the mean over validation
pairs of the Spearman correlation, over subsets, of the two models' margins. That is how much
seed noise caps every attribution method's LDS (about the square root of it per model), and
the fog any counterfactual effect of the demo (LDS, removal, cleaning) is measured through.

A variant is the demo trainer (``engine.demo.train_config``: fine-tuned from the demo's base
model, trained on another world of the same generator, seed + 1) with some settings changed:
``--variant NAME:key=value,key=value`` (keys of ``engine.models.train.TrainConfig``; the
baseline is ``demo:``; ``init=`` trains from random initialisation, ``init=@base`` from the base
model). Models are cached per variant in ``--work``, so a run resumes.

    python bench/bench_reliability.py --subsets 16 --variant demo: \
        --variant scratch:init=,lr=0.003,warmup_steps=30
"""

from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from bench_common import arguments, machine, md_table, write_section
from engine.attribution.settings import BuildConfig
from engine.data.loading import image_tensors, tokenize
from engine.demo import DemoConfig, make_world, train_base, train_config
from engine.evaluate import retrain, stats
from engine.models import train
from engine.models.factory import create
from engine.run.layout import EvalCache

FRACTION, SEED = 0.5, 0


def parse_variant(text: str, base: train.TrainConfig) -> tuple[str, train.TrainConfig]:
    """``NAME:key=value,...`` -> (NAME, the base trainer with those settings)."""
    name, _, settings = text.partition(":")
    known = {f.name for f in fields(train.TrainConfig)}
    changes = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key not in known:
            raise SystemExit(f"unknown trainer setting {key!r}; known: {', '.join(sorted(known))}")
        current = getattr(base, key)  # the setting's type: that of the demo's value
        changes[key] = type(current)(value) if value and current is not None else (value or None)
    return name, replace(base, **changes)


def context(world: Path, cfg: DemoConfig) -> retrain.RetrainContext:
    """The demo world's pairs as model inputs, and the run's simulated target batches."""
    train_pairs, val_pairs = make_world(cfg, world)
    bundle = create(cfg.model)
    inputs = []
    for pairs in (train_pairs, val_pairs):
        inputs += [
            image_tensors(pairs, bundle.preprocess, progress=False).numpy(),
            tokenize(bundle.tokenizer, pairs.captions).numpy(),
        ]
    n_train = len(train_pairs.records)
    draws = retrain.target_draws(
        n_train, BuildConfig().sim_batch_size, SEED, cfg.members * cfg.snapshots
    )
    return retrain.RetrainContext(*inputs, draws=draws, train_cfg=train_config(cfg))


def reliability(
    ctx: retrain.RetrainContext, tcfg: train.TrainConfig, cache: EvalCache, subsets: int, workers
) -> dict:
    n_train = len(ctx.train_images)
    masks = stats.subset_masks(n_train, subsets, FRACTION, SEED)
    keys = [[f"s{s:05d}-r{r:02d}" for r in range(2)] for s in range(subsets)]
    jobs = [
        retrain.Job(keys[s][r], np.flatnonzero(masks[s]), stats.subset_model_seed(SEED, s, r))
        for s in range(subsets)
        for r in range(2)
    ]
    cache.folder.mkdir(parents=True, exist_ok=True)
    (cache.folder / "trainer.json").write_text(json.dumps(retrain.train_settings(tcfg)))
    t0 = time.perf_counter()
    work = retrain.run_jobs(replace(ctx, train_cfg=tcfg), jobs, cache, workers=workers)
    per_model = np.stack([retrain.load_outputs(cache, row) for row in keys])  # (N, 2, n_val)
    rho = stats.spearman_columns(per_model[:, 0], per_model[:, 1])  # (n_val,)
    boot = np.random.default_rng(SEED).integers(0, len(rho), (2000, len(rho)))
    seconds = [json.loads(cache.output_info(k).read_text())["seconds"] for row in keys for k in row]
    return {
        "reliability": float(np.nanmean(rho)),
        "ci": [float(q) for q in np.nanquantile(np.nanmean(rho[boot], axis=1), [0.025, 0.975])],
        "mean_margin": float(per_model.mean()),
        "model_s": float(np.median(seconds)),
        "trained_now": work["trained"],
        "wall_s": time.perf_counter() - t0,
        "subsets": subsets,
    }


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--subsets", type=int, default=16)
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,...")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/trakview-bench/reliability"))
    args = parser.parse_args()
    cfg = DemoConfig()
    start = str(train_base(cfg, args.work / "base"))
    base = train_config(cfg, start)
    variants = [parse_variant(v, base) for v in args.variant or ["demo:"]]
    variants = [(n, replace(t, init=start) if t.init == "@base" else t) for n, t in variants]
    ctx = context(args.work / "world", cfg)
    saved = args.work / "results.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for name, tcfg in variants:
        result = reliability(ctx, tcfg, EvalCache(args.work / name), args.subsets, args.workers)
        result["trainer"] = retrain.train_settings(tcfg)
        results[name] = result
        print(name, json.dumps(result), flush=True)
        saved.write_text(json.dumps(results, indent=2))
    changed = {
        name: {k: v for k, v in r["trainer"].items() if v != retrain.train_settings(base).get(k)}
        for name, r in results.items()
    }
    table = md_table(
        (
            "trainer",
            "changed from the demo's",
            "split-half reliability [95% CI]",
            "subsets",
            "s per model",
        ),
        [
            (
                name,
                ", ".join(
                    f"{k}={v}" if k != "init" else ("init=base model" if v else "random init")
                    for k, v in changed[name].items()
                )
                or "(the demo's)",
                f"{r['reliability']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]",
                r["subsets"],
                f"{r['model_s']:.0f}",
            )
            for name, r in results.items()
        ],
    )
    print(table)
    if not args.no_write:
        write_section(
            "bench_reliability",
            "### Seed noise of the demo's trainer (`bench_reliability`)\n\n"
            f"Two models (the LDS evaluation's seeds) on each of the first N LDS subsets "
            f"(half of the default demo world's {len(ctx.train_images)} training pairs); "
            "split-half reliability: mean over the validation pairs of the Spearman "
            "correlation over subsets of the two models' CLIP margins (interval: bootstrap "
            f"over validation pairs). Models trained {args.workers} side by side, one thread "
            f"each. {machine()}.\n\n{table}\n",
        )


if __name__ == "__main__":
    main()
