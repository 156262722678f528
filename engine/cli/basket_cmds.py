"""``trakview basket``: collect training pairs to act on, see what removing them should do, and
write the training set without them (list | add | remove | import | effect | export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from engine.cli import basket_text
from engine.cli.options import (
    CaptionKey,
    CocoCaptions,
    Format,
    IdKey,
    ImageRoot,
    ImgKey,
    RunArg,
    Separator,
    Verbose,
    setup_logging,
)
from engine.curate.choices import CAUSE_RANKINGS
from engine.evaluate.choices import CONTROLS

basket_app = typer.Typer(
    no_args_is_help=True,
    help="Baskets of training pairs kept in the run (RUN/baskets/NAME.json): list | add | remove "
    "| import | grow | effect | export.",
)

NameArg = Annotated[str, typer.Argument(help="The basket's name (letters, digits, . _ -).")]
Why = Annotated[str, typer.Option(help="Why these pairs go in (default: how they were chosen).")]
Who = Annotated[str | None, typer.Option(help="Who adds them (default: your user name).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
SplitSeed = Annotated[int, typer.Option(help="Seed of the validation halves a and b.")]
# `trakview eval clean`'s own options (the command lives with the other evaluations)
Ensembles = Annotated[
    int,
    typer.Option(
        help="Ensembles of the run's members per condition: models get seeds train seed + "
        "0 .. ensembles x members - 1 (more: narrower intervals)."
    ),
]
Controls = Annotated[
    str,
    typer.Option(
        help="Comma-separated controls (or none): "
        + "; ".join(f"{k}: {v}" for k, v in CONTROLS.items())
        + "."
    ),
]
Measure = Annotated[
    str,
    typer.Option(
        help="Validation pairs measured: auto (those whose scores chose none of the basket), "
        "all, or half a / b (drawn with --split-seed)."
    ),
]


def _open(run: Path) -> Any:
    from engine.explore.run_data import RunData

    return RunData(run)


@basket_app.command("list")
def list_baskets(
    run: RunArg,
    name: Annotated[str | None, typer.Argument(help="A basket: list its pairs.")] = None,
    as_json: AsJson = False,
) -> None:
    """The run's baskets, or one basket's pairs with who added each, when, how and why."""
    from engine.curate import baskets
    from engine.run.layout import RunLayout

    layout = RunLayout(run)
    if name is None:
        found = [baskets.read_basket(layout, n) for n in baskets.basket_names(layout)]
        if as_json:
            typer.echo(json.dumps([{"name": b.name, "pairs": len(b.entries)} for b in found]))
        for b in [] if as_json else found:
            typer.echo(f"{b.name:<24} {len(b.entries):>6} pairs   updated {b.updated}")
        if not found and not as_json:
            typer.echo("no baskets yet: add pairs with `trakview basket add` or the dashboard")
        return
    basket = baskets.read_basket(layout, name)
    if as_json:
        typer.echo(json.dumps(basket.to_json(), indent=2))
        return
    for e in basket.entries:
        typer.echo(f"{e.id}\t{e.who}\t{e.when}\t{e.how}\t{e.why}")
    typer.echo(f"{len(basket.entries)} pairs in {name}")


@basket_app.command()
def add(
    run: RunArg,
    name: NameArg,
    ids: Annotated[list[str] | None, typer.Argument(help="Training pair ids to add.")] = None,
    suspects: Annotated[int, typer.Option(help="Add the N most suspected mislabeled pairs.")] = 0,
    harmful: Annotated[
        int,
        typer.Option(
            help="Add the N pairs whose scores summed over --val-half are lowest (only negative "
            "sums): the most harmful to those validation pairs."
        ),
    ] = 0,
    val_half: Annotated[
        str,
        typer.Option(
            help="With --harmful: all (every validation pair), a or b (two halves drawn with "
            "--split-seed: choose on one, verify on the other with `eval clean`)."
        ),
    ] = "all",
    split_seed: SplitSeed = 0,
    search: Annotated[
        str | None, typer.Option(help="Add the pairs whose caption contains this text.")
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(help="Add the pairs whose field KEY equals VALUE, given as KEY=VALUE."),
    ] = None,
    causes: Annotated[
        int,
        typer.Option(
            help="Add the N top causes of the failure of --for GROUP, ranked on one half of the "
            "group (--group-half); the other half is held out for `eval clean`."
        ),
    ] = 0,
    for_group: Annotated[
        str | None,
        typer.Option(
            "--for",
            help="With --causes: a group of validation pairs, RULE:VALUE "
            "(as `trakview explain --group`: failing:40, column:source=web, ...).",
        ),
    ] = None,
    group_half: Annotated[
        str, typer.Option(help="With --causes: the half of the group that ranks them, a or b.")
    ] = "a",
    rank_by: Annotated[
        str,
        typer.Option(
            "--rank-by",
            help="With --causes, how they are ranked: "
            + "; ".join(f"{k}: {v}" for k, v in CAUSE_RANKINGS.items())
            + ".",
        ),
    ] = "confusion",
    why: Why = "",
    who: Who = None,
    verbose: Verbose = False,
) -> None:
    """Add training pairs to a basket (created when missing): by id, or chosen by a rule."""
    from engine.curate import baskets, select
    from engine.errors import CurateError

    setup_logging(verbose)
    baskets.check_name(name)
    data = _open(run)
    picks: list[tuple[Any, str, str, list[str], bool]] = []  # rows, how, why, val ids, every val
    if ids:
        picks.append((baskets.rows_of_ids(data.train, ids), "cli", "listed by hand", [], False))
    if suspects:
        if data.suspect is None:
            raise CurateError(f"run {run} has no suspect ranking: rebuild it with this trakview")
        rows = select.top_suspects(data.suspect, suspects)
        picks.append((rows, "suspects", f"among the {suspects} most suspect", [], False))
    if harmful:
        picks.append(_harmful(data, harmful, val_half, split_seed))
    if search:
        rows = select.caption_matches(data.train, search)
        picks.append((rows, "search", f"caption contains {search!r}", [], False))
    if column:
        key, sep, value = column.partition("=")
        if not sep:
            raise CurateError(f"--column takes KEY=VALUE, got {column!r}")
        rows = select.column_matches(data.train, key.strip(), value)
        picks.append((rows, "column", f"{key.strip()} = {value.strip()}", [], False))
    group_record = None
    if causes:
        from engine.curate.causes import causes_pick
        from engine.explore.view import RunView

        if not for_group:
            raise CurateError("--causes N needs --for GROUP (e.g. --for failing:40)")
        rows, how, reason, val_ids, group_record = causes_pick(
            RunView.load(run), causes, for_group, group_half, split_seed, rank_by, 3
        )
        picks.append((rows, how, reason, val_ids, False))
    elif for_group:
        raise CurateError("--for GROUP goes with --causes N")
    if not picks:
        raise CurateError(
            "nothing to add: give ids, or --suspects N, --harmful N, --search TEXT, "
            "--column KEY=VALUE or --causes N --for GROUP"
        )
    if group_record is not None:  # before the pairs: a basket of another group is refused
        baskets.check_name(name)
        if baskets.find_basket(data.layout, name) is not None:
            baskets.set_group(data.layout, name, group_record)
    for rows, how, reason, val_ids, every in picks:
        basket, added = baskets.add_rows(
            data.layout, name, data.train, rows, why or reason, how, who, val_ids, every
        )
        typer.echo(f"{how}: {added} of {len(rows)} pairs added ({len(rows) - added} were in it)")
    if group_record is not None:
        basket = baskets.set_group(data.layout, name, group_record)
        typer.echo(
            f"chosen on {len(group_record['chosen_with'])} pairs of {group_record['spec']}; "
            f"{len(group_record['held_out'])} held out for `trakview eval clean`"
        )
    typer.echo(f"basket {name}: {len(basket.entries)} pairs, in {data.layout.basket(name)}")


def _harmful(data: Any, n: int, half: str, split_seed: int) -> tuple[Any, str, str, list, bool]:
    from engine.curate import select
    from engine.errors import CurateError

    if half == "all":
        rows = select.most_harmful(data.scores.totals, n)
        return rows, "harmful", f"among the {n} most harmful overall", [], True
    if half not in ("a", "b"):
        raise CurateError(f"--val-half must be all, a or b, got {half!r}")
    val_rows = select.val_halves(len(data.val), split_seed)[half == "b"]
    rows = select.most_harmful(select.column_sum(data.scores, val_rows), n)
    val_ids = [str(data.val[j]["id"]) for j in val_rows]
    why = f"among the {n} most harmful to validation half {half} (split seed {split_seed})"
    return rows, "harmful", why, val_ids, False


@basket_app.command()
def remove(
    run: RunArg,
    name: NameArg,
    ids: Annotated[list[str], typer.Argument(help="Training pair ids to take out.")],
) -> None:
    """Take pairs out of a basket."""
    from engine.curate import baskets
    from engine.run.layout import RunLayout

    basket, removed = baskets.remove_ids(RunLayout(run), name, ids)
    typer.echo(f"{removed} of {len(ids)} pairs taken out; basket {name}: {len(basket.entries)}")


@basket_app.command("import")
def import_ids(
    run: RunArg,
    name: NameArg,
    file: Annotated[
        Path,
        typer.Argument(
            help="Ids, one per line (# comments), or a .jsonl / .csv / .tsv with an id field."
        ),
    ],
    why: Why = "",
    who: Who = None,
) -> None:
    """Add the training pairs listed in a file (another basket's removed.jsonl works too)."""
    from engine.curate import baskets, select
    from engine.errors import CurateError

    baskets.check_name(name)
    if not file.is_file():
        raise CurateError(f"{file} does not exist or is not a file")
    ids = select.parse_ids(file.read_text(encoding="utf-8"), file.name)
    data = _open(run)
    rows = baskets.rows_of_ids(data.train, ids)
    basket, added = baskets.add_rows(
        data.layout, name, data.train, rows, why or f"imported from {file.name}", "import", who
    )
    typer.echo(f"{added} of {len(ids)} pairs added; basket {name}: {len(basket.entries)} pairs")


EFFECT_HELP = (
    "What removing the basket should do to every validation pair's margin (TRAK's linear "
    "datamodel: the margin changes by minus the removed pairs' scores, summed), with the run's "
    "trust verdict as the caveat."
)
EXPORT_HELP = (
    "Write the training source without the basket's pairs, in the source's own format, with the "
    "removed pairs and their reasons, into a new folder; read back with trakview's reader first."
)


@basket_app.command(help=EFFECT_HELP)
def effect(
    run: RunArg,
    name: NameArg,
    k: Annotated[int, typer.Option("-k", help="Validation pairs listed per direction.")] = 10,
    for_group: Annotated[
        str | None,
        typer.Option(
            "--for",
            help="A group (RULE:VALUE): the share of its failure the basket should remove "
            "(default: the group its causes were chosen for, if any).",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """What removing the basket should do to every validation pair's margin (TRAK's linear
    datamodel: the margin changes by minus the removed pairs' scores, summed)."""
    from engine.cli.basket_text import group_effect_text
    from engine.curate import baskets
    from engine.curate.causes import group_effect_doc
    from engine.curate.effect import run_effect
    from engine.explore.view import RunView

    data = RunView.load(run)
    basket = baskets.read_basket(data.layout, name)
    result = run_effect(data, basket)
    doc = {"basket": name, **result.to_json(data.val, k)}
    group = group_effect_doc(data, basket, for_group)
    if group is not None:
        doc["group"] = group
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(basket_text.effect_text(doc))
    if group is not None:
        typer.echo(group_effect_text(group))


@basket_app.command(help=EXPORT_HELP)
def export(
    run: RunArg,
    name: NameArg,
    out: Annotated[Path, typer.Option(help="A new (or empty) folder for the cleaned set.")],
    train_data: Annotated[
        str | None,
        typer.Option(help="The training source (default: the one RUN/run.toml records)."),
    ] = None,
    data_format: Format = None,
    img_key: ImgKey = None,
    caption_key: CaptionKey = None,
    csv_separator: Separator = None,
    id_key: IdKey = "id",
    coco_captions: CocoCaptions = "first",
    image_root: ImageRoot = None,
) -> None:
    """Write the training source without the basket's pairs, in the source's own format, with
    the removed pairs and their reasons; read back with trakview's reader as a check."""
    from engine.curate import baskets
    from engine.curate.cleaned import clean_run, export_cleaned
    from engine.curate.source import given_source
    from engine.data.sources import SourceOptions
    from engine.run.layout import RunLayout
    from engine.run.manifest import open_manifest

    layout = RunLayout(run)
    manifest = open_manifest(run)
    basket = baskets.read_basket(layout, name)
    source = None
    if train_data is not None:
        options = SourceOptions(
            data_format, img_key, caption_key, id_key, csv_separator, coco_captions, image_root
        )
        source = given_source(train_data, options)
    cleaned = clean_run(layout, manifest, basket, source)
    folder = export_cleaned(cleaned, out)
    counts = cleaned.summary["counts"]
    typer.echo(
        f"{counts['kept']} of {counts['source']} pairs kept, {counts['removed']} removed: "
        f"{folder / cleaned.main} (removed pairs: {folder / cleaned.summary['files']['removed']})"
    )
    typer.echo(cleaned.summary["check"])
    for note in cleaned.summary["notes"]:
        typer.echo(f"note: {note}")
