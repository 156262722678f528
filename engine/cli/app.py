"""The ``trakview`` command line: demo | train | build | serve | query | export | explain | eval |
basket | info | compare.

Errors about the user's input, run or environment (``engine.errors.TrakviewError``) are printed
as one line (``error: ...``) with exit status 2; anything else is a bug and keeps its traceback.
The commands import the engine inside their bodies, so starting the CLI costs only typer.
"""

from __future__ import annotations

import sys

import typer

from engine.cli import (  # noqa: F401  (basket_group: registers its commands)
    basket_cmds,
    basket_group,
    compare_cmds,
    eval_cmds,
    explain_cmds,
    explore,
    pipeline,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="trakview: why does a CLIP model match this image and caption? Answered with TRAK.",
)
for command in (
    pipeline.demo,
    pipeline.train,
    pipeline.build,
    explore.serve,
    explore.query,
    explore.export,
    explore.info,
    explain_cmds.explain,
    compare_cmds.compare,
):
    app.command()(command)
app.add_typer(eval_cmds.eval_app, name="eval")
app.add_typer(basket_cmds.basket_app, name="basket")  # basket_group adds `basket grow` to it


def main() -> None:
    """Console entry point: one-line errors for bad input."""
    from engine.errors import TrakviewError

    try:
        app()
    except TrakviewError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
