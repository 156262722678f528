"""Group: a set of validation pairs that fail, the training pairs behind them, what those share,
and a basket of the causes (chosen on half of the group, the other half held out)."""

import html

import numpy as np
import streamlit as st

from dashboard import group_ui, state, ui
from engine.errors import TrakviewError
from engine.explain.rules import GroupSpec

CONFUSION_PARAM = "confusion"  # ?confusion=1: attribute the wrong matches on opening

run = state.open_run()
st.title("Why do these pairs fail?")
ui.trust_banner(run.verdict())
st.caption(
    "Pick the validation pairs the model gets wrong (the worst-matched, a search, a column value, "
    "ids or a region of the map). trakview finds what they are matched to instead, the training "
    "pairs that drive those wrong matches, and what those training pairs share."
)

current = None
wanted = st.query_params.get(group_ui.GROUP_PARAM)
if wanted:
    try:
        current = GroupSpec.parse(wanted)
    except TrakviewError as err:
        st.warning(html.escape(str(err)))
with st.sidebar:
    chosen = group_ui.group_picker(run, current)
if chosen is not None and chosen != current:
    current = chosen
    st.query_params[group_ui.GROUP_PARAM] = chosen.param
    st.query_params.pop(CONFUSION_PARAM, None)
if current is None:
    current = GroupSpec("failing", "40")
    st.query_params[group_ui.GROUP_PARAM] = current.param

key = state.run_key(run)
try:
    base = state.group_report(run, key, current.param, False)
except TrakviewError as err:
    st.error(html.escape(str(err)))
    group_ui.region_map(run, None)
    st.stop()
st.subheader(f"Group: {html.escape(current.label())}")
group_ui.stats_row(base.stats, base.rest)
group_ui.member_strip(run, base.rows)
with st.expander("The group on the map", expanded=current.rule == "region"):
    box = group_ui.region_map(run, base.rows)
    if box is not None and box != current.value:
        st.query_params[group_ui.GROUP_PARAM] = f"region:{box}"
        st.rerun()

k = ui.k_input("gr-k", default=8)
st.header("What the failing pairs are matched to instead")
asked = st.query_params.get(CONFUSION_PARAM) == "1"
if not asked:
    st.caption(
        "For each pair that prefers another caption, its image is scored with the training "
        "captions it is matched to instead (new queries, about a second per ten on a CPU)."
    )
    if st.button("Attribute the wrong matches", icon=":material/psychology_alt:", type="primary"):
        st.query_params[CONFUSION_PARAM] = "1"
        st.rerun()
    rep = base
else:
    rep = state.group_report(run, key, current.param, True)
opened: list[int | None] = []
if rep.confusion is not None:
    c = rep.confusion
    st.markdown(
        f"**{c.pairs_confused}** of the group's pairs prefer other captions; "
        f"{len(c.matches)} wrong matches attributed."
    )
    st.dataframe(
        {
            "validation pair": [run.val[m.val_row]["id"] for m in c.matches[:30]],
            "its caption": [run.val[m.val_row]["caption"] for m in c.matches[:30]],
            "matched instead to": [run.train[m.other_row]["caption"] for m in c.matches[:30]],
            "similarity (own)": [
                f"{m.similarity:.3f} ({m.own_similarity:.3f})" for m in c.matches[:30]
            ],
        },
        hide_index=True,
        key="gr-wrong",
    )
    st.markdown("**Those captions share:**")
    group_ui.shared_table(rep.wrong_shared, "gr-wrong-shared")
    st.header("The causes: training pairs that drive the wrong matches")
    causes = run.cards(c.top(k), c.causes, "positive")
    opened.append(ui.gallery(run, causes, "positive", "gr-causes", n_cols=8))
elif asked:
    st.info("No pair of this group prefers another caption to its own: nothing to attribute.")

st.markdown("**What the top causes share** (against the whole training set):")
group_ui.shared_table(rep.shared, "gr-shared")
st.subheader("Act on them")
how = "confusion" if rep.confusion is not None else "harm"
group_ui.causes_form(run, current, how)
group_ui.grow_buttons(run, rep.shared, "gr-grow")

st.header("The group's own margins")
st.caption(
    f"Each training pair's scores summed over the group's {len(rep.rows)} pairs: green pairs raise "
    "their margins, red pairs lower them."
)
total = rep.effect.total
opened.append(
    ui.gallery(
        run, run.cards(rep.effect.helpful(k), total, "positive"), "positive", "gr-help", n_cols=8
    )
)
opened.append(
    ui.gallery(
        run, run.cards(rep.effect.harmful(k), total, "negative"), "negative", "gr-hurt", n_cols=8
    )
)
conc = rep.effect.concentration()
left, right = st.columns([2, 3])
with left:
    for sign, part in conc.items():
        n_for = part["n_for"]
        if n_for:
            st.markdown(
                f"**{sign.capitalize()}**: half of it carried by **{n_for['0.5']}** pairs, "
                f"80% by **{n_for['0.8']}** (of {part['pairs']}); the top 1% carry "
                f"{part['top_percent_share']:.0%}."
            )
with right:
    ui.plot(group_ui.concentration_figure(np.asarray(total)), "gr-conc", clickable=False)

clicked = ui.first(opened)
if clicked is not None:
    ui.train_detail(run, clicked)
