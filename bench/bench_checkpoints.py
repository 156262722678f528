"""Which checkpoints to attribute with: TRAK's LDS from checkpoints at different points of the
fine-tuning trajectory, scored against one run's own ``eval lds`` models.

    trakview train --train-data DATA --out TRAJ --init BASE.pt ... --save-epochs 1,2,3,5,10
    trakview build --train-data DATA --val-data VAL --checkpoints-dir TRAJ --epochs all --out TRAJRUN
    trakview build --train-data DATA --val-data VAL --checkpoint BASE.pt --out BASERUN
    python bench/bench_checkpoints.py --run RUN --trajectory TRAJRUN [--base BASERUN] \
        [--builds OTHER ...] [--name demo]

RUN is the run whose LDS models score every choice (``trakview eval lds RUN`` first); TRAJRUN is a
build of the same training and validation pairs at every saved epoch of the same members (the
trainer is deterministic: its epochs 5, 10, 15 reproduce RUN's). A choice of epochs is TRAK's
ensemble over those checkpoints of every member (features times targets, averaged, times the mean
out-to-loss weight, as the build does); its cost is the build's per-checkpoint stage seconds,
summed. With ``--base`` (a build at the base model the members were fine-tuned from), base-model
debiasing (DDA, arXiv 2410.01285: the fine-tuned ensemble's scores minus the base model's, the
base's scaled to the same spread) and the base's scores alone. ``--builds``: other builds of the
same pairs (another estimator on early epochs, say), scored in the same table.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bench_common import arguments, machine, md_table, write_section
from engine.attribution.settings import estimator_label
from engine.evaluate import stats
from engine.evaluate.lds import load_lds_cache
from engine.evaluate.methods import TrakScores
from engine.files import read_jsonl
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest

CHOICES = (
    (5, 10, 15),
    (15,),
    (10,),
    (5,),
    (3,),
    (2,),
    (1,),
    (1, 2, 3),
    (1, 2, 3, 5),
    (2, 3, 5),
    (1, 2, 3, 5, 10, 15),
)


def _epochs(run: Path) -> list[int]:
    found = [re.search(r"epoch_(\d+)", c.path) for c in open_manifest(run).checkpoints]
    if not all(found):
        raise SystemExit(f"{run}: every checkpoint must be named epoch_N.pt")
    return [int(f.group(1)) for f in found]


def _checkpoint_seconds(stages: dict[str, float | None], m: int) -> float:
    """Checkpoint m's stage seconds among a manifest's ``timings_seconds``."""
    return sum(v for k, v in stages.items() if k.endswith(f"-{m}") and isinstance(v, (int, float)))


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--run", type=Path, required=True, help="a run with `eval lds` done")
    parser.add_argument("--trajectory", type=Path, required=True, help="the build at every epoch")
    parser.add_argument("--base", type=Path, help="a build at the base model (debiasing rows)")
    parser.add_argument(
        "--builds",
        type=Path,
        nargs="*",
        default=[],
        help="other builds of the same pairs scored in the same table (named by their settings)",
    )
    parser.add_argument("--name", default="demo")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    run, traj = args.run.resolve(), args.trajectory.resolve()
    masks, outputs = load_lds_cache(run)
    if [r["id"] for r in read_jsonl(RunLayout(run).pairs("train"))] != [
        r["id"] for r in read_jsonl(RunLayout(traj).pairs("train"))
    ]:
        raise SystemExit("the trajectory's build must hold the run's training pairs, in order")
    epochs = _epochs(traj)
    layout = RunLayout(traj)
    stages = open_manifest(traj).timings_seconds
    scores, weights, seconds = {}, {}, {}
    for m in range(len(epochs)):
        features = np.load(layout.trak_features(m), mmap_mode="r").astype(np.float64)
        targets = np.load(layout.trak_target_grads(m), mmap_mode="r").astype(np.float64)
        scores[m] = features @ targets.T
        weights[m] = np.load(layout.trak_out_to_loss(m))[:, 0].astype(np.float64)
        seconds[m] = _checkpoint_seconds(stages, m)
    predictions, rows, ensembles = {}, {}, {}
    for choice in CHOICES:
        picked = [m for m, e in enumerate(epochs) if e in choice]
        if not picked:
            continue
        ensemble = np.mean([scores[m] for m in picked], 0)
        ensemble *= np.mean([weights[m] for m in picked], 0)[:, None]  # as the build does
        name = "epochs " + ", ".join(map(str, choice))
        ensembles[name] = ensemble
        predictions[name] = stats.subset_predictions(ensemble, masks)
        rows[name] = (len(picked), sum(seconds[m] for m in picked))
    reference = "epochs 5, 10, 15"
    if args.base is not None:
        base = RunLayout(args.base.resolve())
        features = np.load(base.trak_features(0)).astype(np.float64)
        base_scores = features @ np.load(base.trak_target_grads(0)).astype(np.float64).T
        base_scores *= np.load(base.trak_out_to_loss(0))[:, 0].astype(np.float64)[:, None]
        ensemble = ensembles[reference]
        scale = ensemble.std() / base_scores.std()
        base_seconds = _checkpoint_seconds(open_manifest(args.base.resolve()).timings_seconds, 0)
        cost = rows[reference][1] + base_seconds
        for beta in (0.25, 0.5, 1.0):
            name = f"epochs 5, 10, 15 minus the base x{beta:g} (DDA)"
            predictions[name] = stats.subset_predictions(
                ensemble - beta * scale * base_scores, masks
            )
            rows[name] = (rows[reference][0] + 1, cost)
        predictions["the base alone"] = stats.subset_predictions(base_scores, masks)
        rows["the base alone"] = (1, base_seconds)
    for other in args.builds:
        other = other.resolve()
        manifest = open_manifest(other)
        cfg = manifest.config
        name = (
            f"epochs {', '.join(map(str, sorted(set(_epochs(other)))))}: {estimator_label(cfg)}, "
            f"proj {manifest.counts.proj_dim}, lambda {cfg.lambda_rel:g}"
            + (f", simulated batch {cfg.sim_batch_size}" if cfg.sim_batch_size != 256 else "")
        )
        predictions[name] = TrakScores(other).predict(masks)
        n_models = manifest.counts.n_checkpoints
        cost = sum(_checkpoint_seconds(manifest.timings_seconds, m) for m in range(n_models))
        rows[name] = (manifest.counts.n_checkpoints, cost)
    result = stats.bootstrap_lds(predictions, outputs, args.bootstrap, 0, 0.95, reference)
    ref_s = rows[reference][1]
    table = []
    for name, v in result.items():
        diff = v.get("reference_minus_this")
        table.append(
            [
                name + (" (the run's)" if name == reference else ""),
                rows[name][0],
                f"{v['lds']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]",
                ""
                if diff is None
                else f"{-diff['mean']:+.3f} [{-diff['ci'][1]:+.3f}, {-diff['ci'][0]:+.3f}]",
                f"{rows[name][1]:.0f}",
                f"{rows[name][1] / ref_s:.2f}x",
            ]
        )
    header = ["checkpoints of every member", "checkpoints", "LDS [95%]"]
    header += ["minus epochs 5, 10, 15 [paired 95%]", "build s (their stages)", "vs the run's"]
    body = (
        f"### Which checkpoints: the {args.name}'s trajectory (`bench_checkpoints`)\n\n"
        f"TRAK (the default estimator) over checkpoints saved at different epochs of the same "
        f"{len(epochs) // len(set(epochs))} members, scored against {len(masks)} LDS subsets of "
        f"{run}'s own `eval lds` ({args.bootstrap} bootstrap resamples, paired). Build seconds: "
        f"the chosen checkpoints' stage seconds in {traj}. {machine()}. "
        f"`python bench/bench_checkpoints.py --run {run} --trajectory {traj} --name {args.name}`\n\n"
        + md_table(header, table)
    )
    print(body)
    if not args.no_write:
        write_section(f"bench_checkpoints_{args.name}", body)


if __name__ == "__main__":
    main()
