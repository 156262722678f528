"""The Group page's pieces: choosing a group of validation pairs (every rule of
``engine.explain.rules``), drawing what the group shares and how concentrated its effect is, and
the forms that turn a group's causes into a basket."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from dashboard import basket_ui, state
from engine.curate import baskets
from engine.curate.causes import causes_pick
from engine.data.fields import extra_fields, field_text
from engine.errors import TrakviewError
from engine.explain.describe import Feature
from engine.explain.rules import DEFAULT_CLIP_N, RULES, GroupSpec
from engine.explore.view import RunView

GROUP_PARAM = "group"  # ?group=RULE:VALUE
LABELS = {
    "failing": "Failing: the worst-matched pairs",
    "search": "Caption contains",
    "clip": "Best CLIP matches of a text",
    "column": "Column value",
    "ids": "Ids",
    "region": "Region of the map",
}


def group_picker(run: RunView, current: GroupSpec | None) -> GroupSpec | None:
    """A form choosing a group by any rule; returns the spec submitted (else None)."""
    rules = list(LABELS)
    rule = st.selectbox(
        "Pick validation pairs by",
        rules,
        index=rules.index(current.rule) if current else 0,
        format_func=LABELS.get,
        key="group-rule",
        help="; ".join(f"{k}: {v}" for k, v in RULES.items()),
    )
    value = current.value if current and current.rule == rule else ""
    with st.form("group-form", border=False):
        if rule == "failing":
            head, _, by = value.partition("/")
            n = st.number_input("How many", 1, len(run.val), int(head) if head.isdigit() else 40)
            order = st.radio(
                "Worst by", ["rank", "margin"], index=1 if by == "margin" else 0, horizontal=True
            )
            text = f"{n}/{order}" if order == "margin" else str(n)
        elif rule == "clip":
            head, slash, tail = value.partition("/")
            n = int(head) if slash and head.isdigit() else DEFAULT_CLIP_N
            query = st.text_input("Text", tail if slash else value)
            count = st.number_input("How many", 1, len(run.val), min(n, len(run.val)))
            text = f"{count}/{query.strip()}" if query.strip() else ""
        elif rule == "column":
            fields = extra_fields(run.val)
            key, _, val = value.partition("=")
            field = st.selectbox("Column", fields, index=fields.index(key) if key in fields else 0)
            choices = sorted({field_text(r.get(field)) for r in run.val}) if fields else []
            picked = st.selectbox(
                "Value", choices, index=choices.index(val) if val in choices else 0
            )
            text = f"{field}={picked}" if fields else ""
        elif rule == "ids":
            text = ",".join(
                t.strip()
                for t in st.text_area("Validation ids (comma or one per line)", value)
                .replace("\n", ",")
                .split(",")
                if t.strip()
            )
        elif rule == "region":
            text = st.text_input(
                "x0,x1,y0,y1 (or draw a box on the map below)", value, key="group-box"
            )
        else:
            text = st.text_input("Words in the caption or id", value)
        submitted = st.form_submit_button("Explain this group", icon=":material/troubleshoot:")
    if not submitted or not text:
        return None
    return GroupSpec(rule, text)


def region_map(run: RunView, rows: np.ndarray | None) -> str | None:
    """The validation pairs on the map, the group highlighted; a box drawn on it returns a
    ``region:`` value."""
    coords = run.val_map()
    member = np.zeros(len(coords), bool)
    if rows is not None:
        member[rows] = True
    fig = go.Figure()
    for inside, colour, name in ((False, "#bbbbbb", "other pairs"), (True, "#d73027", "group")):
        sel = member == inside
        fig.add_trace(
            go.Scattergl(
                x=coords[sel, 0],
                y=coords[sel, 1],
                mode="markers",
                name=name,
                marker={"color": colour, "size": 6},
                text=[run.val[int(j)]["caption"] for j in np.flatnonzero(sel)],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        height=320,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        dragmode="select",
        title="Validation images on the map (draw a box to pick a region)",
    )
    event = st.plotly_chart(fig, key="group-map", on_select="rerun", selection_mode="box")
    boxes = (event or {}).get("selection", {}).get("box", []) if event else []
    if not boxes:
        return None
    box = boxes[-1]
    (x0, x1), (y0, y1) = box["x"], box["y"]
    return f"{x0:.4g},{x1:.4g},{y0:.4g},{y1:.4g}"


def shared_table(features: list[Feature], key: str) -> None:
    """What some training pairs share, as a table (share among them against the whole set)."""
    if not features:
        st.caption("Nothing is shared clearly more often than in the whole training set.")
        return
    st.dataframe(
        {
            "shared": [f.label() for f in features],
            "among them": [f"{f.count}/{f.picked} ({f.share:.0%})" for f in features],
            "whole training set": [f"{f.overall} ({f.base_share:.1%})" for f in features],
            "lift": [round(f.lift, 1) for f in features],
            "grow a basket by": [f.rule() for f in features],
        },
        hide_index=True,
        key=key,
    )


def concentration_figure(values: np.ndarray) -> go.Figure:
    """Cumulative share of the helpful and harmful parts of an effect against the number of
    training pairs that carry it, strongest first."""
    fig = go.Figure()
    for sign, colour, v in (("helps", basket_ui.GREEN, values), ("hurts", basket_ui.RED, -values)):
        pos = np.sort(v[v > 0])[::-1]
        if not pos.size:
            continue
        cum = np.cumsum(pos) / pos.sum()
        x = np.arange(1, len(pos) + 1)
        fig.add_trace(go.Scatter(x=x, y=cum, mode="lines", name=sign, line={"color": colour}))
    fig.update_layout(
        height=260,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        title="How few training pairs carry the group's effect",
        xaxis={"title": "training pairs (strongest first)", "type": "log"},
        yaxis={"title": "share of the total", "range": [0, 1.02]},
    )
    return fig


def causes_form(run: RunView, spec: GroupSpec, how: str) -> None:
    """Adds the group's top causes, ranked on half a of the group, to a basket (the other half
    held out for ``trakview eval clean``)."""
    with st.form("group-causes", border=False):
        cols = st.columns([1, 2, 2, 2], gap="small")
        n = cols[0].number_input("How many", 1, len(run.train), min(100, len(run.train)))
        name = cols[1].text_input("Basket", basket_ui.current_name(run))
        typed = cols[2].text_input("Why", placeholder=f"causes of {spec.param}")
        cols[3].markdown("<div style='height:1.75rem'></div>", unsafe_allow_html=True)
        submitted = cols[3].form_submit_button(
            "Add the top causes", icon=":material/add_shopping_cart:"
        )
    if not submitted:
        return
    try:
        with st.spinner("Ranking the causes on half of the group…"):
            rows, _, why, val_ids, record = causes_pick(run, int(n), spec.param, "a", 0, how, 3)
        name = baskets.check_name(name.strip())
        if baskets.find_basket(run.layout, name) is not None:
            baskets.set_group(run.layout, name, record)
        basket, added = baskets.add_rows(
            run.layout,
            name,
            run.train,
            rows,
            typed.strip() or why,
            "causes",
            st.session_state.get(basket_ui.WHO),
            val_ids,
        )
        baskets.set_group(run.layout, name, record)
    except TrakviewError as err:
        st.error(html.escape(str(err)))
        return
    st.session_state[basket_ui.CURRENT] = basket.name
    st.success(
        f"{added} of {len(rows)} causes added to basket `{basket.name}`, chosen on half of the "
        f"group ({len(record['held_out'])} pairs held out). Grow it below, or see the Basket page.",
        icon=":material/shopping_basket:",
    )


def grow_buttons(run: RunView, features: list[Feature], key: str) -> None:
    """One button per shared feature: add every training pair that carries it to the basket."""
    name = basket_ui.current_name(run)
    cols = st.columns(min(4, max(1, len(features))))
    for i, f in enumerate(features[:8]):
        rows = state.training_features(run).rows_with(f)
        if cols[i % len(cols)].button(
            f"Grow `{name}` by {f.label()} (+{len(rows)})", key=f"{key}-{i}", type="secondary"
        ):
            try:
                basket, added = baskets.add_rows(
                    run.layout,
                    name,
                    run.train,
                    rows,
                    f"carries {f.label()}",
                    "grow",
                    st.session_state.get(basket_ui.WHO),
                )
            except TrakviewError as err:
                st.error(html.escape(str(err)))
                return
            st.success(f"{added} pairs added to `{basket.name}` ({len(basket.entries)} in it).")


def stats_row(stats: dict[str, Any], rest: dict[str, Any]) -> None:
    cols = st.columns(4)
    cols[0].metric("Pairs", stats["pairs"])
    for col, (label, key, fmt) in zip(
        cols[1:],
        (
            ("Median caption rank", "median_caption_rank", "{:g}"),
            ("R@5", "r5", "{:.2f}"),
            ("Mean margin", "mean_margin", "{:.3f}"),
        ),
        strict=True,
    ):
        col.metric(
            label, fmt.format(stats[key]), help=f"other validation pairs: {fmt.format(rest[key])}"
        )
    st.caption(
        f"The other {rest['pairs']} validation pairs: median caption rank "
        f"{rest['median_caption_rank']:g}, R@5 {rest['r5']:.2f}, "
        f"mean margin {rest['mean_margin']:.3f}."
    )


def member_strip(run: RunView, rows: np.ndarray, limit: int = 12) -> None:
    """The group's first pairs as small cards (caption rank under each)."""
    shown = rows[:limit]
    cols = st.columns(max(1, min(limit, len(shown))))
    for col, j in zip(cols, shown, strict=False):
        rec = run.val[int(j)]
        col.markdown(
            f"{run.thumbnail(rec['image'])}<div class='tv-cap'>{html.escape(rec['caption'])}</div>"
            f"<small>rank {int(run.val_caption_rank[int(j)])}</small>",
            unsafe_allow_html=True,
        )
    if len(rows) > limit:
        st.caption(f"… and {len(rows) - limit} more.")
