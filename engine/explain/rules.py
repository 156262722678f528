"""The rules that choose a group of validation pairs, and a group's spec (``RULE:VALUE``).

Plain Python (no numpy): the command line lists ``RULES`` in its ``--help`` at once. The
selection itself is ``engine.explain.groups.select_group``.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InputError

RULES = {
    "ids": "the validation pairs with these ids, comma-separated",
    "search": "the pairs whose caption or id contains a text (case-insensitive)",
    "clip": "the N pairs whose caption and image best match a text by CLIP (clip:N/TEXT, N 40)",
    "column": "the pairs whose field K equals V (column:K=V)",
    "failing": "the N pairs whose own caption ranks worst (failing:N, or failing:N/margin)",
    "region": "the pairs inside a rectangle of the map (region:x0,x1,y0,y1)",
}
DEFAULT_CLIP_N = 40


@dataclass(frozen=True)
class GroupSpec:
    """A rule and its value (``RULES``)."""

    rule: str
    value: str

    @classmethod
    def parse(cls, text: str) -> GroupSpec:
        """``RULE:VALUE`` -> a spec (checked: a known rule and a value)."""
        rule, sep, value = str(text).partition(":")
        rule, value = rule.strip().lower(), value.strip()
        if not sep or rule not in RULES:
            raise InputError(
                f"a group is RULE:VALUE with RULE one of {', '.join(RULES)} (e.g. failing:40, "
                f"column:source=web); got {text!r}"
            )
        if not value:
            raise InputError(f"group rule {rule!r} needs a value: {RULES[rule]}")
        return cls(rule, value)

    @property
    def param(self) -> str:
        """The spec as ``RULE:VALUE`` (a deep link's ``?group=``)."""
        return f"{self.rule}:{self.value}"

    def label(self) -> str:
        """A short description for a title."""
        names = {
            "ids": "ids",
            "search": "captions containing",
            "clip": "best CLIP matches of",
            "column": "column",
            "failing": "worst-matched",
            "region": "map region",
        }
        return f"{names[self.rule]} {self.value}"
