"""The ``trakview`` command line: demo | train | build | serve | query | export | eval | info.

Every command turns its flags into the engine's config dataclasses; errors from bad input are
printed as one line (``error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from engine import data, models, runconfig, sources, store

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="trakview: why does a CLIP model match this image and caption? Answered with TRAK.",
)
log = logging.getLogger("engine")

# Errors that come from the user's input or environment; anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("engine").setLevel(logging.DEBUG if verbose else logging.INFO)


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")]


@app.command()
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
    seed: Annotated[int, typer.Option(help="Seed of the world, training and attribution.")] = 0,
    verbose: Verbose = False,
) -> None:
    """Generate the demo world, train a tiny CLIP ensemble on it and build its attribution run."""
    from engine import demo as demo_mod
    from engine import train as train_mod

    _setup_logging(verbose)
    cfg = demo_mod.DemoConfig(
        n_train=n_train, n_val=n_val, members=members, seed=seed, snapshots=snapshots
    )
    if epochs:
        cfg.epochs = epochs
    try:
        train_mod.snapshot_epochs(cfg.epochs, cfg.snapshots)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--snapshots") from err
    run = demo_mod.run_demo(cfg, out)
    typer.echo(f"demo run ready: {run}")
    typer.echo(f"inspect it with: trakview info {run}")
    if not no_serve:
        serve(run)


ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file of this command's flags (command-line flags win); a run writes its own "
        "as RUN/run.toml, so `trakview build --config RUN/run.toml` repeats it.",
        is_eager=True,
        callback=runconfig.load_into_context,
    ),
]
TrainData = Annotated[
    str,
    typer.Option(
        help="Training pairs: .jsonl, .csv/.tsv (open_clip_train), COCO captions .json, an image "
        "folder with metadata.jsonl/csv, or WebDataset shards 'dir/{000000..000009}.tar'."
    ),
]
ValData = Annotated[
    str | None,
    typer.Option(help="Validation pairs to explain (any format --train-data takes)."),
]
ValFraction = Annotated[
    float,
    typer.Option(
        help="Without --val-data: this fraction of --train-data, drawn with --split-seed, "
        "becomes the validation set."
    ),
]
SplitSeed = Annotated[int, typer.Option(help="Seed of the --val-fraction split.")]
Format = Annotated[
    str | None,
    typer.Option(
        "--format",
        help=f"Source format: {', '.join(sources.FORMATS)} (default: from the path).",
    ),
]
ImgKey = Annotated[
    str | None,
    typer.Option(
        "--img-key",
        "--csv-img-key",
        help="Column of the image path (csv: filepath, jsonl: image, image folder: file_name).",
    ),
]
CaptionKey = Annotated[
    str | None,
    typer.Option(
        "--caption-key",
        "--csv-caption-key",
        help="Column of the caption (csv: title, jsonl: caption, image folder: text, COCO: "
        "caption).",
    ),
]
Separator = Annotated[
    str | None,
    typer.Option(
        help="CSV separator (default: tab, as open_clip_train; comma for a .csv "
        "whose header has no tab)."
    ),
]
IdKey = Annotated[
    str, typer.Option(help="Column of the pair id (default: the image path without extension).")
]
CocoCaptions = Annotated[
    str, typer.Option(help="COCO: 'first' caption per image, or 'all' (one pair per caption).")
]
Strict = Annotated[
    bool,
    typer.Option(
        help="Fail on a broken or missing image or an empty caption instead of skipping it."
    ),
]
Workers = Annotated[
    int,
    typer.Option(
        help="DataLoader workers reading images; -1 = none below 1000 images, else up to 4."
    ),
]
Jobs = Annotated[
    int,
    typer.Option(
        help="Processes working side by side on this machine (0 = auto: one per CPU core, up to "
        "4, for a large enough job on a CPU; 1 = this process)."
    ),
]


def _read_sources(
    train_data: str,
    val_data: str | None,
    val_fraction: float,
    split_seed: int,
    options: sources.SourceOptions,
) -> tuple[data.PairSet, data.PairSet | None]:
    train_pairs = sources.read_source(train_data, options)
    if val_data is not None:
        if val_fraction:
            raise data.DataError("give either --val-data or --val-fraction, not both")
        return train_pairs, sources.read_source(val_data, options)
    if not val_fraction:
        return train_pairs, None
    return sources.split_val(train_pairs, val_fraction, split_seed)


def _checkpoints(
    model: str,
    checkpoint: list[Path] | None,
    checkpoints_dir: Path | None,
    epochs: str | None,
    pretrained: str | None,
) -> list[str]:
    given = [
        f
        for f, v in (
            ("--checkpoint", checkpoint),
            ("--checkpoints-dir", checkpoints_dir),
            ("--pretrained", pretrained),
        )
        if v
    ]
    if len(given) != 1:
        raise ValueError(
            "give the checkpoints one way: --checkpoint PATH (repeatable), --checkpoints-dir DIR "
            f"(open_clip_train's logs), or --pretrained TAG_OR_FILE; got "
            f"{' and '.join(given) or 'none'}"
        )
    if epochs and not checkpoints_dir:
        raise ValueError("--epochs picks epochs from --checkpoints-dir; give that too")
    if checkpoint:
        return [str(p) for p in checkpoint]
    if checkpoints_dir:
        found = models.find_checkpoints(checkpoints_dir, epochs)
        log.info(
            "%d checkpoints from %s: %s",
            len(found),
            checkpoints_dir,
            ", ".join(str(p.relative_to(checkpoints_dir)) for p in found),
        )
        return [str(p) for p in found]
    return [str(models.resolve_pretrained(model, pretrained))]


def open_clip_quick_gelu(model: str, tag: str) -> bool:
    import open_clip

    return bool(open_clip.get_pretrained_cfg(model, tag).get("quick_gelu"))


def _epoch_list(text: str, epochs: int) -> list[int]:
    try:
        values = sorted({int(v) for v in text.replace(" ", "").split(",") if v})
    except ValueError as err:
        raise typer.BadParameter(
            f"expected epochs like 5,10: {err}", param_hint="--save-epochs"
        ) from err
    from engine import train as train_mod

    try:  # the trainer's own rule, checked before any data is read
        train_mod.check_save_epochs(train_mod.TrainConfig(epochs=epochs, save_epochs=values))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--save-epochs") from err
    return values


@app.command()
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
    strict: Strict = False,
    workers: Workers = -1,
    jobs: Jobs = 0,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Train an ensemble of CLIP checkpoints (resumable per member)."""
    from engine import train as train_mod

    _setup_logging(verbose)
    kept = _epoch_list(save_epochs, epochs)
    if jobs < 0:
        raise typer.BadParameter(
            f"must be 0 (auto) or a number of processes, got {jobs}", param_hint="--jobs"
        )
    options = sources.SourceOptions(
        data_format, img_key, caption_key, id_key, csv_separator, coco_captions
    )
    pairs = sources.read_source(train_data, options)
    pairs, skipped = data.check_images(pairs, workers)
    if skipped:
        first = "; ".join(f"{r['id']}: {r['reason']}" for r in skipped[:3])
        if strict:
            raise data.DataError(
                f"{len(skipped)} pairs cannot be used ({first}); drop --strict to skip them"
            )
        log.warning(
            "%d pairs skipped (%s); listed in %s", len(skipped), first, out / "skipped.jsonl"
        )
        store.write_jsonl(Path(out) / "skipped.jsonl", skipped)
    init_path = str(models.resolve_pretrained(model, init)) if init else None
    tag = init if init and not Path(init).exists() else None
    if tag and open_clip_quick_gelu(model, tag) and "quickgelu" not in model.lower():
        raise ValueError(
            f"{model} {tag!r} was trained with QuickGELU: train it as --model {model}-quickgelu"
        )
    cfg = train_mod.TrainConfig(
        model=model,
        members=members,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        init=init_path,
        save_epochs=kept,
    )
    bundle = models.create(model, pretrained=tag)
    images = data.image_tensors(pairs, bundle.preprocess, workers=workers)
    tokens = data.tokenize(bundle.tokenizer, pairs.captions)
    train_mod.train_ensemble(images, tokens, cfg, out, device=device, jobs=jobs)
    for member in range(cfg.members):
        for path in train_mod.member_checkpoints(out, member, cfg):
            typer.echo(str(path))
    runconfig.write_toml(
        Path(out) / "train.toml",
        runconfig.settings_of(ctx),
        Path(out),
        "trakview train settings; repeat with: trakview train --config THIS_FILE",
    )


@app.command()
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
        int, typer.Option(help="Influencers stored per validation pair and sign.")
    ] = 50,
    seed: Annotated[int, typer.Option(help="Seed of simulated batches and projection.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    half: Annotated[bool, typer.Option(help="float16 features (CUDA only).")] = False,
    projector: Annotated[
        str,
        typer.Option(
            help="JL projection of the gradients: gaussian, gaussian-bf16 or sketch (count sketch "
            "then Gaussian, O(D) per pair); auto = gaussian on CUDA with fast_jl, else sketch."
        ),
    ] = "auto",
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
    from engine import attribute, executors

    _setup_logging(verbose)
    options = sources.SourceOptions(
        data_format, img_key, caption_key, id_key, csv_separator, coco_captions
    )
    runner = executors.make(executor, ray_address, gpus_per_task, jobs=jobs)  # before any reading
    train_pairs, val_pairs = _read_sources(train_data, val_data, val_fraction, split_seed, options)
    if val_pairs is None:
        raise data.DataError("give --val-data, or --val-fraction to split --train-data")
    cfg = attribute.BuildConfig(
        model=model,
        checkpoints=_checkpoints(model, checkpoint, checkpoints_dir, epochs, pretrained),
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
        projector=projector,
        shard_size=shard_size,
    )
    run = attribute.build(
        train_pairs,
        val_pairs,
        cfg,
        out,
        overwrite=overwrite,
        strict=strict,
        invocation=runconfig.settings_of(ctx),
        executor=runner,
    )
    typer.echo(f"run ready: {run}")


@app.command()
def query(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    image: Annotated[Path, typer.Option(help="The query image (any format PIL reads).")],
    caption: Annotated[str, typer.Option(help="The caption the image should match.")],
    k: Annotated[int, typer.Option("-k", help="Influencers per sign.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Top positive and negative training influencers of a new image and caption."""
    from engine.query import QueryEngine

    _setup_logging(False)
    result = QueryEngine.load(run, device=device).query(image, caption, k=k)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"caption          {result.caption!r}")
    typer.echo(f"CLIP similarity  {result.clip_similarity:.3f}   margin {result.margin:.3f}")
    for title, cards in (
        ("helps most", result.positive),
        ("hurts most", result.negative),
        ("most similar (CLIP)", result.similar),
    ):
        typer.echo(f"\n{title}:")
        for c in cards:
            typer.echo(f"  {c.rank:>3}  {c.score:+.4g}  {c.id:<10} {c.caption}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    fmt: Annotated[
        str, typer.Option("--format", help="zip, html, png (contact sheet), csv or json.")
    ],
    out: Annotated[Path, typer.Option(help="File to write (its folder is created if needed).")],
    val: Annotated[
        str | None, typer.Option(help="Validation pair id to export (or --image and --caption).")
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="A new query's image (with --caption, instead of --val).")
    ] = None,
    caption: Annotated[
        str | None, typer.Option(help="A new query's caption (with --image, instead of --val).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Influencers per sign.")] = 10,
    device: Annotated[str, typer.Option(help="cpu or cuda (new queries only).")] = "cpu",
) -> None:
    """Export a pair's influencer gallery as a zip, an offline html page, a png, csv or json."""
    from engine import export as export_mod
    from engine.query import QueryEngine

    _setup_logging(False)
    new_query = image is not None or caption is not None
    if (val is not None and new_query) or (val is None and (image is None or caption is None)):
        flags = (("--val", val), ("--image", image), ("--caption", caption))
        given = [flag for flag, value in flags if value is not None]
        raise data.InputError(
            "give either --val ID or both --image PATH and --caption TEXT; got "
            f"{' and '.join(given) or 'none of them'}"
        )
    export_mod.parse_format(fmt)
    engine = QueryEngine.load(run, device=device)
    if val is not None:
        result, query_image = engine.for_val(val, k=k), None
    else:
        query_image = data.open_query_image(image)
        result = engine.query(query_image, caption, k=k)
    typer.echo(str(export_mod.export(run, result, fmt, out, query_image=query_image)))


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    port: Annotated[int, typer.Option(help="Port of the dashboard.")] = 8501,
) -> None:
    """Open the dashboard on a run (Streamlit; Ctrl-C stops it)."""
    import importlib.util
    import os
    import signal
    import subprocess

    from engine import runs

    runs.read_manifest(run)
    app_py = Path(importlib.util.find_spec("dashboard").origin).parent / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_py), "--server.port", str(port)]
    cmd += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    cmd += ["--theme.primaryColor", "#4575b4"]  # red and green mean negative and positive
    typer.echo(f"dashboard of {run} on http://localhost:{port} (Ctrl-C stops it)")
    proc = subprocess.Popen(cmd, env={**os.environ, "TRAKVIEW_RUN": str(Path(run).resolve())})
    # Ctrl-C and SIGTERM go on to Streamlit, so stopping this process never leaves it running.
    stops = (signal.SIGINT, signal.SIGTERM)
    forward = {s: signal.signal(s, lambda n, _: proc.send_signal(n)) for s in stops}
    try:
        code = proc.wait()
    finally:
        for s, handler in forward.items():
            signal.signal(s, handler)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise typer.Exit(code)


@app.command()
def info(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest.")] = False,
) -> None:
    """Summarise a run directory: model, checkpoints, sizes, settings and timings."""
    from engine import runs

    manifest = runs.read_manifest(run)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    typer.echo(runs.summary(manifest))


from engine.evaluate_cli import eval_app  # noqa: E402 (sub-commands of `trakview eval`)

app.add_typer(eval_app, name="eval")


def main() -> None:
    """Console entry point: one-line errors for bad input."""
    try:
        app()
    except USER_ERRORS as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
