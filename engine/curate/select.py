"""Selections of training pairs to put in a basket: arrays (or records) in, training rows out.

=============  ===================================================================================
selection      training rows
=============  ===================================================================================
suspects       the n highest of the suspected-mislabeled ranking (``suspect_mislabeled.npy``)
harmful        the n lowest score totals over some validation pairs (all of them: "most harmful
               overall"; a half: chosen on one half, measured on the other); only negative totals
threshold      the pairs whose score for one validation pair is at or below a threshold
search         the pairs whose caption contains a text (case-insensitive)
column         the pairs whose field ``key`` (an extra column of the source) equals a value
=============  ===================================================================================

Removing rows R changes validation pair j's margin by about -sum_{i in R} score_ij (TRAK's linear
datamodel, TRAK paper Section 2), so the total over a set V of validation pairs,
sum_{j in V} score_ij, is pair i's predicted harm to V when negative.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.attribution.summaries import top_rows
from engine.data import fields
from engine.errors import CurateError, InputError
from engine.explore.scores import StoredScores

SPLIT_STREAM = 17  # the halves' generator: default_rng([split_seed, SPLIT_STREAM])


def top_suspects(suspect: np.ndarray, n: int) -> np.ndarray:
    """The n most suspect training rows, most suspect first."""
    return top_rows(np.asarray(suspect), max(0, n))


def most_harmful(totals: np.ndarray, n: int) -> np.ndarray:
    """At most n rows of the lowest (negative) totals, most harmful first.

    Args:
        totals: (n_train,) each training pair's scores summed over some validation pairs.
    """
    order = top_rows(-np.asarray(totals, dtype=np.float64), max(0, n))
    return order[np.asarray(totals)[order] < 0]


def column_sum(scores: StoredScores, val_rows: Sequence[int]) -> np.ndarray:
    """(n_train,) float64 each training pair's scores summed over validation rows
    ``val_rows`` (``StoredScores.column_sum``)."""
    return scores.column_sum(val_rows)


def at_or_below(column: np.ndarray, threshold: float) -> np.ndarray:
    """Rows whose value is at or below ``threshold``, lowest first (ties by row)."""
    column = np.asarray(column, dtype=np.float64)
    rows = np.flatnonzero(column <= threshold)
    return rows[np.argsort(column[rows], kind="stable")]


def caption_matches(train: Sequence[dict[str, Any]], text: str) -> np.ndarray:
    """Rows whose caption contains ``text`` (case-insensitive), in file order."""
    needle = text.strip().lower()
    if not needle:
        raise CurateError("the search text is empty: type words the captions should contain")
    return np.array(
        [i for i, rec in enumerate(train) if needle in str(rec["caption"]).lower()], np.int64
    )


def extra_fields(train: Sequence[dict[str, Any]]) -> list[str]:
    """The training records' fields besides id, caption and image (``engine.data.fields``)."""
    return fields.extra_fields(train)


def column_matches(train: Sequence[dict[str, Any]], key: str, value: str) -> np.ndarray:
    """Rows whose field ``key`` equals ``value`` as text (``true`` / ``false`` for booleans,
    ``null`` for a missing value), in file order."""
    try:
        return fields.matching_rows(train, key, value)
    except InputError as err:
        raise CurateError(str(err).replace("the pairs have", "the training pairs have")) from err


field_text = fields.field_text


def val_halves(n_val: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the validation rows (``a``: floor(n/2) rows, ``b``: the rest),
    sorted, drawn with ``split_seed``: choose a basket on one, measure it on the other."""
    order = np.random.default_rng([split_seed, SPLIT_STREAM]).permutation(n_val)
    half = n_val // 2
    return np.sort(order[:half]), np.sort(order[half:])


def group_halves(rows: Sequence[int], split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of a group's validation rows (``a``: floor(n/2) rows, ``b``: the
    rest), sorted, drawn with ``split_seed``: choose causes on one, measure on the other."""
    rows = np.asarray(sorted({int(r) for r in rows}), np.int64)
    order = rows[np.random.default_rng([split_seed, SPLIT_STREAM, 1]).permutation(len(rows))]
    half = len(rows) // 2
    return np.sort(order[:half]), np.sort(order[half:])


def top_causes(ranking: np.ndarray, n: int) -> np.ndarray:
    """At most n training rows of the highest (positive) cause scores, highest first."""
    order = top_rows(np.asarray(ranking, dtype=np.float64), max(0, n))
    return order[np.asarray(ranking)[order] > 0]


def parse_ids(text: str, name: str = "") -> list[str]:
    """Training ids listed in a file's text, in order, without repeats.

    ``name`` (the file's name) picks the layout: ``.jsonl`` takes each record's ``id``; ``.csv``
    / ``.tsv`` the ``id`` column; anything else one id per line (blank lines and lines starting
    with ``#`` skipped).

    Raises:
        CurateError: a JSONL record or a CSV without an ``id``.
    """
    suffix = Path(name).suffix.lower()
    if suffix == ".jsonl":
        ids = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise CurateError(f"{name}:{n} is not valid JSON: {err.msg}") from err
            if not isinstance(rec, dict) or "id" not in rec:
                raise CurateError(f"{name}:{n} has no 'id'; each record needs one")
            ids.append(str(rec["id"]))
    elif suffix in (".csv", ".tsv"):
        first = text.splitlines()[0] if text else ""
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if "\t" in first else ",")
        if "id" not in (reader.fieldnames or []):
            raise CurateError(f"{name} has no 'id' column (columns: {reader.fieldnames})")
        ids = [str(row["id"]) for row in reader if row.get("id")]
    else:
        lines = (line.strip() for line in text.splitlines())
        ids = [line for line in lines if line and not line.startswith("#")]
    return list(dict.fromkeys(ids))
