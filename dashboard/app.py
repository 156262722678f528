"""trakview's dashboard: routes to its pages. Start it with `trakview serve RUN`."""

import streamlit as st

from dashboard import state, ui

st.set_page_config(page_title="trakview", page_icon=":material/travel_explore:", layout="wide")
st.html(ui.CSS)

page = st.navigation(
    [
        st.Page(
            "pages/explore.py", title="Explore", icon=":material/travel_explore:", default=True
        ),
        st.Page("pages/upload.py", title="Upload a pair", icon=":material/upload:"),
        st.Page("pages/overview.py", title="Overview", icon=":material/monitoring:"),
        st.Page("pages/basket.py", title="Basket", icon=":material/shopping_basket:"),
        st.Page("pages/compare.py", title="Compare runs", icon=":material/compare_arrows:"),
    ]
)
run = state.run_dir()
st.sidebar.caption(f"run `{run}`" if run else "no run")
with state.timed(page.title):
    page.run()
