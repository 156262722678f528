"""Stage 9, the command line (``trakview``): turns flags into the engine's config dataclasses.

Owns: the commands (``pipeline``: demo, train, build; ``explore``: serve, query, export, info;
``eval_cmds``: eval lds, eval remove), their shared options (``options``) and the entry point
(``app.main``). May import any engine package, always inside a command's body.
"""

from engine.cli.app import app, main

__all__ = ["app", "main"]
