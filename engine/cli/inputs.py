"""What the pipeline's commands read from their flags: sources, checkpoints, epochs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger("engine")


def read_sources(
    train_data: str,
    val_data: str | None,
    val_fraction: float,
    split_seed: int,
    options: Any,
) -> tuple[Any, Any]:
    from engine.data.sources import read_source, split_val
    from engine.errors import ConfigError

    train_pairs = read_source(train_data, options)
    if val_data is not None:
        if val_fraction:
            raise ConfigError("give either --val-data or --val-fraction, not both")
        return train_pairs, read_source(val_data, options)
    if not val_fraction:
        return train_pairs, None
    return split_val(train_pairs, val_fraction, split_seed)


def checkpoints(
    model: str,
    checkpoint: list[Path] | None,
    checkpoints_dir: Path | None,
    epochs: str | None,
    pretrained: str | None,
) -> list[str]:
    from engine.errors import ConfigError
    from engine.models.checkpoints import find_checkpoints
    from engine.models.factory import resolve_pretrained

    given = [
        f
        for f, v in (
            ("--checkpoint", checkpoint),
            ("--checkpoints-dir", checkpoints_dir),
            ("--pretrained", pretrained),
        )
        if v
    ]
    if len(given) != 1:
        raise ConfigError(
            "give the checkpoints one way: --checkpoint PATH (repeatable), --checkpoints-dir DIR "
            f"(open_clip_train's logs), or --pretrained TAG_OR_FILE; got "
            f"{' and '.join(given) or 'none'}"
        )
    if epochs and not checkpoints_dir:
        raise ConfigError("--epochs picks epochs from --checkpoints-dir; give that too")
    if checkpoint:
        return [str(p) for p in checkpoint]
    if checkpoints_dir:
        found = find_checkpoints(checkpoints_dir, epochs)
        log.info(
            "%d checkpoints from %s: %s",
            len(found),
            checkpoints_dir,
            ", ".join(str(p.relative_to(checkpoints_dir)) for p in found),
        )
        return [str(p) for p in found]
    return [str(resolve_pretrained(model, pretrained))]


def epoch_list(text: str, epochs: int) -> list[int]:
    try:
        values = sorted({int(v) for v in text.replace(" ", "").split(",") if v})
    except ValueError as err:
        raise typer.BadParameter(
            f"expected epochs like 5,10: {err}", param_hint="--save-epochs"
        ) from err
    from engine.errors import ConfigError
    from engine.models import train as train_mod

    try:  # the trainer's own rule, checked before any data is read
        train_mod.check_save_epochs(train_mod.TrainConfig(epochs=epochs, save_epochs=values))
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--save-epochs") from err
    return values
