"""``trakview explain``: from a group of validation pairs (or new pairs) to the training pairs
behind them. The engine is imported inside the command, so ``--help`` costs nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from engine.cli.options import RunArg, setup_logging
from engine.explain.rules import DEFAULT_CLIP_N, RULES

_RULES_HELP = "; ".join(f"{k}: {v}" for k, v in RULES.items())


def group_param(
    group: str | None,
    val: list[str] | None,
    val_search: str | None,
    val_clip: str | None,
    top: int,
    val_column: str | None,
    val_failing: int | None,
    by: str,
    val_region: str | None,
) -> str | None:
    """The one group the flags name, as RULE:VALUE (None: none named)."""
    given = {
        "--group": group,
        "--val": f"ids:{','.join(val)}" if val else None,
        "--val-search": f"search:{val_search}" if val_search else None,
        "--val-clip": f"clip:{top}/{val_clip}" if val_clip else None,
        "--val-column": f"column:{val_column}" if val_column else None,
        "--val-failing": f"failing:{val_failing}/{by}" if val_failing is not None else None,
        "--val-region": f"region:{val_region}" if val_region else None,
    }
    named = {k: v for k, v in given.items() if v}
    if len(named) > 1:
        raise typer.BadParameter(f"name one group, got {', '.join(named)}")
    return next(iter(named.values()), None)


def explain(
    run: RunArg,
    group: Annotated[
        str | None, typer.Option(help=f"A group as RULE:VALUE. Rules: {_RULES_HELP}.")
    ] = None,
    val: Annotated[
        list[str] | None, typer.Option(help="Validation pair ids (repeatable): group ids:...")
    ] = None,
    val_search: Annotated[
        str | None, typer.Option(help="Pairs whose caption or id contains this text.")
    ] = None,
    val_clip: Annotated[
        str | None, typer.Option(help="The --top pairs that best match this text by CLIP.")
    ] = None,
    top: Annotated[int, typer.Option(help="Pairs of a --val-clip group.")] = DEFAULT_CLIP_N,
    val_column: Annotated[
        str | None, typer.Option(help="Pairs whose field K equals V: K=V.")
    ] = None,
    val_failing: Annotated[
        int | None, typer.Option(help="The N pairs whose own caption ranks worst.")
    ] = None,
    by: Annotated[str, typer.Option(help="--val-failing by 'rank' or 'margin'.")] = "rank",
    val_region: Annotated[
        str | None, typer.Option(help="Pairs inside x0,x1,y0,y1 of the dashboard's map.")
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(help='New pairs instead: a JSONL file of {"image": PATH, "caption": TEXT}.'),
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Training pairs listed per list.")] = 10,
    wrong: Annotated[
        int, typer.Option(help="Wrong matches attributed per failing pair (training captions).")
    ] = 3,
    no_confusion: Annotated[
        bool,
        typer.Option("--no-confusion", help="Skip the wrong matches (no new queries: instant)."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda (new queries).")] = "cpu",
) -> None:
    """Why do these pairs fail? The training pairs behind a group's wrong matches, what they
    share, and the group's most helpful and harmful training pairs."""
    from tqdm.auto import tqdm

    from engine.explain import report as report_mod
    from engine.explain.rules import GroupSpec
    from engine.explore.view import RunView

    setup_logging(False)
    param = group_param(
        group, val, val_search, val_clip, top, val_column, val_failing, by, val_region
    )
    if (param is None) == (pairs is None):
        raise typer.BadParameter(
            "name one group (--group, --val, --val-search, --val-clip, --val-column, "
            "--val-failing, --val-region) or --pairs FILE.jsonl"
        )
    if k < 1:
        raise typer.BadParameter(f"must be at least 1, got {k}", param_hint="-k")
    view = RunView.load(run)
    if device != "cpu":
        view.engine.device = device
    bar = tqdm(
        desc="new queries", unit="query", disable=no_confusion and pairs is None, leave=False
    )

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    if pairs is not None:
        records = report_mod.read_new_pairs(pairs)
        rep = report_mod.explain_pairs(view, records, not no_confusion, wrong, progress)
        shown_val = records
    else:
        rep = report_mod.explain_group(
            view, GroupSpec.parse(param), not no_confusion, wrong, progress
        )
        shown_val = view.val
    bar.close()
    doc = rep.to_json(view.train, shown_val, k)
    if as_json:
        typer.echo(json.dumps({**doc, "trust": view.verdict().to_json()}, indent=2))
        return
    _print(doc)


def _print(doc: dict) -> None:
    s, rest = doc["stats"], doc["rest"]
    typer.echo(f"group            {doc['group']}: {s['pairs']} pairs")
    if "median_caption_rank" in s:
        typer.echo(
            f"matching         median caption rank {s['median_caption_rank']:g}, "
            f"R@5 {s['r5']:.2f}, mean margin {s['mean_margin']:.3f} (other validation pairs: "
            f"{rest['median_caption_rank']:g}, {rest['r5']:.2f}, {rest['mean_margin']:.3f})"
        )
    conf = doc.get("confusion")
    if conf:
        typer.echo(f"\nmatched instead to ({conf['pairs_attributed']} pairs attributed):")
        for m in conf["wrong_matches"][:10]:
            typer.echo(f"  {m['val_id']:<10} -> {m['other_id']:<10} {m['other_caption']}")
        if conf["wrong_captions_share"]:
            typer.echo("  those captions share: " + _features(conf["wrong_captions_share"]))
        typer.echo("\ncauses (training pairs that most help the wrong matches):")
        for c in conf["causes"]:
            typer.echo(f"  {c['score']:+.4g}  {c['id']:<10} {c['caption']}")
    if doc["shared"]:
        typer.echo("\nthe top causes share: " + _features(doc["shared"]))
    conc = doc["concentration"]
    for title, key in (("helps the group most", "helpful"), ("hurts the group most", "harmful")):
        typer.echo(f"\n{title}:")
        for c in doc[key]:
            typer.echo(f"  {c['score']:+.4g}  {c['id']:<10} {c['caption']}")
        n_for = conc[key]["n_for"]
        if n_for:
            typer.echo(
                f"  half of it carried by {n_for['0.5']} pairs, 80% by {n_for['0.8']} "
                f"(of {conc[key]['pairs']})"
            )


def _features(features: list[dict]) -> str:
    return "; ".join(
        f"{f['label']} ({f['count']}/{f['picked']}, {f['base_share']:.0%} of all)"
        for f in features[:6]
    )
