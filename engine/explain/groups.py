"""Groups of validation pairs: the pairs a user brings when "the model gets these wrong".

A group is a rule and its value, written ``RULE:VALUE`` (what ``trakview explain --group`` and the
dashboard's ``?group=`` link take):

=========  ====================================================================================
rule       the validation pairs
=========  ====================================================================================
ids        with these ids: ``ids:v0001,v0002``
search     whose caption or id contains a text (case-insensitive): ``search:golden``
clip       the N best matches of a text by CLIP (caption and image): ``clip:a red star`` (N 40) or
           ``clip:40/a red star``
column     whose field K equals V (as ``basket add --column`` compares): ``column:source=web``
failing    the N whose own caption ranks worst (ties: lowest margin): ``failing:40``; by margin
           alone: ``failing:40/margin``
region     inside a rectangle of the map (the training map's PCA axes): ``region:x0,x1,y0,y1``
=========  ====================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.data.fields import matching_rows, parse_key_value
from engine.errors import InputError
from engine.explain.rules import DEFAULT_CLIP_N, RULES, GroupSpec

__all__ = ["DEFAULT_CLIP_N", "RULES", "GroupSource", "GroupSpec", "select_group"]


def _count(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise InputError(f"{what} must be a whole number of pairs, got {text!r}") from None
    if n < 1:
        raise InputError(f"{what} must be at least 1, got {n}")
    return n


def failing_rows(
    caption_rank: np.ndarray, margin: np.ndarray, n: int, by: str = "rank"
) -> np.ndarray:
    """The n validation rows that match their own caption worst: highest caption rank first
    (ties by lowest margin), or lowest margin first (``by="margin"``)."""
    if by == "margin":
        order = np.lexsort((np.arange(len(margin)), margin))
    else:
        order = np.lexsort((np.arange(len(margin)), margin, -np.asarray(caption_rank)))
    return order[:n]


def in_region(coords: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Rows whose (x, y) map coordinates lie in [x0, x1] x [y0, y1]."""
    x0, x1, y0, y1 = box
    x, y = coords[:, 0], coords[:, 1]
    return np.flatnonzero(
        (x >= min(x0, x1)) & (x <= max(x0, x1)) & (y >= min(y0, y1)) & (y <= max(y0, y1))
    )


def parse_box(value: str) -> tuple[float, float, float, float]:
    parts = [p.strip() for p in value.split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise InputError(f"a region is x0,x1,y0,y1 (four numbers of the map), got {value!r}")
    return box  # type: ignore[return-value]


@dataclass
class GroupSource:
    """What selecting a group needs of a run (``RunView`` provides it all)."""

    val: list[dict]
    caption_rank: np.ndarray  # (n_val,)
    margin: np.ndarray  # (n_val,)
    search: Callable[[str, str], list[int]]  # (text, "words" | "meaning") -> rows, best first
    val_map: Callable[[], np.ndarray]  # () -> (n_val, 2) map coordinates


def select_group(source: GroupSource, spec: GroupSpec) -> np.ndarray:
    """The validation rows of a group, in the rule's order (the failing: worst first; a CLIP
    search: best first; the others: file order).

    Raises:
        InputError: an unknown id or field, a bad number or box, or a group with no pair.
    """
    rule, value = spec.rule, spec.value
    if rule == "ids":
        index = {str(r["id"]): j for j, r in enumerate(source.val)}
        ids = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in ids if v not in index]
        if unknown:
            examples = ", ".join(list(index)[:3])
            raise InputError(f"unknown validation id(s) {unknown[:5]}; ids look like {examples}")
        rows = np.array(list(dict.fromkeys(index[v] for v in ids)), np.int64)
    elif rule == "search":
        rows = np.array(source.search(value, "words"), np.int64)
    elif rule == "clip":
        n, text = DEFAULT_CLIP_N, value
        head, slash, tail = value.partition("/")
        if slash and head.strip().isdigit():
            n, text = _count(head, "the number of CLIP matches"), tail.strip()
        rows = np.array(source.search(text, "meaning")[:n], np.int64)
    elif rule == "column":
        key, wanted = parse_key_value(value)
        rows = matching_rows(source.val, key, wanted)
    elif rule == "failing":
        head, _, by = value.partition("/")
        by = by.strip().lower() or "rank"
        if by not in ("rank", "margin"):
            raise InputError(f"failing:N/BY ranks by 'rank' or 'margin', got {by!r}")
        n = _count(head.strip(), "the number of failing pairs")
        rows = failing_rows(source.caption_rank, source.margin, n, by)
    else:
        rows = in_region(source.val_map(), parse_box(value))
    if rows.size == 0:
        raise InputError(f"group {spec.param!r} holds no validation pair; widen it")
    return rows
