"""``--config run.toml``: every flag of a command in one file, and the file a run writes back.

A config file holds a command's flags by name (``train-data`` or ``train_data``), for example::

    train-data = "data/train.csv"
    val-fraction = 0.1
    checkpoints-dir = "logs/"
    epochs = "8,16,32"
    proj-dim = 512

Flags given on the command line win over the file. Relative paths in the file are relative to
the file's folder. ``trakview build`` writes the settings it ran with to ``RUN/run.toml`` (paths
relative to the run), so ``trakview build --config RUN/run.toml`` repeats the run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import typer

from engine import store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Flags that are about this invocation, not the run: never read from or written to a file.
NOT_SETTINGS = ("config", "overwrite", "verbose", "help")
ALIASES = {"format": "data_format", "csv-img-key": "img_key", "csv-caption-key": "caption_key"}
PATH_SETTINGS = ("train_data", "val_data", "checkpoint", "checkpoints_dir", "out", "pretrained")


def load_into_context(ctx: typer.Context, _param: Any, value: Path | None) -> None:
    """Eager callback of ``--config``: the file's settings become the command's defaults."""
    if value is None:
        return
    path = Path(value)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise typer.BadParameter(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise typer.BadParameter(f"{path} is not valid TOML: {err}") from None
    params = {p.name: p for p in ctx.command.params if p.name not in NOT_SETTINGS}
    settings, unknown = {}, []
    for key, val in raw.items():
        name = ALIASES.get(key, key.replace("-", "_"))
        if name not in params:
            unknown.append(key)
            continue
        settings[name] = _resolve_paths(params[name], val, path.parent)
    if unknown:
        known = ", ".join(sorted(n.replace("_", "-") for n in params))
        raise typer.BadParameter(
            f"{path} sets {', '.join(unknown)}, which `{ctx.info_name}` does not take "
            f"(its settings: {known})"
        )
    ctx.default_map = {**(ctx.default_map or {}), **settings}


def _resolve_paths(param: Any, value: Any, base: Path) -> Any:
    if param.name not in PATH_SETTINGS:
        return value
    if isinstance(value, list):
        return [_resolve_paths(param, v, base) for v in value]
    if not isinstance(value, str) or os.path.isabs(value):
        return value
    if param.name == "pretrained" and not (base / value).exists():
        return value  # a pretrained tag, not a path
    return str(base / value)  # also a shard spec: "shards/{000..009}.tar"


def settings_of(ctx: typer.Context) -> dict[str, Any]:
    """The command's settings as run (every flag except NOT_SETTINGS), JSON-ready."""
    out = {}
    for name, value in ctx.params.items():
        if name in NOT_SETTINGS or value is None:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[name] = value
    return out


def write_toml(path: Path, settings: dict[str, Any], relative_to: Path, header: str) -> None:
    """Writes ``settings`` as a config file; paths relative to ``relative_to``."""
    lines = [f"# {line}" for line in header.splitlines()]
    for name, value in settings.items():
        value = _relative(value, name, relative_to)
        text = _toml_value(value)
        if text is not None:
            lines.append(f"{name.replace('_', '-')} = {text}")
    with store.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _relative(value: Any, name: str, base: Path) -> Any:
    if name not in PATH_SETTINGS:
        return value
    if isinstance(value, list):
        return [_relative(v, name, base) for v in value]
    if not isinstance(value, str) or (name == "pretrained" and not Path(value).exists()):
        return value
    if "{" in value:  # a shard spec: keep its braces, make its folder relative
        folder, _, rest = value.rpartition("/")
        return f"{os.path.relpath(Path(folder).resolve(), base.resolve())}/{rest}"
    return Path(os.path.relpath(Path(value).resolve(), base.resolve())).as_posix()


def _toml_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        items = [_toml_value(v) for v in value]
        return "[" + ", ".join(i for i in items if i is not None) + "]"
    return None
