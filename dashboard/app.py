"""trakview's dashboard: routes to its pages (``views/``). Start it with `trakview serve RUN`.

The pages live in ``views/``, not ``pages/``: Streamlit takes a ``pages/`` folder beside the main
script for its automatic page list and runs ``/basket`` from it without this router (no layout, no
sidebar navigation), so a deep link to a page would open a different dashboard."""

import streamlit as st

from dashboard import state, ui

st.set_page_config(page_title="trakview", page_icon=":material/travel_explore:", layout="wide")
st.html(ui.CSS)

page = st.navigation(
    [
        st.Page(
            "views/explore.py", title="Explore", icon=":material/travel_explore:", default=True
        ),
        st.Page("views/upload.py", title="Upload a pair", icon=":material/upload:"),
        st.Page("views/overview.py", title="Overview", icon=":material/monitoring:"),
        st.Page("views/group.py", title="Why do these fail?", icon=":material/troubleshoot:"),
        st.Page("views/basket.py", title="Basket", icon=":material/shopping_basket:"),
        st.Page("views/compare.py", title="Compare runs", icon=":material/compare_arrows:"),
    ]
)
run = state.run_dir()
st.sidebar.caption(f"run `{run}`" if run else "no run")
with state.timed(page.title):
    page.run()
