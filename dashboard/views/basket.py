"""Basket: the training pairs collected to act on, what removing them should do, the cleaned
training set, and whether retraining confirmed it."""

import streamlit as st

from dashboard import basket_ui, state
from engine.curate import baskets
from engine.curate.effect import run_effect

run = state.open_run()
st.title("Basket: training pairs to act on")
st.caption(
    "Collect training pairs (from any card: open it; from the Overview's lists; from the filter "
    "under Explore's galleries; or below), see what removing them should do to every validation "
    "match, and take the training set without them back to your trainer."
)
with st.sidebar:
    st.text_input(
        "Your name",
        st.session_state.get(basket_ui.WHO, ""),
        key="basket-who-input",
        help="Recorded with every pair you add (default: the server's user).",
        on_change=lambda: st.session_state.update(
            {basket_ui.WHO: st.session_state["basket-who-input"]}
        ),
    )

names = baskets.basket_names(run.layout)
current = basket_ui.current_name(run)
if names:
    chosen = st.selectbox(
        "Basket", names, index=names.index(current) if current in names else 0, key="basket-pick"
    )
    st.session_state[basket_ui.CURRENT] = chosen
with st.expander("Add pairs by caption, column or id file", expanded=not names):
    basket_ui.filter_forms(run)
if not names:
    st.info("No basket yet: add training pairs to start one.", icon=":material/shopping_basket:")
    st.stop()

basket = baskets.read_basket(run.layout, chosen)
if not basket.entries:
    st.info(f"Basket `{basket.name}` is empty.")
    st.stop()
effect = run_effect(run, basket)
held = effect.held_out
n_pairs = len(basket.entries)
st.header(f"Removing {n_pairs} pair{'s' if n_pairs > 1 else ''} should…")
metrics = {
    "Mean validation margin": (
        f"{effect.mean_change:+.4f}",
        f"from {effect.margin.mean():.4f}, over all {len(effect.delta)} validation pairs",
    ),
    "Validation pairs helped": (
        f"{(effect.delta > 0).mean():.0%}",
        "Share whose margin should rise.",
    ),
    "Held-out pairs": (
        f"{effect.delta[held].mean():+.4f}" if held.any() else "none",
        f"Mean change over the {int(held.sum())} validation pairs whose scores chose none of "
        "these pairs (what `trakview eval clean` measures).",
    ),
}
for col, (label, (value, help_)) in zip(st.columns(3), metrics.items(), strict=True):
    col.metric(label, value, help=help_)
st.caption(
    f"For comparison, {n_pairs} random training pairs: {effect.random_mean_change:+.4f} on the "
    "mean margin (expected). A basket's mean change can sit close to that of any basket of its "
    "size; which validation pairs it moves, below, is what tells baskets apart."
)
show = st.warning if not effect.verdict.reliable else st.caption
show(effect.caveat)
st.plotly_chart(basket_ui.effect_figure(effect), key="basket-hist")
for title, rows, sign in (
    ("green[Most helped]", effect.helped(8), "positive"),
    ("red[Most hurt]", effect.hurt(8), "negative"),
):
    moved = int((effect.delta > 0).sum() if sign == "positive" else (effect.delta < 0).sum())
    st.markdown(f"#### :{title} ({moved} of {len(effect.delta)} validation pairs)")
    basket_ui.val_cards(run, rows, effect.delta, sign, 8)

st.header("The pairs")
basket_ui.pairs_table(run, basket)
st.header("The cleaned training set")
basket_ui.cleaned_downloads(run, basket)
st.header("Did it help? Verified by retraining")
basket_ui.verification(basket.verification, basket, run)
