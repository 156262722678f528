"""The source a run was built from, found again: where it is, its format and reading options.

A build records its flags in ``RUN/run.toml`` (paths relative to the run, so a moved run still
finds its data) and in ``manifest.json`` (``invocation``, paths as given). ``run_source`` reads
them back; a run built through the Python API records neither, and the caller names the source.
The source is read with trakview's own reader (``engine.data.sources.read_source``), which gives
each pair the id the run gave it: that is how a run's pairs map back to the source's rows.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data.pairs import PairSet
from engine.data.sources import SourceOptions, detect_format, expand_braces, read_source
from engine.errors import ConfigError, CurateError
from engine.run.invocation import ALIASES, read_settings
from engine.run.layout import RunLayout
from engine.run.manifest import Manifest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class RunSource:
    """Where a run's training pairs came from and how they were read."""

    train: str  # a file, a folder (image folder) or a WebDataset shard spec
    options: SourceOptions
    found_in: str  # what said so: run.toml, the manifest's invocation, or the caller
    val_fraction: float = 0.0  # > 0: the run's validation pairs were split from this source

    @property
    def format(self) -> str:
        return self.options.format or detect_format(self.train)

    def paths(self) -> list[Path]:
        """The files (or folder) of the source, resolved: what an export must never overwrite."""
        if self.format == "wds":
            return [Path(s).resolve() for s in expand_braces(self.train)]
        return [Path(self.train).resolve()]

    def read(self) -> PairSet:
        """The source's pairs in its own order, with the ids the run gave them."""
        return read_source(self.train, self.options)


def options_from(settings: dict[str, Any]) -> SourceOptions:
    """``SourceOptions`` from a build's settings (flag names, as in run.toml)."""
    return SourceOptions(
        format=settings.get("data_format"),
        img_key=settings.get("img_key"),
        caption_key=settings.get("caption_key"),
        id_key=settings.get("id_key") or "id",
        csv_separator=settings.get("csv_separator"),
        coco_captions=settings.get("coco_captions") or "first",
        image_root=settings.get("image_root"),
    )


def _run_toml(layout: RunLayout) -> dict[str, Any] | None:
    path = layout.run_toml
    if not path.is_file():
        return None
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        names = {ALIASES.get(k, k.replace("-", "_")) for k in raw}
        return read_settings(path, names, "build")  # relative paths resolved against the run
    except (tomllib.TOMLDecodeError, ConfigError) as err:
        raise CurateError(f"{path} cannot be read: {err}") from err


def run_source(layout: RunLayout, manifest: Manifest) -> RunSource:
    """The training source recorded by the run's build.

    Raises:
        CurateError: the run records no source (built through the Python API), or the recorded
            one is gone; the message says to name it (``--train-data``).
    """
    settings = _run_toml(layout)
    found_in = str(layout.run_toml)
    if not settings:
        settings, found_in = dict(manifest.invocation), f"{layout.manifest} (invocation)"
    spec = settings.get("train_data")
    spec = os.path.normpath(spec) if isinstance(spec, str) and spec else spec
    if not spec:
        raise CurateError(
            f"run {layout.root} does not record the source it was built from (no run.toml; "
            "built through the Python API?): name it with --train-data and its format options"
        )
    source = RunSource(str(spec), options_from(settings), found_in, settings.get("val_fraction", 0))
    missing = [p for p in source.paths() if not p.exists()]
    if missing:
        raise CurateError(
            f"the run's training source {missing[0]} (recorded in {found_in}) does not exist "
            "any more: name where it is now with --train-data"
        )
    return source


def given_source(spec: str | os.PathLike, options: SourceOptions) -> RunSource:
    """A source named by the caller (a run that records none, or data that moved)."""
    return RunSource(str(spec), options, "given")
