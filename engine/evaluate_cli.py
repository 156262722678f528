"""``trakview eval``: counterfactual checks of a run's attributions (LDS and removal)."""

from __future__ import annotations

import typer

eval_app = typer.Typer(
    no_args_is_help=True,
    help="Check a run's attributions against retrained models: lds | remove.",
)
