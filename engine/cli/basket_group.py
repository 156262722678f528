"""Baskets for a group of failing validation pairs: ``basket add --causes N --for GROUP``,
``basket grow`` and the share of a group's failure a basket is predicted to remove."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from engine.cli.basket_cmds import AsJson, NameArg, Who, Why, basket_app
from engine.cli.options import RunArg, setup_logging
from engine.curate.choices import GROW_RULES


@basket_app.command("grow")
def grow_cmd(
    run: RunArg,
    name: NameArg,
    by: Annotated[
        str | None,
        typer.Option(
            help="What to grow by: "
            + "; ".join(GROW_RULES.values())
            + ". Without it: list what the basket's pairs share."
        ),
    ] = None,
    min_share: Annotated[
        float, typer.Option(help="auto: the share of the basket's pairs a feature needs.")
    ] = 0.5,
    why: Why = "",
    who: Who = None,
    as_json: AsJson = False,
) -> None:
    """Grow a basket by what its pairs share (a column value, a caption word, a visual cluster)
    or by their nearest training images: a fix has to catch nearly all of a cause."""
    from engine import files
    from engine.curate import baskets, grow
    from engine.explain import describe, report
    from engine.explore.view import RunView

    setup_logging(False)
    view = RunView.load(run)
    basket = baskets.read_basket(view.layout, name)
    rows = baskets.basket_rows(basket, view.train)
    features = report.training_features(view)
    if by is None:
        shared = describe.describe(features, rows, top=10)
        if as_json:
            typer.echo(json.dumps([f.to_json() for f in shared], indent=2))
            return
        typer.echo(f"basket {name}: {len(rows)} pairs; what they share (grow --by RULE):")
        for f in shared:
            carrying = features.rows_with(f)
            new = len(set(carrying.tolist()) - set(rows.tolist()))
            typer.echo(
                f"  {f.rule():<36} {f.count}/{f.picked} of the basket, {f.base_share:.1%} of all "
                f"(adds {new})"
            )
        return
    emb = files.load_npy(view.layout.embeddings("train", "image"), mmap=True)
    growth = grow.grow(by, rows, features, emb, min_share=min_share)
    basket, added = baskets.add_rows(
        view.layout, name, view.train, growth.rows, why or growth.why, "grow", who
    )
    doc = {
        "basket": name,
        "rule": growth.rule,
        "why": growth.why,
        "added": added,
        "pairs": len(basket.entries),
    }
    if as_json:
        typer.echo(json.dumps(doc))
        return
    typer.echo(
        f"grow {growth.rule}: {added} pairs added ({growth.why}); "
        f"basket {name}: {doc['pairs']} pairs"
    )
