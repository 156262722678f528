"""The extra fields of pair records (a source's columns besides id, caption and image), and
matching a field against a value typed by a user (a command-line flag, a link, a form)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import InputError

FIXED_FIELDS = ("id", "caption", "image")


def extra_fields(records: Sequence[dict[str, Any]]) -> list[str]:
    """The fields of the records besides id, caption and image, as the first record has them."""
    if not len(records):
        return []
    return [k for k in records[0] if k not in FIXED_FIELDS]


def field_text(value: Any) -> str:
    """A field's value as text, as a user types it: ``true`` / ``false`` for booleans, ``null``
    for a missing value, numbers as JSON writes them, strings as they are."""
    if isinstance(value, (bool, type(None))) or not isinstance(value, str):
        return json.dumps(value)
    return value


def matching_rows(records: Sequence[dict[str, Any]], key: str, value: str) -> np.ndarray:
    """Rows whose field ``key`` equals ``value`` as text (``field_text``), in file order.

    Raises:
        InputError: the records have no such field (the message lists theirs).
    """
    fields = extra_fields(records)
    if key not in fields:
        raise InputError(
            f"the pairs have no field {key!r}; their fields: {', '.join(fields) or 'none'}"
        )
    wanted = value.strip()
    return np.array(
        [i for i, rec in enumerate(records) if field_text(rec.get(key)) == wanted], np.int64
    )


def parse_key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (key, value), with a clear error without an ``=``."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise InputError(
            f"expected KEY=VALUE (a field and its value, e.g. source=web), got {text!r}"
        )
    return key.strip(), value.strip()
