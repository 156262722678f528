"""The Compare page's pieces: choosing the second run and the basket, the summaries as tables, the
predicted-against-actual scatter, and a validation pair's influencers in both runs side by side.

Each function draws and returns what the user chose as a plain value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from dashboard import state, ui
from dashboard.plots import BLUE, GREY
from engine.curate import baskets
from engine.evaluate.compare import REMOVED, Comparison
from engine.explore.view import RunView

PAIR_KEY = "cmp-pair"  # session key of the validation pair shown side by side


def pick_other(run: RunView) -> Path | None:
    """Run B: the one ``trakview serve --compare`` named, else one picked from the runs beside
    run A or typed."""
    given = state.compare_dir()
    if given is not None:
        return given
    options = state.sibling_runs(str(run.run))
    left, right = st.columns(2)
    choice = left.selectbox(
        "Run B (after the fix)",
        options,
        index=None,
        placeholder="a run beside this one" if options else "no run beside this one",
        key="cmp-other",
        help="Finished runs in the folders beside this run's. Or start the dashboard with "
        "`trakview serve RUN --compare RUN_B`.",
    )
    typed = right.text_input("…or its folder", key="cmp-other-path", placeholder="path/to/run")
    if typed.strip():
        return Path(typed.strip()).expanduser()
    return Path(choice) if choice else None


def settings(run: RunView) -> tuple[str | None, tuple[str, ...]]:
    """The basket whose removal made B's training set (None: detect the removed pairs) and the
    column groups (``KEY=VALUE``) chosen."""
    left, right = st.columns(2)
    names = baskets.basket_names(run.layout)
    basket = left.selectbox(
        "What was removed",
        [None, *names],
        format_func=lambda n: (
            f"the {REMOVED} (A's training pairs not in B's)" if n is None else f"basket {n}"
        ),
        key="cmp-basket",
        help="TRAK predicts the effect of removing these pairs from run A's training set.",
    )
    column = right.text_input(
        "A group of validation pairs (KEY=VALUE)",
        key="cmp-column",
        placeholder="e.g. planted_failure=true",
        help="Summarise the validation pairs whose field KEY equals VALUE apart.",
    )
    return basket, (column.strip(),) if column.strip() else ()


def overview(doc: dict[str, Any]) -> None:
    """The headline numbers of a comparison."""
    s, val = doc["overall"], doc["val"]
    change, r1 = s["margin_change"], s["retrieval"]["i2t_r1"]
    low, high = change["ci"]
    metrics = {
        "Matched validation pairs": (
            str(val["matched"]),
            f"{val['only_a']} only in A, {val['only_b']} only in B (matched by id).",
        ),
        "Mean margin change": (
            f"{change['mean']:+.4f}",
            f"B minus A, each run's own margins; 95% interval [{low:+.4f}, {high:+.4f}].",
        ),
        "Improved / regressed": (
            f"{s['improved']:.0%} / {s['regressed']:.0%}",
            "Share of validation pairs whose margin rose / fell.",
        ),
        "Image→text R@1": (
            f"{r1['a']:.2f} → {r1['b']:.2f}",
            "Among the matched pairs, each run's ensemble (mean cosine over its checkpoints).",
        ),
    }
    for col, (label, (value, help_)) in zip(st.columns(4), metrics.items(), strict=True):
        col.metric(label, value, help=help_)


def groups_table(doc: dict[str, Any]) -> None:
    """Overall and per group: margins, their change, ranks, R@1 and TRAK's prediction."""
    table: dict[str, list] = {k: [] for k in ("pairs", "n", "margin A", "margin B", "change")}
    for k in ("95% low", "95% high", "improved", "regressed", "rank A", "rank B"):
        table[k] = []
    for k in ("i→t R@1 A", "i→t R@1 B", "predicted"):
        table[k] = []
    for name, s in {"all matched pairs": doc["overall"], **doc["groups"]}.items():
        if not s["n"]:
            continue
        values = [
            name,
            s["n"],
            s["margin_a"],
            s["margin_b"],
            s["margin_change"]["mean"],
            *s["margin_change"]["ci"],
            s["improved"],
            s["regressed"],
            s["caption_rank"]["median_a"],
            s["caption_rank"]["median_b"],
            s["retrieval"]["i2t_r1"]["a"],
            s["retrieval"]["i2t_r1"]["b"],
            s["predicted_change"],
        ]
        for key, value in zip(table, values, strict=True):
            table[key].append(value)
    st.dataframe(table, hide_index=True, key="cmp-groups")


def scatter(c: Comparison, scale: float) -> go.Figure:
    """Predicted (x) against actual (y) margin change per validation pair; y = x dashed, the
    best-scaled prediction solid. A point's ``customdata`` is its position among the matched
    pairs."""
    x, y = c.predicted, c.delta
    ids = c.ids
    lo = float(min(x.min(), y.min(), 0.0))
    hi = float(max(x.max(), y.max(), 0.0))
    fig = go.Figure(
        go.Scatter(
            x=x,
            y=y,
            mode="markers",
            marker=dict(color=BLUE, size=6, opacity=0.6),
            customdata=np.arange(x.size),
            text=ids,
            hovertemplate="%{text}<br>predicted %{x:+.4f}<br>actual %{y:+.4f}<extra></extra>",
            name="validation pairs",
        )
    )
    fig.add_scatter(
        x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color=GREY, dash="dash"), name="y = x"
    )
    fig.add_scatter(
        x=[lo, hi],
        y=[scale * lo, scale * hi],
        mode="lines",
        line=dict(color="#31333f", width=1),
        name=f"best-scaled prediction (x{scale:.2f})",
    )
    fig.update_layout(
        height=420,
        margin=dict(l=10, r=10, t=30, b=10),
        xaxis_title="TRAK predicted margin change",
        yaxis_title="actual margin change (B − A)",
        legend=dict(orientation="h", y=-0.2),
    )
    return fig


def prediction(check: dict[str, Any]) -> None:
    """The prediction's agreement with the actual change, as metrics."""
    a, e = check["actual"], check["actual"]["explained"]

    def ci(v: dict[str, Any]) -> str:
        return f"95% interval [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]"

    metrics = {
        "Pearson r": (f"{a['pearson']['value']:+.2f}", ci(a["pearson"])),
        "Spearman ρ": (f"{a['spearman']['value']:+.2f}", ci(a["spearman"])),
        "Sign agreement": (
            f"{a['sign']['value']:.0%}",
            f"{ci(a['sign'])}; independent signs would agree on {a['sign']['chance']:.0%}.",
        ),
        "Explained (R², scaled)": (
            f"{e['scaled']:.2f}",
            f"Of the prediction times {e['scale']:.2f} (least squares through 0); as predicted "
            f"{e['as_predicted']:.2f}; the best line {e['fit']:.2f}.",
        ),
    }
    for col, (label, (value, help_)) in zip(st.columns(4), metrics.items(), strict=True):
        col.metric(label, value, help=help_)
    if "fixed" in check:
        f = check["fixed"]
        st.caption(
            f"At a fixed contrast batch (B's margin minus A's checkpoints' over B's contrast "
            f"batches: the models' change alone): Pearson {f['pearson']['value']:+.2f}, Spearman "
            f"{f['spearman']['value']:+.2f}, sign agreement {f['sign']['value']:.0%}."
        )


def pairs_table(pairs: list[dict[str, Any]], key: str) -> None:
    if not pairs:
        st.caption("none")
        return
    columns = ("id", "change", "predicted", "margin_a", "margin_b", "rank_a", "rank_b", "caption")
    table = {
        k: [round(p[k], 4) if isinstance(p[k], float) else p[k] for p in pairs] for k in columns
    }
    st.dataframe(table, hide_index=True, key=key)


def side_by_side(a: RunView, b: RunView, c: Comparison, val_id: str, k: int) -> None:
    """A validation pair's top-k influencers in A and in B: A's that were removed from the
    training set or left B's top k, B's that are new in its top k."""
    ra, rb = a.for_val(val_id, k), b.for_val(val_id, k)
    opened: list[tuple[RunView, int | None]] = []
    for sign, title in (("positive", "helps"), ("negative", "hurts")):
        top_a = [card.id for card in getattr(ra, sign)]
        top_b = [card.id for card in getattr(rb, sign)]
        notes_a = {
            card.index: ":red-badge[removed from B's training set]"
            if card.id in c.gone
            else ":gray-badge[left B's top k]"
            for card in getattr(ra, sign)
            if card.id in c.gone or card.id not in top_b
        }
        notes_b = {
            card.index: ":violet-badge[new training pair]"
            if card.id in c.new
            else ":blue-badge[new in the top k]"
            for card in getattr(rb, sign)
            if card.id not in top_a
        }
        left, right = st.columns(2, gap="large")
        with left:
            st.caption(f"Run A: what {title} most")
            opened.append((a, ui.gallery(a, getattr(ra, sign), sign, f"cmp-a-{sign}", 3, notes_a)))
        with right:
            st.caption(f"Run B: what {title} most")
            opened.append((b, ui.gallery(b, getattr(rb, sign), sign, f"cmp-b-{sign}", 3, notes_b)))
    for run, row in opened:
        if row is not None:
            ui.train_detail(run, row)
            break
