"""Overview: the run's facts, the training pairs that matter most overall, suspected mislabels."""

import html
from dataclasses import asdict

import numpy as np
import streamlit as st

from dashboard import basket_ui, eval_view, state, ui
from engine.curate import select
from engine.evaluate import groundtruth
from engine.explore.results import QueryResult

run = state.open_run()
manifest = run.manifest
cfg, counts = manifest.config, manifest.counts
timings = {k: v for k, v in manifest.timings_seconds.items() if v is not None}

st.title("Overview of the run")
ui.trust_banner(run.verdict(), always=True)
st.caption(f"`{run.run}` · model `{cfg.model}`")
facts = {
    "Checkpoints": counts.n_checkpoints,
    "Training pairs": f"{counts.n_train:,}",
    "Validation pairs": f"{counts.n_val:,}",
    "Projection dim": counts.proj_dim,
    "Build time": f"{sum(timings.values()):.1f} s",
}
for col, (label, value) in zip(st.columns(len(facts)), facts.items(), strict=True):
    col.metric(label, value)
with st.expander("Settings, checkpoints and build timings"):
    left, mid, right = st.columns(3)
    left.markdown("**Settings**")
    settings = asdict(cfg)
    left.dataframe(
        {"setting": list(settings), "value": [str(v) for v in settings.values()]}, hide_index=True
    )
    mid.markdown("**Checkpoints**")
    mid.dataframe(
        {
            "path": [c.path for c in manifest.checkpoints],
            "sha256": [c.sha256[:12] for c in manifest.checkpoints],
        },
        hide_index=True,
    )
    right.markdown("**Build timings (s)**")
    right.dataframe({"stage": list(timings), "seconds": list(timings.values())}, hide_index=True)
    st.caption("versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))

k = ui.k_input("ov-k", default=8)
opened = []

st.header("Most helpful and most harmful overall")
st.caption(
    f"Each training pair's scores summed over all {counts.n_val} validation pairs: green pairs "
    "raise the model's CLIP margins across the validation set, red pairs lower them."
)
total = run.total_scores
best, worst = run.ranked_totals
whole = QueryResult(
    caption=f"all {counts.n_val} validation pairs (scores summed)",
    positive=run.cards(best[:k], total, "positive"),
    negative=run.cards(worst[:k], total, "negative"),
    similar=[],
    clip_similarity=float(np.mean(run.val_clip_sim)),
    margin=float(np.mean(run.val_margin)),
    histogram=(np.zeros(0), np.zeros(1)),
)
opened.append(ui.gallery(run, whole.positive, "positive", "ov-pos", n_cols=8))
opened.append(ui.gallery(run, whole.negative, "negative", "ov-neg", n_cols=8))
ui.export_buttons(run, whole, "ov-whole", query_image=run.val_mosaic)
basket_ui.add_form(
    run,
    lambda n: select.most_harmful(total, n),
    "ov-harm-basket",
    "harmful",
    why=lambda n: f"among the {n} most harmful overall",
    number=basket_ui.count_input(run, k),
    every_val=True,
    label="Add the most harmful",
)

st.header("Suspected mislabeled training pairs")
if run.suspect is None:
    st.info("This run has no suspect ranking: rebuild it with this version of `trakview build`.")
else:
    st.caption(
        "Training pairs ranked by the rank average of TRAK self-influence (a gradient the rest of "
        "the data does not explain) and the caption's rank among the training captions for its "
        "image (the model's own retrieval). Where the data has ground truth it is shown."
    )
    ui.suspect_comparison(groundtruth.signal_aurocs(run.suspect_signals(), run.train))
    order = run.ranked_suspects[:k]
    suspects = run.cards(order, run.suspect, "suspect")
    notes = {}
    for card in suspects:
        rec = run.train[card.index]
        if "mislabeled" in rec:
            notes[card.index] = (
                f"<small>true caption: <i>{html.escape(rec.get('true_caption', '?'))}</i></small>"
                if rec["mislabeled"]
                else ":gray-badge[caption correct]"
            )
    if notes:
        hits = sum(bool(run.train[c.index].get("mislabeled")) for c in suspects)
        st.markdown(f"**{hits} of the top {len(suspects)}** are truly mislabeled (demo truth).")
    opened.append(ui.gallery(run, suspects, "suspect", "ov-sus", n_cols=8, notes=notes))
    flagged = QueryResult(
        caption="suspected mislabeled training pairs",
        positive=suspects,
        negative=[],
        similar=[],
        clip_similarity=float("nan"),
        margin=float("nan"),
        histogram=(np.zeros(0), np.zeros(1)),
        notes=["Cards are ranked by suspicion, not by TRAK score."],
    )
    ui.export_buttons(run, flagged, "ov-sus", query_image=run.val_mosaic)
    basket_ui.add_form(
        run,
        lambda n: select.top_suspects(run.suspect, n),
        "ov-sus-basket",
        "suspects",
        why=lambda n: f"among the {n} most suspected mislabeled",
        number=basket_ui.count_input(run, k),
        label="Add the most suspect",
    )

st.header("Are the attributions right?")
eval_view.lds_section(run.run)
eval_view.removal_section(run.run)

clicked = ui.first(opened)
if clicked is not None:
    ui.train_detail(run, clicked)
