"""Named baskets of training pairs, kept in the run directory (``RunLayout.basket(name)``).

A basket is one small JSON file: per pair its id, its row in ``train.jsonl``, its caption, who
added it, when and why (and how: from a card, the suspects, a filter, a file, ...), plus the
validation pairs whose scores chose some of its pairs (``chosen_with_val``; an evaluation then
measures on the others) and the last verification by retraining (``trakview eval clean``).

Every change is a read-modify-write under an exclusive ``flock`` of the baskets folder, written
atomically: two sessions adding pairs at the same moment both keep their pairs, and a reader
never sees half a file. The folder is created by the first save only: opening a basket that
does not exist writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

from engine import files
from engine.errors import CurateError
from engine.run.layout import RunLayout

FORMAT = 1  # version of a basket file
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# How a pair came into a basket (shown on the basket page and in the removed pairs' list).
HOWS = (
    "card",
    "suspects",
    "harmful",
    "threshold",
    "search",
    "column",
    "import",
    "cli",
    "causes",
    "grow",
)
T = TypeVar("T")


@dataclass
class Entry:
    """One training pair in a basket."""

    id: str
    row: int  # row in train.jsonl when it was added (checked against the id when read)
    caption: str
    who: str
    when: str  # ISO 8601, local time with offset
    why: str
    how: str  # one of HOWS


@dataclass
class Basket:
    """A named set of training pairs to act on (remove, export, verify)."""

    name: str
    entries: list[Entry] = field(default_factory=list)
    created: str = ""
    updated: str = ""
    chosen_with_val: list[str] = field(default_factory=list)  # validation ids that chose pairs
    chosen_with_every_val: bool = False  # a pair was chosen with the whole validation set
    verification: dict[str, Any] | None = None  # the last `trakview eval clean` of the basket
    # the group of validation pairs the basket's causes were chosen for (``set_group``): its
    # rule, every id, the half that chose and the half held out
    group: dict[str, Any] | None = None

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    @property
    def digest(self) -> str:
        """What the basket holds, as a short hash of its sorted ids (a verification records it)."""
        return ids_digest(self.ids)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Basket:
        return cls(
            name=doc["name"],
            entries=[Entry(**e) for e in doc.get("entries", [])],
            created=doc.get("created", ""),
            updated=doc.get("updated", ""),
            chosen_with_val=list(doc.get("chosen_with_val", [])),
            chosen_with_every_val=bool(doc.get("chosen_with_every_val", False)),
            verification=doc.get("verification"),
            group=doc.get("group"),
        )


def ids_digest(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def default_who() -> str:
    """Who adds pairs when nobody says: the user running the process."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def check_name(name: str) -> str:
    """A basket name is a safe file stem: letters, digits, ``.``, ``_`` and ``-``.

    Raises:
        CurateError: any other name, saying what a name may hold.
    """
    if not NAME.fullmatch(name or ""):
        raise CurateError(
            f"basket name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. mislabeled-1)"
        )
    return name


def basket_names(layout: RunLayout) -> list[str]:
    """The run's baskets, sorted by name (none when the folder does not exist yet)."""
    if not layout.baskets_dir.is_dir():
        return []
    return sorted(
        p.stem for p in layout.baskets_dir.glob("*.json") if NAME.fullmatch(p.stem) is not None
    )


def find_basket(layout: RunLayout, name: str) -> Basket | None:
    """The basket ``name``, or None when it does not exist."""
    path = layout.basket(check_name(name))
    if not path.is_file():
        return None
    try:
        return Basket.from_json(files.read_json(path))
    except (ValueError, KeyError, TypeError) as err:
        raise CurateError(f"{path} is not a trakview basket ({err}); move it away") from err


def read_basket(layout: RunLayout, name: str) -> Basket:
    """The basket ``name``.

    Raises:
        CurateError: no such basket, naming the ones the run has.
    """
    basket = find_basket(layout, name)
    if basket is None:
        have = ", ".join(basket_names(layout)) or "none yet"
        raise CurateError(
            f"run {layout.root} has no basket {name!r} (its baskets: {have}); add pairs with "
            "`trakview basket add` or from the dashboard"
        )
    return basket


@contextlib.contextmanager
def _locked(layout: RunLayout) -> Iterator[None]:
    """Holds an exclusive ``flock`` on the baskets folder (created here) for the block.

    Raises:
        CurateError: the run's folder cannot be written (a read-only mount, another user's run).
    """
    try:
        layout.baskets_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(layout.baskets_dir, os.W_OK):
            raise PermissionError(f"no write permission on {layout.baskets_dir}")
    except OSError as err:
        raise CurateError(
            f"cannot save a basket in {layout.baskets_dir} ({err}): baskets live in the run; "
            "copy the run somewhere you can write, or ask its owner to make baskets/ writable"
        ) from err
    fd = os.open(layout.baskets_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def update_basket(layout: RunLayout, name: str, change: Callable[[Basket], T]) -> tuple[Basket, T]:
    """Applies ``change`` to the basket (a new one when missing) under the lock and saves it.

    Returns:
        The saved basket and what ``change`` returned.
    """
    check_name(name)
    with _locked(layout):
        basket = find_basket(layout, name) or Basket(name=name, created=now())
        value = change(basket)
        basket.updated = now()
        files.write_json(layout.basket(name), basket.to_json())
    return basket, value


def add_rows(
    layout: RunLayout,
    name: str,
    train: Sequence[dict[str, Any]],
    rows: Iterable[int],
    why: str,
    how: str,
    who: str | None = None,
    chosen_with_val: Iterable[str] = (),
    every_val: bool = False,
) -> tuple[Basket, int]:
    """Adds training rows to a basket (created when missing); pairs already in it keep their
    first who/when/why.

    Args:
        train: the run's training records (``RunData.train``).
        chosen_with_val: validation ids whose scores chose these pairs.
        every_val: the pairs were chosen with the whole validation set's scores.

    Returns:
        The saved basket and how many pairs were new.
    """
    if how not in HOWS:
        raise CurateError(f"how must be one of {', '.join(HOWS)}, got {how!r}")
    rows = [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < len(train)]
    if bad:
        raise CurateError(f"training rows {bad[:3]} are outside 0..{len(train) - 1}")
    who = (who or "").strip() or default_who()
    stamp = now()
    new = [(r, train[r]) for r in dict.fromkeys(rows)]
    val_ids = list(dict.fromkeys(str(v) for v in chosen_with_val))

    def change(basket: Basket) -> int:
        have = set(basket.ids)
        added = [
            Entry(str(rec["id"]), r, str(rec["caption"]), who, stamp, why.strip(), how)
            for r, rec in new
            if str(rec["id"]) not in have
        ]
        basket.entries += added
        if added:
            known = set(basket.chosen_with_val)
            basket.chosen_with_val += [v for v in val_ids if v not in known]
            basket.chosen_with_every_val |= every_val
        return len(added)

    return update_basket(layout, name, change)


def set_group(layout: RunLayout, name: str, group: dict[str, Any]) -> Basket:
    """Records the group a basket's causes were chosen for: ``spec`` (RULE:VALUE), ``val_ids``
    (all of it), ``chosen_with`` (the half whose scores chose) and ``held_out`` (the other
    half), ``split_seed``. A basket serves one group: another group is refused."""

    def change(basket: Basket) -> None:
        if basket.group and basket.group.get("spec") != group.get("spec"):
            raise CurateError(
                f"basket {name!r} holds causes of group {basket.group['spec']!r}; put the causes "
                f"of {group.get('spec')!r} in another basket"
            )
        basket.group = group

    return update_basket(layout, name, change)[0]


def remove_ids(layout: RunLayout, name: str, ids: Iterable[str]) -> tuple[Basket, int]:
    """Takes pairs out of an existing basket; returns it and how many were in it."""
    read_basket(layout, name)
    gone = {str(i) for i in ids}

    def change(basket: Basket) -> int:
        before = len(basket.entries)
        basket.entries = [e for e in basket.entries if e.id not in gone]
        return before - len(basket.entries)

    return update_basket(layout, name, change)


def set_verification(layout: RunLayout, name: str, result: dict[str, Any]) -> Basket:
    """Records the result of verifying a basket by retraining (``trakview eval clean``)."""
    read_basket(layout, name)

    def change(basket: Basket) -> None:
        basket.verification = result

    return update_basket(layout, name, change)[0]


def rows_of_ids(train: Sequence[dict[str, Any]], ids: Sequence[str]) -> np.ndarray:
    """(len(ids),) training rows of some ids, in their order.

    Raises:
        CurateError: an id that is not a training pair of the run.
    """
    index = {str(rec["id"]): i for i, rec in enumerate(train)}
    missing = [i for i in ids if str(i) not in index]
    if missing:
        examples = ", ".join(str(rec["id"]) for rec in train[:3])
        raise CurateError(
            f"{len(missing)} id(s) are not training pairs of this run, e.g. {missing[:3]}; "
            f"training ids look like {examples} (see train.jsonl)"
        )
    return np.array([index[str(i)] for i in ids], dtype=np.int64)


def basket_rows(basket: Basket, train: Sequence[dict[str, Any]]) -> np.ndarray:
    """(n,) the training rows of a basket's pairs, in basket order: the stored rows when they
    still hold the same ids (one read per pair), else looked up by id."""
    rows = [e.row for e in basket.entries]
    if all(
        0 <= r < len(train) and str(train[r]["id"]) == e.id
        for r, e in zip(rows, basket.entries, strict=True)
    ):
        return np.array(rows, dtype=np.int64)
    return rows_of_ids(train, basket.ids)
