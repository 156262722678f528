"""The causes of a group's failure, chosen on one half of the group, and the share of the
failure a basket is predicted to remove (``trakview basket add --causes N --for GROUP``,
``trakview basket effect --for GROUP``, the Group page)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.curate import baskets, select
from engine.curate.choices import CAUSE_RANKINGS
from engine.curate.effect import failure_share, predicted_change, summed_rows
from engine.errors import CurateError
from engine.explain import report
from engine.explain.groups import select_group
from engine.explain.rules import GroupSpec
from engine.explore.view import RunView


def causes_pick(
    view: RunView, n: int, group: str, half: str, split_seed: int, by: str, wrong: int
) -> tuple[Any, str, str, list[str], dict[str, Any]]:
    """The top n causes of a group, ranked on one half of it: (rows, how, why, the chosen
    half's ids, the group record for the basket)."""
    if by not in CAUSE_RANKINGS:
        raise CurateError(f"--by takes {' or '.join(CAUSE_RANKINGS)}, got {by!r}")
    if half not in ("a", "b"):
        raise CurateError(f"--group-half must be a or b, got {half!r}")
    spec = GroupSpec.parse(group)
    rows = select_group(report.group_source(view), spec)
    if len(rows) < 2:
        raise CurateError(f"group {spec.param!r} has {len(rows)} pair: two halves need at least 2")
    a, b = select.group_halves(rows, split_seed)
    chosen, held = (a, b) if half == "a" else (b, a)
    ranking = None
    if by == "confusion":
        found = report.attribute_confusion(view, chosen, wrong)
        if found is not None:
            ranking = found.causes
    if ranking is None:  # harm, or no pair of the half prefers another caption
        ranking = -view.scores.column_sum(chosen)
        by = "harm"
    picked = select.top_causes(ranking, n)
    ids = [str(view.val[int(j)]["id"]) for j in chosen]
    record = {
        "spec": spec.param,
        "val_ids": [str(view.val[int(j)]["id"]) for j in rows],
        "chosen_with": ids,
        "held_out": [str(view.val[int(j)]["id"]) for j in held],
        "split_seed": split_seed,
        "ranking": by,
    }
    why = f"among the {n} top causes of {spec.param} ({by}, half {half} of it)"
    return picked, "causes", why, ids, record


def group_effect_doc(view: RunView, basket: Any, group: str | None) -> dict[str, Any] | None:
    """The share of a group's failure the basket is predicted to remove (its own group unless
    ``group`` names one), for the whole group and the half that did not choose it, beside a
    random basket of the same size."""
    if group is None and not basket.group:
        return None
    spec = GroupSpec.parse(group or basket.group["spec"])
    rows = select_group(report.group_source(view), spec)
    basket_rows = baskets.basket_rows(basket, view.train)
    delta = predicted_change(summed_rows(view.scores, basket_rows))
    n_train = len(view.train)
    everyone = summed_rows(view.scores, np.arange(n_train))
    random_delta = -len(basket_rows) / n_train * everyone  # a random basket, in expectation
    doc = {
        "group": spec.param,
        "whole": failure_share(delta, view.val_margin, rows),
        "random_basket": failure_share(random_delta, view.val_margin, rows),
    }
    if basket.group and basket.group.get("spec") == spec.param:
        held = {str(v) for v in basket.group.get("held_out", [])}
        held_rows = np.array([j for j in rows if str(view.val[int(j)]["id"]) in held], np.int64)
        if held_rows.size:
            doc["held_out"] = failure_share(delta, view.val_margin, held_rows)
    return doc
