"""Compare: did the fix work? This run (A) against a second one (B) built after removing pairs
and retraining: what changed per validation pair, and TRAK's prediction against it."""

import streamlit as st

from dashboard import compare_ui, state, ui
from engine.errors import TrakviewError

run = state.open_run()
st.title("Did the fix work? Two runs compared")
st.caption(
    "Run A is this dashboard's run; run B was built after removing training pairs and "
    "retraining (`trakview basket export`, your trainer, `trakview build`). Validation pairs are "
    "matched by id; margins are each run's own."
)
other = compare_ui.pick_other(run)
if other is None:
    st.info(
        "Pick run B, or start the dashboard with `trakview serve RUN --compare RUN_B`.",
        icon=":material/compare_arrows:",
    )
    st.stop()
basket, columns = compare_ui.settings(run)
try:
    b = state.open_other(other)
    key = f"{state.run_key(run)}|{state.run_key(b)}"
    comparison, doc = state.comparison(run, b, key, basket, columns)
except TrakviewError as err:
    st.error(f"Cannot compare: {err}")
    st.stop()
st.caption(f"Run B: `{b.run}`")
compare_ui.overview(doc)
for note in doc["notes"]:
    st.caption(f"Note: {ui.plain(note)}")
st.header("Per group of validation pairs")
compare_ui.groups_table(doc)

check = doc["prediction"]
st.header("TRAK's prediction against what retraining did")
if check is None:
    st.info("No training pair of A is missing from B: there is no removal to predict.")
else:
    compare_ui.prediction(check)
    scale = check["actual"]["explained"]["scale"]
    picked_at = ui.plot(compare_ui.scatter(comparison, scale), "cmp-scatter")
    if picked_at is not None:
        st.session_state[compare_ui.PAIR_KEY] = comparison.ids[picked_at]

left, right = st.columns(2)
with left:
    st.subheader(":green[Improved most]")
    compare_ui.pairs_table(doc["improved"], "cmp-improved")
with right:
    st.subheader(":red[Regressed most]")
    compare_ui.pairs_table(doc["regressed"], "cmp-regressed")

st.header("A pair's influencers, before and after")
ids = comparison.ids
default = doc["regressed"][0]["id"] if doc["regressed"] else ids[0]
st.session_state.setdefault(compare_ui.PAIR_KEY, default)
val_id = st.selectbox(
    "Validation pair (or click a point of the plot)",
    ids,
    key=compare_ui.PAIR_KEY,
    format_func=lambda i: f"{i}: {run.val[run.val_position(i)]['caption']}",
)
p = doc["pairs"][comparison.position(val_id)]
rec = run.val[run.val_position(val_id)]
ui.pair_header(
    run.image(rec["image"]),
    rec["caption"],
    {
        "Margin A → B": (f"{p['margin_a']:.2f} → {p['margin_b']:.2f}", "Each run's own margin."),
        "Change": (f"{p['change']:+.4f}", "B's margin minus A's."),
        "TRAK predicted": (
            "n/a" if p["predicted"] is None else f"{p['predicted']:+.4f}",
            "Minus the removed pairs' scores in run A, summed.",
        ),
        "Caption rank A → B": (f"{p['rank_a']} → {p['rank_b']}", "1 = its own caption first."),
    },
    rec,
)
compare_ui.side_by_side(run, b, comparison, val_id, ui.k_input("cmp-k"))
