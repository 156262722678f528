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

from engine import files
from engine.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Flags that are about this invocation, not the run: never read from or written to a file.
NOT_SETTINGS = ("config", "overwrite", "verbose", "help")
ALIASES = {"format": "data_format", "csv-img-key": "img_key", "csv-caption-key": "caption_key"}
PATH_SETTINGS = (
    "train_data",
    "val_data",
    "checkpoint",
    "checkpoints_dir",
    "out",
    "pretrained",
    "image_root",
)


def read_settings(path: Path, names: set[str], command: str) -> dict[str, Any]:
    """The settings of a config file, by flag name (``train_data``), relative paths resolved
    against the file's folder.

    Args:
        path: the TOML file.
        names: the settings the command takes.
        command: the command's name, for the error message.

    Raises:
        ConfigError: a missing or invalid file, or a setting the command does not take.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    settings, unknown = {}, []
    for key, val in raw.items():
        name = ALIASES.get(key, key.replace("-", "_"))
        if name not in names or name in NOT_SETTINGS:
            unknown.append(key)
            continue
        settings[name] = _resolve_paths(name, val, path.parent)
    if unknown:
        known = ", ".join(sorted(n.replace("_", "-") for n in names if n not in NOT_SETTINGS))
        raise ConfigError(
            f"{path} sets {', '.join(unknown)}, which `{command}` does not take "
            f"(its settings: {known})"
        )
    return settings


def _resolve_paths(name: str, value: Any, base: Path) -> Any:
    if name not in PATH_SETTINGS:
        return value
    if isinstance(value, list):
        return [_resolve_paths(name, v, base) for v in value]
    if not isinstance(value, str) or os.path.isabs(value):
        return value
    if name == "pretrained" and not (base / value).exists():
        return value  # a pretrained tag, not a path
    return str(base / value)  # also a shard spec: "shards/{000..009}.tar"


def settings_of(params: dict[str, Any]) -> dict[str, Any]:
    """A command's settings as run (every flag except NOT_SETTINGS), JSON-ready."""
    out = {}
    for name, value in params.items():
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
    files.write_text(path, "\n".join(lines) + "\n")


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
