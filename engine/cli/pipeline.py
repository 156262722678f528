"""The pipeline's commands: ``demo``, ``train`` and ``build``.

Each turns its flags into the engine's config dataclasses; the engine is imported inside the
command, so ``--help`` costs nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from engine.attribution.settings import PROJECTORS, SCORE_FORMS
from engine.cli import inputs
from engine.cli.explore import serve
from engine.cli.options import (
    CaptionKey,
    CocoCaptions,
    ConfigFile,
    Estimator,
    Format,
    IdKey,
    ImageRoot,
    ImgKey,
    Jobs,
    ModuleDim,
    Normalize,
    Output,
    Separator,
    SplitSeed,
    Strict,
    TrainData,
    ValData,
    ValFraction,
    Verbose,
    Workers,
    choices,
    setup_logging,
)
from engine.data.failures import FAILURES

log = logging.getLogger("engine")


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, models and run.")] = Path(
        "demo-run"
    ),
    no_serve: Annotated[
        bool, typer.Option("--no-serve", help="Build everything but do not open the dashboard.")
    ] = False,
    n_train: Annotated[int, typer.Option(help="Training pairs of the generated world.")] = 3000,
    n_val: Annotated[int, typer.Option(help="Validation pairs of the generated world.")] = 300,
    members: Annotated[int, typer.Option(help="CLIP models to train (own seed each).")] = 4,
    epochs: Annotated[int, typer.Option(help="Epochs per model (0 = demo default: 15).")] = 0,
    snapshots: Annotated[
        int,
        typer.Option(
            help="Checkpoints attributed per model: its last epoch and evenly spaced earlier "
            "ones (3 with 15 epochs: 5, 10, 15; 1: the final checkpoints only, a faster build "
            "with a lower LDS, see BENCHMARKS.md)."
        ),
    ] = 3,
    base_epochs: Annotated[
        int,
        typer.Option(
            help="Epochs of the base model the ensemble is fine-tuned from, trained first on a "
            "second generated world (0: train the ensemble from random initialisation, faster, "
            "but two seeds then disagree and counterfactual checks are noise, see BENCHMARKS.md)."
        ),
    ] = 15,
    seed: Annotated[int, typer.Option(help="Seed of the world, training and attribution.")] = 0,
    failure: Annotated[
        str, typer.Option(help=f"Planted systematic failure: {choices(FAILURES)}.")
    ] = "watermark",
    verbose: Verbose = False,
) -> None:
    """Generate the demo world, train a tiny CLIP ensemble on it (fine-tuned from a base model
    trained on a second world) and build its attribution run."""
    from engine import demo as demo_mod
    from engine.errors import ConfigError
    from engine.models import train as train_mod

    setup_logging(verbose)
    if base_epochs < 0:
        raise typer.BadParameter(
            f"must be 0 or more, got {base_epochs}", param_hint="--base-epochs"
        )
    cfg = demo_mod.DemoConfig(
        n_train=n_train,
        n_val=n_val,
        members=members,
        seed=seed,
        snapshots=snapshots,
        base_epochs=base_epochs,
        failure=failure,
    )
    if failure not in FAILURES:
        raise typer.BadParameter(
            f"expected one of {', '.join(FAILURES)}, got {failure!r}", param_hint="--failure"
        )
    if epochs:
        cfg.epochs = epochs
    try:
        train_mod.snapshot_epochs(cfg.epochs, cfg.snapshots)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--snapshots") from err
    run = demo_mod.run_demo(cfg, out)
    typer.echo(f"demo run ready: {run}")
    typer.echo(f"inspect it with: trakview info {run}")
    if not no_serve:
        serve(run)


def train(
    ctx: typer.Context,
    train_data: TrainData,
    out: Annotated[Path, typer.Option(help="Folder for the ensemble (member-K/checkpoints/).")],
    model: Annotated[str, typer.Option(help="open_clip architecture or trakview config.")] = (
        "trakview-tiny"
    ),
    members: Annotated[int, typer.Option(help="Number of checkpoints (own seed each).")] = 4,
    epochs: Annotated[int, typer.Option(help="Epochs per member.")] = 15,
    batch_size: Annotated[int, typer.Option(help="Pairs per contrastive batch.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 3e-3,
    warmup_steps: Annotated[
        int, typer.Option(help="Linear warm-up steps before the cosine decay.")
    ] = 30,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Member K is trained with seed + K.")] = 0,
    save_epochs: Annotated[
        str,
        typer.Option(
            help="Earlier epochs to keep as epoch_N.pt besides the last, e.g. 5,10 (build them "
            "all with --checkpoints-dir OUT --epochs all)."
        ),
    ] = "",
    init: Annotated[
        str | None,
        typer.Option(
            help="Fine-tune from: a checkpoint file or an open_clip pretrained tag of --model "
            "(from the local cache; default: random init)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    data_format: Format = None,
    img_key: ImgKey = None,
    caption_key: CaptionKey = None,
    csv_separator: Separator = None,
    id_key: IdKey = "id",
    coco_captions: CocoCaptions = "first",
    image_root: ImageRoot = None,
    strict: Strict = False,
    workers: Workers = -1,
    jobs: Jobs = 0,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Train an ensemble of CLIP checkpoints (resumable per member)."""
    from engine.data.loading import check_images, image_tensors, tokenize
    from engine.data.sources import SourceOptions, read_source
    from engine.errors import DataError
    from engine.files import write_jsonl
    from engine.models import train as train_mod
    from engine.models.factory import check_quick_gelu, create, resolve_pretrained
    from engine.run.invocation import settings_of, write_toml
    from engine.run.layout import SKIPPED

    setup_logging(verbose)
    kept = inputs.epoch_list(save_epochs, epochs)
    if jobs < 0:
        raise typer.BadParameter(
            f"must be 0 (auto) or a number of processes, got {jobs}", param_hint="--jobs"
        )
    options = SourceOptions(
        data_format, img_key, caption_key, id_key, csv_separator, coco_captions, image_root
    )
    pairs = read_source(train_data, options)
    pairs, skipped = check_images(pairs, workers)
    if skipped:
        first = "; ".join(f"{r['id']}: {r['reason']}" for r in skipped[:3])
        if strict:
            raise DataError(
                f"{len(skipped)} pairs cannot be used ({first}); drop --strict to skip them"
            )
        log.warning("%d pairs skipped (%s); listed in %s", len(skipped), first, out / SKIPPED)
        write_jsonl(Path(out) / SKIPPED, skipped)
    init_path = str(resolve_pretrained(model, init)) if init else None
    tag = init if init and not Path(init).exists() else None
    if tag:
        check_quick_gelu(model, tag)
    cfg = train_mod.TrainConfig(
        model=model,
        members=members,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        seed=seed,
        init=init_path,
        save_epochs=kept,
    )
    bundle = create(model, pretrained=tag)
    images = image_tensors(pairs, bundle.preprocess, workers=workers)
    tokens = tokenize(bundle.tokenizer, pairs.captions)
    train_mod.train_ensemble(images, tokens, cfg, out, device=device, jobs=jobs)
    for member in range(cfg.members):
        for path in train_mod.member_checkpoints(out, member, cfg):
            typer.echo(str(path))
    write_toml(
        Path(out) / "train.toml",
        settings_of(ctx.params),
        Path(out),
        "trakview train settings; repeat with: trakview train --config THIS_FILE",
    )


def build(
    ctx: typer.Context,
    train_data: TrainData,
    out: Annotated[Path, typer.Option(help="Run directory to create or resume.")],
    val_data: ValData = None,
    val_fraction: ValFraction = 0.0,
    split_seed: SplitSeed = 0,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(help="Checkpoint of one ensemble member (repeat the flag)."),
    ] = None,
    checkpoints_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of open_clip_train logs (NAME/checkpoints/epoch_N.pt): by default the "
            "last epoch of each training run is one member."
        ),
    ] = None,
    epochs: Annotated[
        str | None,
        typer.Option(help="With --checkpoints-dir: 'all' or epochs like 8,16,32 of each run."),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Attribute a pretrained model: a weights file, or an open_clip tag of --model "
            "resolved from the local cache (never downloaded)."
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="open_clip architecture of the checkpoints.")] = (
        "trakview-tiny"
    ),
    data_format: Format = None,
    img_key: ImgKey = None,
    caption_key: CaptionKey = None,
    csv_separator: Separator = None,
    id_key: IdKey = "id",
    coco_captions: CocoCaptions = "first",
    image_root: ImageRoot = None,
    strict: Strict = False,
    workers: Workers = -1,
    proj_dim: Annotated[int, typer.Option(help="JL dimension; 0 = n_train/4 (64..1024).")] = 0,
    grad_params: Annotated[
        str,
        typer.Option(
            help="Attributed parameters: auto (no-token-embedding on CPU, all on CUDA), all, "
            "no-token-embedding, visual, text, or comma-separated name prefixes."
        ),
    ] = "auto",
    lambda_reg: Annotated[
        float | None, typer.Option(help="Ridge term; default: lambda-rel * mean eigenvalue.")
    ] = None,
    lambda_rel: Annotated[
        float, typer.Option(help="Relative ridge term (see --lambda-reg).")
    ] = 1e-3,
    sim_batch_size: Annotated[int, typer.Option(help="Simulated batch of the CLIP margin.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Pairs per gradient batch.")] = 50,
    topk: Annotated[
        int, typer.Option(help="Influencers stored per validation pair and sign, with scores.")
    ] = 100,
    scores: Annotated[
        str,
        typer.Option(
            help="Scores kept: "
            + choices(SCORE_FORMS)
            + "; auto: dense up to 2^28 scores, else topk."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of simulated batches and projection.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    half: Annotated[bool, typer.Option(help="float16 features (CUDA only).")] = False,
    projector: Annotated[
        str,
        typer.Option(
            help="JL projection of the gradients: "
            + choices(PROJECTORS)
            + "; auto = gaussian on CUDA with fast_jl, else sketch."
        ),
    ] = "auto",
    estimator: Estimator = "trak",
    output: Output = "margin",
    module_dim: ModuleDim = 0,
    normalize: Normalize = "none",
    overwrite: Annotated[
        bool, typer.Option(help="Start the run again if OUT holds one with other settings.")
    ] = False,
    shard_size: Annotated[
        int, typer.Option(help="Pairs per unit of work (embed, featurize, targets); 0 = 20000.")
    ] = 0,
    executor: Annotated[
        str,
        typer.Option(
            help="What runs the units: local (this process) or ray (a Ray cluster; "
            "pip install 'trakview[ray]')."
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to use ('auto': the one `ray start` made here); default: a "
            "local cluster."
        ),
    ] = None,
    gpus_per_task: Annotated[
        float, typer.Option(help="With --executor ray: GPUs per computing unit (0.5 shares one).")
    ] = 0.0,
    jobs: Jobs = 0,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Compute embeddings, TRAK scores and top influencers into a run directory (resumable)."""
    from engine.assemble import executors
    from engine.assemble.orchestrate import build as build_run
    from engine.attribution.settings import BuildConfig
    from engine.data.sources import SourceOptions
    from engine.errors import ConfigError
    from engine.run.invocation import settings_of

    setup_logging(verbose)
    options = SourceOptions(
        data_format, img_key, caption_key, id_key, csv_separator, coco_captions, image_root
    )
    runner = executors.make(executor, ray_address, gpus_per_task, jobs=jobs)  # before any reading
    train_pairs, val_pairs = inputs.read_sources(
        train_data, val_data, val_fraction, split_seed, options
    )
    if val_pairs is None:
        raise ConfigError("give --val-data, or --val-fraction to split --train-data")
    cfg = BuildConfig(
        model=model,
        checkpoints=inputs.checkpoints(model, checkpoint, checkpoints_dir, epochs, pretrained),
        pretrained=pretrained if pretrained and not Path(pretrained).exists() else None,
        workers=workers,
        proj_dim=proj_dim,
        grad_params=grad_params,
        lambda_reg=lambda_reg,
        lambda_rel=lambda_rel,
        sim_batch_size=sim_batch_size,
        batch_size=batch_size,
        seed=seed,
        device=device,
        half=half,
        topk=topk,
        scores=scores,
        projector=projector,
        shard_size=shard_size,
        estimator=estimator,
        output=output,
        module_dim=module_dim,
        normalize=normalize,
    )
    run = build_run(
        train_pairs,
        val_pairs,
        cfg,
        out,
        overwrite=overwrite,
        strict=strict,
        invocation=settings_of(ctx.params),
        executor=runner,
    )
    typer.echo(f"run ready: {run}")
