"""Explore: pick a validation pair, see which training pairs help and hurt its CLIP match."""

import streamlit as st

from dashboard import basket_ui, eval_view, picker, state, ui

run = state.open_run()
ids = [str(r["id"]) for r in run.val]
if not ids:
    st.info("This run has no validation pairs to explore; try the Upload page.")
    st.stop()

# A changed ?val=ID in the URL wins, so a shared link opens its pair; the picker's callbacks set
# both the session's pair and the URL.
wanted = st.query_params.get("val")
if wanted is not None and wanted != st.session_state.get(picker.VAL_KEY):
    if wanted in run.val_index:
        st.session_state[picker.VAL_KEY] = wanted
    else:
        st.warning(
            f"No validation pair with id {ui.plain(wanted)} in this run; pick one on the left."
        )
st.session_state.setdefault(picker.VAL_KEY, ids[0])
val_id = st.session_state[picker.VAL_KEY]
st.query_params["val"] = val_id

with st.sidebar:
    picker.val_picker(run, val_id)

st.title("Why does the model match this pair?")
ui.trust_banner(run.verdict())
st.caption(
    "TRAK scores every training pair by how much it raises (green) or lowers (red) the model's "
    "CLIP margin for the selected image and caption. Pick another pair on the left."
)
j = run.val_position(val_id)
rec = run.val[j]
header = st.container()
k = ui.k_input("ex-k")
result = run.for_val(val_id, k)
with header:
    ui.pair_header(
        run.image(rec["image"]),
        rec["caption"],
        {
            "Validation pair": (val_id, "Its id; the URL of this page links to it."),
            "CLIP similarity": (ui.fmt(result.clip_similarity), "Cosine of image and caption."),
            "CLIP margin": (ui.fmt(result.margin), "The model output TRAK attributes."),
            "Caption rank": (
                f"{int(run.val_caption_rank[j])} of {len(ids)}",
                "Rank of this caption among all validation captions for this image (1 = best).",
            ),
        },
        rec,
    )
    eval_view.pair_check(run.run, val_id, j)
ui.influence_view(
    run,
    result,
    k,
    "ex",
    figures=lambda: state.val_figures(run, state.run_key(run), val_id, k),
)
with st.expander("Put the training pairs that hurt this match in a basket"):
    lowest = result.negative[min(k, len(result.negative)) - 1].score if result.negative else 0.0
    basket_ui.threshold_form(run, j, val_id, default=lowest)
