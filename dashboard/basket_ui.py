"""The dashboard's basket pieces: the forms that add training pairs to a basket (from a card, a
list, a filter), and what the basket page shows (its pairs, the predicted effect, the cleaned
set's downloads, the verification by retraining).

Adding is the one thing the dashboard writes, and only when a form is submitted
(``engine.curate.baskets``: atomic, under a lock). Text from the data goes into HTML escaped;
basket names are safe file stems shown as code.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from engine.curate import baskets, select
from engine.curate.cleaned import REMOVED, clean_run, listing_name
from engine.curate.effect import Effect
from engine.curate.source import run_source
from engine.errors import TrakviewError
from engine.explore.view import RunView

CURRENT = "basket-current"  # session key: the basket this session adds to and shows
WHO = "basket-who"  # session key: who this session is (recorded with every pair it adds)
DEFAULT_NAME = "cleanup"
GREEN, RED = "#1a9850", "#d73027"


def current_name(run: RunView) -> str:
    """The session's basket: the one it chose last, else the run's first, else a new name."""
    if CURRENT not in st.session_state:
        names = baskets.basket_names(run.layout)
        st.session_state[CURRENT] = names[0] if names else DEFAULT_NAME
    return st.session_state[CURRENT]


def add_form(
    run: RunView,
    rows: Sequence[int] | Callable[[Any], Sequence[int]],
    key: str,
    how: str,
    why: str | Callable[[Any], str] = "",
    number: dict[str, Any] | None = None,
    chosen_with_val: Sequence[str] = (),
    every_val: bool = False,
    label: str = "Add to basket",
) -> int | None:
    """A small form that adds training rows to a basket when submitted.

    Args:
        rows: the rows, or (with ``number``) a function of the number the user gives.
        why: the reason recorded when the user types none (a function of the number).
        number: ``st.number_input``'s arguments for a number in the form (how many, a
            threshold).

    Returns:
        How many pairs were new in the basket, when the form was submitted.
    """
    with st.form(key, border=False):
        cols = st.columns([1, 2, 2, 2] if number is not None else [2, 3, 2], gap="small")
        value = cols.pop(0).number_input(key=f"{key}-n", **number) if number else None
        name = cols[0].text_input("Basket", current_name(run), key=f"{key}-name")
        placeholder = why if isinstance(why, str) and why else "e.g. wrong colour"
        typed = cols[1].text_input("Why", key=f"{key}-why", placeholder=placeholder)
        cols[2].markdown("<div style='height:1.75rem'></div>", unsafe_allow_html=True)
        submitted = cols[2].form_submit_button(label, icon=":material/add_shopping_cart:")
    if not submitted:
        return None
    chosen = rows(value) if callable(rows) else rows
    reason = typed.strip() or (why(value) if callable(why) else why)
    try:
        basket, added = baskets.add_rows(
            run.layout,
            name.strip(),
            run.train,
            chosen,
            reason,
            how,
            st.session_state.get(WHO),
            chosen_with_val,
            every_val,
        )
    except TrakviewError as err:
        st.error(html.escape(str(err)))
        return None
    st.session_state[CURRENT] = basket.name
    st.success(
        f"{added} of {len(chosen)} pairs added to basket `{basket.name}` "
        f"({len(basket.entries)} in it). See it on the Basket page.",
        icon=":material/shopping_basket:",
    )
    return added


def count_input(run: RunView, default: int) -> dict[str, Any]:
    """``add_form``'s number: how many pairs of a ranked list."""
    top = max(1, len(run.train))
    return {"label": "How many", "min_value": 1, "max_value": top, "value": min(default, top)}


def threshold_form(run: RunView, j: int, val_id: str, default: float) -> int | None:
    """Adds the training pairs whose score for validation pair j is at or below a threshold."""
    return add_form(
        run,
        lambda threshold: select.at_or_below(run.scores.column(j), threshold),
        f"basket-threshold-{j}",
        "threshold",
        why=lambda threshold: f"score <= {threshold:.5f} for validation pair {val_id}",
        number={"label": "Score at or below", "value": float(default), "format": "%.5f"},
        chosen_with_val=[val_id],
        label="Add these pairs",
    )


def filter_forms(run: RunView) -> None:
    """Add by caption text, by a column's value, or from a file of ids."""
    words, column, upload = st.tabs(["Caption contains", "Column value", "Ids from a file"])
    with words:
        text = st.text_input("Words in the caption", key="basket-search")
        if text.strip():
            found = select.caption_matches(run.train, text)
            st.caption(f"{len(found)} training pairs match.")
            add_form(run, found, "basket-search-form", "search", f"caption contains {text!r}")
    with column:
        fields = select.extra_fields(run.train)
        if not fields:
            st.caption("The training pairs have no columns besides id, caption and image.")
        else:
            left, right = st.columns(2)
            key = left.selectbox("Column", fields, key="basket-column")
            value = right.text_input("Value (true / false for flags)", key="basket-value")
            if value.strip():
                found = select.column_matches(run.train, key, value)
                st.caption(f"{len(found)} training pairs have {key} = {value.strip()}.")
                add_form(run, found, "basket-column-form", "column", f"{key} = {value.strip()}")
    with upload:
        file = st.file_uploader(
            "One id per line, or a .jsonl / .csv with an id field", key="basket-file"
        )
        if file is not None:
            try:
                ids = select.parse_ids(file.getvalue().decode("utf-8", "replace"), file.name)
                found = baskets.rows_of_ids(run.train, ids)
            except TrakviewError as err:
                st.error(html.escape(str(err)))
                return
            st.caption(f"{len(found)} training ids in {html.escape(file.name)}.")
            add_form(run, found, "basket-file-form", "import", f"imported from {file.name}")


def effect_figure(effect: Effect) -> go.Figure:
    """Histogram of the predicted changes of the validation margins."""
    centres = (effect.edges[:-1] + effect.edges[1:]) / 2
    fig = go.Figure(
        go.Bar(
            x=centres,
            y=effect.counts,
            marker_color=[GREEN if c >= 0 else RED for c in centres],
            hovertemplate="change %{x:+.4f}: %{y} pairs<extra></extra>",
        )
    )
    fig.add_vline(x=0, line=dict(color="#888", dash="dot"))
    fig.update_layout(
        title=dict(text="<b>Predicted margin changes</b>", x=0.5),
        xaxis_title="predicted change of the CLIP margin",
        yaxis_title="validation pairs",
        height=320,
        margin=dict(l=10, r=10, t=40, b=10),
        bargap=0.05,
    )
    return fig


def val_cards(run: RunView, rows: np.ndarray, delta: np.ndarray, sign: str, n_cols: int) -> None:
    """Validation pairs as cards: image, predicted change, caption, a link to Explore them."""
    colour = GREEN if sign == "positive" else RED
    if not len(rows):
        st.caption("none")
    for start in range(0, len(rows), n_cols):
        cols = st.columns(n_cols, border=True, gap="small")
        for col, j in zip(cols, rows[start : start + n_cols], strict=False):
            rec = run.val[int(j)]
            caption = html.escape(rec["caption"])
            with col:
                st.markdown(
                    f"{run.thumbnail(rec['image'])}\n\n"
                    f"<b style='color:{colour}'>{delta[j]:+.4f}</b>"
                    f'<div class="tv-cap" title="{caption}">{caption}</div>',
                    unsafe_allow_html=True,
                )
                st.page_link(
                    "views/explore.py",
                    label=html.escape(str(rec["id"])),
                    icon=":material/arrow_forward:",
                    query_params={"val": rec["id"]},
                )


def pairs_table(run: RunView, basket: baskets.Basket) -> None:
    """The basket's pairs (select rows, then take them out)."""
    entries = basket.entries
    event = st.dataframe(
        {
            "id": [e.id for e in entries],
            "caption": [e.caption for e in entries],
            "how": [e.how for e in entries],
            "why": [e.why for e in entries],
            "who": [e.who for e in entries],
            "when": [e.when for e in entries],
        },
        hide_index=True,
        on_select="rerun",
        selection_mode="multi-row",
        key="basket-table",
    )
    picked = [entries[i].id for i in event.selection.rows] if event else []
    if st.button(
        f"Take {len(picked)} selected pairs out",
        disabled=not picked,
        key="basket-remove",
        icon=":material/remove_shopping_cart:",
    ):
        baskets.remove_ids(run.layout, basket.name, picked)
        st.rerun()


def cleaned_downloads(run: RunView, basket: baskets.Basket) -> None:
    """Downloads of the cleaned training set (built only when a button is clicked)."""
    try:
        source = run_source(run.layout, run.manifest)
    except TrakviewError as err:
        st.info(f"{html.escape(str(err))}. The command line can name it: `trakview basket export`.")
        return
    st.caption(
        f"The {source.format} source `{html.escape(source.train)}` without these "
        f"{len(basket.entries)} pairs, in its own format; `trakview basket export` writes it "
        "to a folder and reads it back as a check."
    )

    def payload(name: str) -> bytes:
        return clean_run(run.layout, run.manifest, basket, source).files[name]

    main = listing_name(source)
    with st.container(horizontal=True, gap="small", key="basket-downloads"):
        for name, label in ((main, f"Cleaned {main}"), (REMOVED, "Removed pairs (JSONL)")):
            st.download_button(
                label,
                data=lambda name=name: payload(name),
                file_name=name,
                key=f"basket-download-{name}",
                on_click="ignore",
                icon=":material/download:",
            )


def _cell(value: dict[str, Any]) -> str:
    return f"{value['mean']:+.3f} [{value['ci'][0]:+.3f}, {value['ci'][1]:+.3f}]"


def verification(result: dict[str, Any] | None, basket: baskets.Basket, run: RunView) -> None:
    """The basket's last verification by retraining, or how to run one."""
    if result is None:
        st.caption(
            f"Not verified yet: `trakview eval clean {html.escape(str(run.run))} --basket "
            f"{basket.name}` retrains the run's ensemble with and without these pairs."
        )
        return
    if result["basket_digest"] != basket.digest:
        st.warning("The basket changed since it was verified: run `trakview eval clean` again.")
    m = result["measured"]
    st.markdown(
        f"{len(result['seeds'])} models per condition (the run's trainer and seeds), measured on "
        f"{m['n_val']} validation pairs "
        + ("held out from the basket's choice." if m["held_out"] else "**not** held out.")
    )
    names = {"margin": "margin", "i2t_r1": "image→text R@1", "i2t_r5": "image→text R@5"}
    names |= {"t2i_r1": "text→image R@1", "t2i_r5": "text→image R@5"}
    rows = []
    for condition, values in result["conditions"].items():
        diffs = values.get("minus_full")
        predicted = values.get("predicted_margin_change")
        row = {"removed": f"{condition} ({values['removed']})"}
        row["TRAK predicted"] = "" if predicted is None else f"{predicted:+.4f}"
        for metric, label in names.items():
            mean = values["metrics"][metric]["mean"]
            row[label] = f"{mean:.3f}" + (f"  Δ {_cell(diffs[metric])}" if diffs else "")
        rows.append(row)
    st.dataframe(rows, hide_index=True, key="basket-verification")
    summary = result["summary"]
    st.markdown(html.escape(summary[0].upper() + summary[1:]) + ".")
    notes = ["Intervals: 95%, bootstrap over seeds and measured pairs.", *result.get("notes", [])]
    st.caption("  \n".join(html.escape(n[0].upper() + n[1:]) for n in notes))
