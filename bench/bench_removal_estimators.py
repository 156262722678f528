"""Top-k removal per estimator: the same validation targets, each retrained without its top-k
positive influencers by each build's scores, paired against the first build.

    trakview eval remove BUILD --targets 20 -k 50 --methods trak     # for every build
    python bench/bench_removal_estimators.py BUILD_A BUILD_B ... [--name demo]

Every build holds the same training and validation pairs and its removal used the same seeds
(``eval remove``'s ``--seed``, the trainer's recorded seeds), so the targets and the model trained
on every pair are the same: the difference of two builds' changes of one target's margin is the
difference of what their top-k removed. More negative: the removed pairs helped the target more
(a more faithful top-k). Intervals: bootstrap over targets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench_common import arguments, machine, md_table, write_section
from engine import files
from engine.attribution.settings import estimator_label
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest


def _interval(values: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n_boot)]
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _label(run: Path) -> str:
    manifest = open_manifest(run)
    cfg = manifest.config
    epochs = sorted({Path(c).stem for c in cfg.checkpoints}, key=lambda s: (len(s), s))
    return (
        f"{estimator_label(cfg)}, proj {manifest.counts.proj_dim}, lambda {cfg.lambda_rel:g}; "
        f"{manifest.counts.n_checkpoints} checkpoints ({', '.join(epochs)})"
    )


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="builds with `eval remove` done")
    parser.add_argument("--name", default="demo")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    results = [files.read_json(RunLayout(r.resolve()).removal_result) for r in args.runs]
    first = results[0]
    ks = first["settings"]["ks"]
    targets = sorted(first["targets"])
    for run, res in zip(args.runs, results, strict=True):
        if (
            sorted(res["targets"]) != targets
            or res["identity"]["train"] != first["identity"]["train"]
        ):
            raise SystemExit(f"{run}: not the same targets and trainer as {args.runs[0]}")
    rows = []
    for k in ks:
        base = None
        for run, res in zip(args.runs, results, strict=True):
            delta = np.array(
                [res["targets"][t]["removed"]["trak"][str(k)]["delta"] for t in targets]
            )
            removed = [
                set(res["targets"][t]["removed"]["trak"][str(k)]["removed_ids"]) for t in targets
            ]
            lo, hi = _interval(delta, args.bootstrap)
            if base is None:
                base, base_removed, paired, overlap = delta, removed, "", ""
            else:
                d = delta - base
                dlo, dhi = _interval(d, args.bootstrap)
                paired = f"{d.mean():+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
                shared = [len(a & b) / k for a, b in zip(removed, base_removed, strict=True)]
                overlap = f"{np.mean(shared):.2f}"
            rows.append(
                [
                    _label(run.resolve()),
                    k,
                    len(targets),
                    f"{delta.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]",
                    f"{(delta < 0).mean():.0%}",
                    paired,
                    overlap,
                ]
            )
    header = ["build", "k", "targets", "change of the target's margin [95%]", "dropped"]
    header += ["minus the first build's [paired 95%]", "removed pairs shared with the first"]
    body = (
        f"### Top-k removal per estimator: the {args.name} (`bench_removal_estimators`)\n\n"
        f"Each build's `trakview eval remove BUILD --targets {len(targets)} -k "
        f"{','.join(map(str, ks))} --methods trak` (seed {first['settings']['seed']}: the same "
        f"targets; the trainer's recorded seeds: the same model trained on every pair), one "
        f"model per target and k. {machine()}. "
        f"`python bench/bench_removal_estimators.py {' '.join(str(r) for r in args.runs)}`\n\n"
        + md_table(header, rows)
    )
    print(body)
    if not args.no_write:
        write_section(f"bench_removal_estimators_{args.name}", body)


if __name__ == "__main__":
    main()
