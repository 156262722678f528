"""Options shared by several commands, and what every command does first (logging).

Nothing heavy is imported here: ``trakview --help`` must answer at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from engine.attribution.settings import DEFAULT_MODULE_DIM, ESTIMATORS, NORMALIZATIONS, OUTPUTS


def choices(table: dict[str, str]) -> str:
    """A flag's choices as its --help lists them: the table the code reads."""
    return "; ".join(f"{k} ({v})" for k, v in table.items())


# build's estimator flags (the tables: engine.attribution.settings, light to import)
Estimator = Annotated[
    str, typer.Option(help="How gradients become scores: " + choices(ESTIMATORS) + ".")
]
Output = Annotated[
    str, typer.Option(help="The training side's model output: " + choices(OUTPUTS) + ".")
]
ModuleDim = Annotated[
    int,
    typer.Option(
        help=f"--estimator modules: dimensions per module (0 = {DEFAULT_MODULE_DIM}); the "
        "run keeps the sum over modules per pair and checkpoint."
    ),
]
Normalize = Annotated[
    str,
    typer.Option(
        help="The training pairs' features after the solve: " + choices(NORMALIZATIONS) + "."
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")]
RunArg = Annotated[Path, typer.Argument(help="A run directory (trakview build / demo).")]


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("engine").setLevel(logging.DEBUG if verbose else logging.INFO)


def load_config(ctx: typer.Context, _param: Any, value: Path | None) -> None:
    """Eager callback of ``--config``: the file's settings become the command's defaults."""
    if value is None:
        return
    from engine.errors import ConfigError
    from engine.run.invocation import read_settings

    try:
        settings = read_settings(Path(value), {p.name for p in ctx.command.params}, ctx.info_name)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None
    ctx.default_map = {**(ctx.default_map or {}), **settings}


ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file of this command's flags (command-line flags win); a run writes its own "
        "as RUN/run.toml, so `trakview build --config RUN/run.toml` repeats it.",
        is_eager=True,
        callback=load_config,
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
        help="Source format: jsonl, csv, coco, imagefolder, wds (default: from the path).",
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
ImageRoot = Annotated[
    str | None,
    typer.Option(
        help="Folder the image paths of the listing start from (default: the listing's folder; "
        "COCO: also the split's folder beside annotations/, as downloaded)."
    ),
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
