"""``trakview eval``: counterfactual checks of a run's attributions (LDS and removal) and of a
basket's cleaning effect (clean)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from engine.cli import basket_text
from engine.cli.basket_cmds import Controls, Ensembles, Measure, SplitSeed
from engine.cli.options import RunArg, Verbose, setup_logging
from engine.evaluate.choices import CONTROLS

eval_app = typer.Typer(
    no_args_is_help=True,
    help="Check a run's attributions, or a basket's cleaning, against retrained models: lds | "
    "remove | clean.",
)

Seed = Annotated[
    int, typer.Option(help="Seed of the subsets / random removals, model seeds and bootstrap.")
]
Bootstrap = Annotated[int, typer.Option(help="Bootstrap resamples of the 95% intervals.")]
Workers = Annotated[
    int,
    typer.Option(help="Models trained side by side, one CPU thread each; 0 = one per CPU core."),
]
KeepModels = Annotated[
    bool, typer.Option(help="Keep the retrained checkpoints under RUN/eval/ (13 MB each, tiny).")
]
Overwrite = Annotated[
    bool, typer.Option(help="Delete cached models made with other settings and start again.")
]
Device = Annotated[str, typer.Option(help="cpu or cuda (cuda trains one model at a time).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")]
# The run does not record how its checkpoints were trained: these default to the
# train_config.json that `trakview train` / `demo` write beside the checkpoints, else to
# TrainConfig's defaults (from random initialisation, as the demo's base model is trained).


def _recorded(text: str, default: str) -> str:
    return f"{text} (default: train_config.json beside the run's checkpoints, else {default})."


Epochs = Annotated[
    int | None,
    typer.Option(help=_recorded("Epochs of the run's trainer", "15")),
]
Lr = Annotated[
    float | None,
    typer.Option(help=_recorded("Peak AdamW learning rate", "3e-3")),
]
BatchSize = Annotated[
    int | None,
    typer.Option(help=_recorded("Pairs per contrastive batch", "128")),
]
WarmupSteps = Annotated[
    int | None,
    typer.Option(help=_recorded("Linear warm-up steps", "30")),
]
WeightDecay = Annotated[
    float | None,
    typer.Option(help=_recorded("AdamW weight decay", "0.05")),
]


def train_config(run: Path, flags: dict[str, Any]) -> tuple[Any, str]:
    """The trainer to retrain with: the run's model, then train_config.json beside its
    checkpoints, then the flags given; returns it and a description of where it came from."""
    from engine.evaluate import retrain
    from engine.models import train
    from engine.run.manifest import open_manifest

    manifest = open_manifest(run)
    recorded, source = retrain.run_train_config(run, manifest)
    known = {f.name for f in fields(train.TrainConfig)}
    given = {k: v for k, v in flags.items() if v is not None}
    values = {**{k: v for k, v in recorded.items() if k in known}, **given}
    values["model"] = manifest.config.model
    cfg = train.TrainConfig(**values)
    if cfg.init and not Path(cfg.init).is_file():
        from engine.errors import ConfigError

        raise ConfigError(
            f"the run's models were fine-tuned from {cfg.init} ({source}), which is not there; "
            'retraining needs that starting checkpoint: put it back, or set "init" in that '
            "file to where it is now"
        )
    where = f"recorded in {source}" if source else "trakview's defaults, from random initialisation"
    if given:
        where += "; flags " + ", ".join(f"--{k.replace('_', '-')}" for k in given)
    return cfg, where


def _echo_train(cfg: Any, where: str) -> None:
    typer.echo(
        f"retraining with {cfg.model}: {cfg.epochs} epochs, lr {cfg.lr:g}, batch {cfg.batch_size}, "
        f"warm-up {cfg.warmup_steps}, weight decay {cfg.weight_decay:g}"
        + (f", fine-tuned from {cfg.init}" if cfg.init else "")
        + f" ({where})"
    )


def _methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


LDS_HELP = (
    "Linear datamodeling score of the run's TRAK scores and baselines, with 95% intervals. "
    "Trains models on random subsets of the training pairs with the run's trainer (cached in "
    "RUN/eval/lds/: a longer evaluation continues where a shorter one stopped), measures every "
    "validation pair's CLIP margin and writes RUN/eval/lds.json."
)
REMOVE_HELP = (
    "Retrain without each target's top-k positive influencers and report the change of its "
    "margin; controls: the top-k by CLIP similarity and k random pairs. Each change is measured "
    "against a model trained on every pair with the same seed; results go to "
    "RUN/eval/remove.json."
)


@eval_app.command(help=LDS_HELP)
def lds(
    run: RunArg,
    subsets: Annotated[
        int, typer.Option(help="Random training subsets; models are trained on each.")
    ] = 64,
    fraction: Annotated[float, typer.Option(help="Share of the training pairs per subset.")] = 0.5,
    models_per_subset: Annotated[
        int, typer.Option(help="Models per subset, with their own seeds (outputs averaged).")
    ] = 1,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods: trak, clip-image, clip-text, clip-pair, grad-dot, "
            "random."
        ),
    ] = "trak,clip-image,clip-text,clip-pair,grad-dot,random",
    seed: Seed = 0,
    bootstrap: Bootstrap = 1000,
    workers: Workers = 0,
    epochs: Epochs = None,
    lr: Lr = None,
    batch_size: BatchSize = None,
    warmup_steps: WarmupSteps = None,
    weight_decay: WeightDecay = None,
    keep_models: KeepModels = False,
    overwrite: Overwrite = False,
    device: Device = "cpu",
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Linear datamodeling score of the run's TRAK scores and baselines, with 95% intervals.

    Trains models on random subsets of the training pairs with the run's trainer (cached in
    RUN/eval/lds/: a longer evaluation continues where a shorter one stopped), measures every
    validation pair's CLIP margin, and writes RUN/eval/lds.json.
    """
    from engine.evaluate import lds as lds_eval
    from engine.run.layout import RunLayout

    setup_logging(verbose)
    flags = dict(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
    )
    tcfg, where = train_config(run, flags)
    _echo_train(tcfg, where)
    cfg = lds_eval.LdsConfig(
        subsets=subsets,
        fraction=fraction,
        models_per_subset=models_per_subset,
        seed=seed,
        bootstrap=bootstrap,
        workers=workers,
        keep_models=keep_models,
        methods=_methods(methods),
    )
    result = lds_eval.evaluate_lds(run, cfg, tcfg, device, overwrite, train_source=where)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(lds_table(result))
    t = result["timings"]
    typer.echo(
        f"\n{result['counts']['subsets']} subsets x {models_per_subset} models "
        f"({t['models_trained']} trained now, {t['models_reused']} cached) in "
        f"{t['total_seconds']:.0f} s; results in {RunLayout(run).lds_result}"
    )


def lds_table(result: dict[str, Any]) -> str:
    """The LDS result as an aligned text table, best method first."""
    rows = [("method", "LDS", "95% interval", "TRAK minus method (95%)")]
    ranked = sorted(result["methods"].items(), key=lambda kv: -kv[1]["lds"])
    for name, m in ranked:
        diff = m.get("reference_minus_this")
        rows.append(
            (
                name,
                f"{m['lds']:+.3f}",
                f"[{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]",
                f"{diff['mean']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]" if diff else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


@eval_app.command(help=REMOVE_HELP)
def remove(
    run: RunArg,
    val: Annotated[
        list[str] | None,
        typer.Option(help="Validation pair id(s) to test (repeat the flag, or comma-separate)."),
    ] = None,
    targets: Annotated[
        int, typer.Option(help="Instead of --val: this many validation pairs drawn at random.")
    ] = 0,
    k: Annotated[
        list[int] | None,
        typer.Option("-k", help="Pairs removed per target (repeatable; default: 10 and 50)."),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated removal rules: trak (top-k positive influencers), clip-image, "
            "clip-text, clip-pair (top-k by CLIP similarity), grad-dot, random (k random pairs)."
        ),
    ] = "trak,clip-pair,random",
    models: Annotated[
        int, typer.Option(help="Models per target, rule and k (seeds: train seed + 0, 1, ...).")
    ] = 1,
    train_seed: Annotated[
        int | None,
        typer.Option(help=_recorded("Seed of the run's member 0 (member r: seed + r)", "0")),
    ] = None,
    seed: Seed = 0,
    bootstrap: Bootstrap = 1000,
    workers: Workers = 0,
    epochs: Epochs = None,
    lr: Lr = None,
    batch_size: BatchSize = None,
    warmup_steps: WarmupSteps = None,
    weight_decay: WeightDecay = None,
    keep_models: KeepModels = False,
    overwrite: Overwrite = False,
    device: Device = "cpu",
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Retrain without each target's top-k influencers and report the change of its margin.

    Controls: the top-k by CLIP similarity and k random pairs. Each change is measured against
    a model trained on every pair with the same seed; results go to RUN/eval/remove.json.
    """
    from engine.errors import EvalError
    from engine.evaluate import removal as removal_eval
    from engine.files import read_jsonl
    from engine.run.layout import RunLayout

    setup_logging(verbose)
    flags = dict(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        seed=train_seed,
    )
    tcfg, where = train_config(run, flags)
    ids = [v.strip() for item in val or [] for v in item.split(",") if v.strip()]
    if ids and targets:
        raise EvalError("give either --val ID ... or --targets N, not both")
    if targets:
        val_ids = [str(r["id"]) for r in read_jsonl(RunLayout(run).pairs("val"))]
        ids = removal_eval.sample_targets(val_ids, targets, seed)
    _echo_train(tcfg, where)
    cfg = removal_eval.RemoveConfig(
        targets=ids,
        ks=k or [10, 50],
        methods=_methods(methods),
        models=models,
        seed=seed,
        bootstrap=bootstrap,
        workers=workers,
        keep_models=keep_models,
    )
    result = removal_eval.evaluate_removal(run, cfg, tcfg, device, overwrite, train_source=where)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(removal_table(result, ids))
    t = result["timings"]
    typer.echo(
        f"\n{t['models_trained']} models trained now, {t['models_reused']} cached, "
        f"{t['total_seconds']:.0f} s; results in {RunLayout(run).removal_result}"
    )


def removal_table(result: dict[str, Any], ids: list[str]) -> str:
    """Per target the margin changes, then the summary over all targets in remove.json."""
    lines = []
    for tid in ids:
        entry = result["targets"][tid]
        parts = [
            f"{method} k={kk}: {res['delta']:+.3f}"
            for method, by_k in entry["removed"].items()
            for kk, res in by_k.items()
        ]
        lines.append(f"{tid:<12} margin {entry['margin_full']:+.3f}   " + "   ".join(parts))
    lines.append("\nmean change of the target's margin (all targets in remove.json):")
    for row in result["summary"]:
        diff = row.get("this_minus_trak")
        extra = (
            f"   this minus trak {diff['mean']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]"
            if diff
            else ""
        )
        lines.append(
            f"  k={row['k']:<4} {row['method']:<11} {row['mean_delta']:+.3f} "
            f"[{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]  dropped for "
            f"{row['share_dropped']:.0%} of {row['targets']}{extra}"
        )
    return "\n".join(lines)


CLEAN_HELP = (
    "Did removing a basket help? Retrains the run's ensemble (its trainer and seeds) on every "
    "pair, without the basket and, as controls, without as many lowest-CLIP-similarity pairs "
    "and random pairs; measures held-out validation pairs (margins, image<->text R@1/R@5) with "
    "bootstrap intervals over seeds and pairs, paired across conditions. Cached in "
    "RUN/eval/clean/ (resumable); the result is recorded in the basket."
)


@eval_app.command(help=CLEAN_HELP)
def clean(
    run: RunArg,
    basket: Annotated[str, typer.Option(help="The basket to verify (trakview basket list).")],
    ensembles: Ensembles = 1,
    controls: Controls = ",".join(CONTROLS),
    measure: Measure = "auto",
    split_seed: SplitSeed = 0,
    members: Annotated[
        int | None, typer.Option(help=_recorded("Members of the run's ensemble", "4"))
    ] = None,
    train_seed: Annotated[
        int | None,
        typer.Option(help=_recorded("Seed of the run's member 0 (member r: seed + r)", "0")),
    ] = None,
    seed: Seed = 0,
    bootstrap: Bootstrap = 1000,
    workers: Workers = 0,
    epochs: Epochs = None,
    lr: Lr = None,
    batch_size: BatchSize = None,
    warmup_steps: WarmupSteps = None,
    weight_decay: WeightDecay = None,
    keep_models: KeepModels = False,
    overwrite: Overwrite = False,
    device: Device = "cpu",
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    from engine.evaluate import clean as clean_eval

    setup_logging(verbose)
    flags = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": train_seed}
    flags |= {"warmup_steps": warmup_steps, "weight_decay": weight_decay, "members": members}
    tcfg, where = train_config(run, flags)
    _echo_train(tcfg, where)
    cfg = clean_eval.CleanConfig(
        basket=basket,
        ensembles=ensembles,
        controls=[c for c in _methods(controls) if c != "none"],
        measure=measure,
        split_seed=split_seed,
        seed=seed,
        bootstrap=bootstrap,
        workers=workers,
        keep_models=keep_models,
    )
    result = clean_eval.evaluate_clean(run, cfg, tcfg, device, overwrite, train_source=where)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(basket_text.verification_text(result))
    t = result["timings"]
    typer.echo(
        f"\n{t['models_trained']} models trained now, {t['models_reused']} cached, "
        f"{t['total_seconds']:.0f} s; recorded in basket {basket}"
    )
