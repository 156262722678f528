"""The evaluations' result files, read without loading anything heavy (the dashboard reads them
on every page run)."""

from __future__ import annotations

import os
from typing import Any

from engine import files
from engine.run.layout import RunLayout


def _read(path: os.PathLike) -> dict[str, Any] | None:
    return files.read_json(path) if os.path.isfile(path) else None


def read_lds(run: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``eval/lds.json``, or None before ``trakview eval lds``."""
    return _read(RunLayout(run).lds_result)


def read_removal(run: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``eval/remove.json``, or None before ``trakview eval remove``."""
    return _read(RunLayout(run).removal_result)
