"""The sidebar's validation-pair picker: search, a random pick and a paged thumbnail grid."""

from __future__ import annotations

import math

import numpy as np
import streamlit as st

from dashboard import state
from dashboard.ui import plain
from engine.explore.view import RunView

VAL_KEY = "val_id"  # session key of the selected validation pair (the URL's ?val=)
PICKER_PAGE = 12


def choose_val(val_id: str) -> None:
    """Callback: select a validation pair (runs before the page, so all of it sees the choice)."""
    st.session_state[VAL_KEY] = val_id
    st.query_params["val"] = val_id


def _first_page() -> None:
    st.session_state["picker-page"] = 1


def val_picker(run: RunView, selected: str) -> None:
    """Search box, random button and a paged thumbnail grid of validation pairs.

    A click selects a pair through ``choose_val`` (``st.session_state[VAL_KEY]``).
    """
    st.subheader("Pick a validation pair")
    text = st.text_input(
        "Search",
        placeholder="e.g. a red circle on the left",
        key="picker-text",
        on_change=_first_page,
    )
    mode = st.radio(
        "Match",
        ["meaning", "words"],
        format_func={"meaning": "by meaning (CLIP)", "words": "words in caption"}.get,
        horizontal=True,
        key="picker-mode",
        on_change=_first_page,
        label_visibility="collapsed",
    )
    rows = state.search_val(run, state.run_key(run), text, mode)
    ids = [str(run.val[j]["id"]) for j in rows]
    st.button(
        "Random pair",
        icon=":material/casino:",
        key="picker-random",
        on_click=lambda: choose_val(str(np.random.default_rng().choice(ids or [selected]))),
        width="stretch",
    )
    if not rows:
        st.caption("No caption contains these words.")
        return
    n_pages = max(1, math.ceil(len(rows) / PICKER_PAGE))
    page = int(
        st.number_input(f"Page (of {n_pages}; {len(rows)} pairs)", 1, n_pages, 1, key="picker-page")
    )
    shown = rows[(page - 1) * PICKER_PAGE : page * PICKER_PAGE]
    cols = st.columns(3)  # one row of columns filled in turn: fewer elements than a row each
    for n, j in enumerate(shown):
        rec = run.val[j]
        with cols[n % 3]:
            st.markdown(run.thumbnail(rec["image"]), unsafe_allow_html=True)
            st.button(
                plain(rec["id"]),
                key=f"pick-{rec['id']}",
                help=plain(rec["caption"]),
                on_click=choose_val,
                args=(str(rec["id"]),),
                type="primary" if str(rec["id"]) == selected else "secondary",
                width="stretch",
            )
