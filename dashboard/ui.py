"""Reusable pieces of the dashboard: pair cards, influencer galleries, score plots, export.

Each function draws and returns what the user chose as a plain value (a training row that was
clicked, a k, ...); the pages decide what to do with it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from dashboard import basket_ui, plots
from dashboard.plots import COLOUR, TITLE
from engine.explore import export
from engine.explore.results import Influencer, QueryResult
from engine.explore.trust import Verdict
from engine.explore.view import PIXELATED_BELOW, RunView

MD_COLOUR = {"positive": "green", "negative": "red", "similar": "blue", "suspect": "orange"}
HELP = {
    "positive": "Training pairs whose presence raises the model's CLIP margin for this pair "
    "(positive TRAK score).",
    "negative": "Training pairs whose presence lowers the CLIP margin (negative TRAK score).",
    "similar": "Nearest training images by CLIP similarity, for comparison: similar is not the "
    "same as influential.",
}
# 64-pixel demo images stay crisp when upscaled; photos (key "photo") keep smooth scaling.
CSS = """<style>
[data-testid="stImage"] img, .tv-img.px { image-rendering: pixelated; }
.st-key-photo img { image-rendering: auto !important; }
.tv-img { display: block; width: 100% !important; aspect-ratio: 1; object-fit: contain !important;
  border-radius: 6px; background: #f3f4f6; margin-bottom: 0.45rem; }
.tv-row { display: flex; gap: 0.7rem; align-items: center; }
.tv-row .tv-img { width: 76px !important; flex: none; margin: 0; }
.tv-cap { font-size: 0.82rem; line-height: 1.3; height: 5.2em; overflow: hidden;
  display: -webkit-box; -webkit-line-clamp: 4; -webkit-box-orient: vertical; }
.tv-row .tv-cap { height: auto; -webkit-line-clamp: 3; }
[data-testid="stMainBlockContainer"] { padding-top: 2.5rem; }
[data-testid="stAppDeployButton"] { display: none; }
</style>"""


MARKDOWN_SPECIAL = set("\\`*_[]<>$#|~:{}")


def plain(text: object) -> str:
    """``text`` from the data or the user, shown as it is in Streamlit's markdown (no emphasis,
    links, HTML, math, colour directives or emoji codes)."""
    return "".join("\\" + ch if ch in MARKDOWN_SPECIAL else ch for ch in str(text))


def trust_banner(verdict: Verdict, always: bool = False) -> None:
    """The run's trust verdict: a banner when it is not reliable (or ``always``)."""
    if verdict.reliable and not always:
        return
    show = {"no signal": st.error, "weak": st.warning}.get(verdict.level, st.success)
    show(
        f"**Attributions: {verdict.level}.** {verdict.reason[0].upper()}{verdict.reason[1:]}.",
        icon=":material/verified:" if verdict.reliable else ":material/warning:",
    )
    with st.expander("What trakview measured"):
        st.markdown("\n".join(f"- {html.escape(line)}" for line in verdict.evidence))


def suspect_comparison(aurocs: dict[str, float] | None) -> None:
    """How well each suspect signal finds the planted mislabeled pairs (runs with ground truth)."""
    if aurocs is None:
        return
    st.dataframe(
        {
            "signal": list(aurocs),
            "ROC AUC (planted mislabeled pairs)": [f"{v:.3f}" for v in aurocs.values()],
        },
        hide_index=True,
        key="suspect-aurocs",
    )
    trak = aurocs["self-influence"]
    plain = max(v for k, v in aurocs.items() if k in ("CLIP similarity (low)", "caption rank"))
    if trak <= plain:
        st.caption(
            f"TRAK self-influence alone ({trak:.3f}) does not beat the model's own retrieval "
            f"signals ({plain:.3f}) here; the ranking shown combines it with the caption rank."
        )


def badges(rec: dict) -> str:
    """Short inline badges for the demo's ground-truth flags of a training pair."""
    out = ""
    if rec.get("mislabeled"):
        out += " :red-badge[mislabeled]"
    if rec.get("near_duplicate_of"):
        out += " :orange-badge[near dup]"
    if rec.get("rare"):
        out += " :violet-badge[rare]"
    return out


def facts(rec: dict) -> str:
    """Markdown badges for the demo's ground-truth fields of a pair (empty for real data)."""
    out = []
    if rec.get("mislabeled"):
        out.append(f":red-badge[mislabeled] true caption: *{plain(rec.get('true_caption', '?'))}*")
    if rec.get("near_duplicate_of"):
        out.append(f":orange-badge[near duplicate of {plain(rec['near_duplicate_of'])}]")
    if rec.get("rare"):
        out.append(":violet-badge[rare]")
    attrs = [f"{k}: {plain(rec[k])}" for k in ("shape", "colour", "size", "position") if rec.get(k)]
    if attrs:
        out.append(":gray[" + " · ".join(attrs) + "]")
    return "  \n".join(out)


def pair_header(
    image: Image.Image, caption: str, metrics: dict[str, str], rec: dict | None = None
) -> None:
    """The target pair: its image, caption, CLIP numbers and ground-truth facts."""
    left, right = st.columns([1, 4], vertical_alignment="center")
    photo = max(image.size) >= PIXELATED_BELOW  # scaled smoothly; small ones stay crisp
    with left, st.container(key="photo" if photo else None):
        st.image(image, width=220)
    with right:
        st.markdown(f"### “{plain(caption)}”")
        for col, (label, (value, help_)) in zip(
            st.columns(len(metrics)), metrics.items(), strict=True
        ):
            col.metric(label, value, help=help_)
        if rec and facts(rec):
            st.markdown(facts(rec))


def k_input(key: str, default: int = 6) -> int:
    return int(st.slider("Influencers shown per gallery (k)", 1, 50, default, key=key, width=420))


def gallery(
    run: RunView,
    cards: Sequence[Influencer],
    sign: str,
    key: str,
    n_cols: int,
    notes: dict[int, str] | None = None,
) -> int | None:
    """A grid of training-pair cards; returns the training row whose card was opened, if any.

    ``notes`` adds a markdown line to the card of a training row.
    """
    st.markdown(f"#### :{MD_COLOUR[sign]}[{TITLE[sign]}]", help=HELP.get(sign))
    opened = None
    for start in range(0, len(cards), n_cols):
        cols = st.columns(n_cols, border=True, gap="small")  # a bordered column is a card
        for col, card in zip(cols, cards[start : start + n_cols], strict=False):
            with col:
                note = f"\n\n{notes[card.index]}" if notes and notes.get(card.index) else ""
                st.markdown(
                    f"{run.thumbnail(card.image)}\n\n"
                    f"**#{card.rank}** :{MD_COLOUR[sign]}[**{card.score:+.4f}**]"
                    f"{badges(run.train[card.index])}{_caption(card.caption)}{note}",
                    unsafe_allow_html=True,
                )
                if _open_button(card, key):
                    opened = card.index
    if not cards:
        st.caption("nothing to show")
    return opened


def _open_button(card: Influencer, key: str) -> bool:
    """The card's id as a button that opens the training pair's detail."""
    return st.button(
        plain(card.id),
        key=f"{key}-open-{card.index}",
        help="Open this training pair",
        type="tertiary",
        icon=":material/open_in_full:",
    )


def _caption(text: str) -> str:
    text = html.escape(text)
    return f'<div class="tv-cap" title="{text}">{text}</div>'


def compact_list(run: RunView, cards: Sequence[Influencer], sign: str, key: str) -> int | None:
    """A narrow column of small cards (image beside text); returns the row opened, if any."""
    st.markdown(f"#### :{MD_COLOUR[sign]}[{TITLE[sign]}]", help=HELP.get(sign))
    opened = None
    for card in cards:
        with st.container(border=True, key=f"{key}-card-{card.index}", gap="small"):
            st.markdown(
                f'<div class="tv-row">{run.thumbnail(card.image)}<div>'
                f"<b>#{card.rank}</b> <b style='color:{COLOUR[sign]}'>{card.score:.3f}</b>"
                f"{_caption(card.caption)}</div></div>",
                unsafe_allow_html=True,
            )
            if _open_button(card, key):
                opened = card.index
    return opened


def export_buttons(
    run: RunView, result: QueryResult, key: str, query_image: Image.Image | None = None
) -> None:
    """Download buttons (zip, html, png, csv) for a result's helps/hurts galleries.

    The files are built by ``engine.export`` only when a button is clicked.
    """
    mimes = {"zip": "application/zip", "html": "text/html", "png": "image/png", "csv": "text/csv"}
    name = (result.val_id or "query").replace("/", "_")
    with st.container(
        horizontal=True, gap="small", key=f"{key}-export", vertical_alignment="center"
    ):
        st.caption("Download these galleries:", width="content")
        for fmt, mime in mimes.items():
            st.download_button(
                fmt.upper(),
                data=lambda fmt=fmt: export.gallery_bytes(run.run, result, fmt, query_image),
                file_name=f"trakview-{name}.{fmt}",
                mime=mime,
                key=f"{key}-export-{fmt}",
                on_click="ignore",
                icon=":material/download:",
            )


def plot(fig: go.Figure, key: str, clickable: bool = True) -> int | None:
    """Draws a figure; returns a training row newly clicked on it (once per click). A figure
    whose points open nothing (``clickable`` False) is drawn without selection handling or a
    mode bar: less for the browser to do on every selection."""
    if not clickable:
        st.plotly_chart(fig, key=key, config={"displayModeBar": False})
        return None
    event = st.plotly_chart(
        fig, key=key, on_select="rerun", selection_mode="points", config={"displaylogo": False}
    )
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    picked = next((p.get("customdata") for p in points if p.get("customdata") is not None), None)
    if isinstance(picked, list):
        picked = picked[0]
    seen_key = f"{key}-seen"
    if picked is None or st.session_state.get(seen_key) == picked:
        st.session_state[seen_key] = picked
        return None
    st.session_state[seen_key] = picked
    return int(picked)


# --- a whole result ------------------------------------------------------------------------------


@st.dialog("Training pair", width="large")
def train_detail(run: RunView, index: int) -> None:
    """A training pair: its image and caption, ground truth, and the validation pairs it moves."""
    rec = run.train[index]
    left, right = st.columns([1, 3])
    left.image(run.image(rec["image"]), width="stretch")
    with right:
        st.markdown(f"### “{plain(rec['caption'])}”")
        st.markdown(f"{plain(rec['id'])} · row {index}")
        if facts(rec):
            st.markdown(facts(rec))
        basket_ui.add_form(run, [index], f"basket-card-{index}", "card")
    row = run.scores.row(index)  # (n_val,)
    n = min(5, len(row))
    for title, order, sign in (
        ("Validation pairs it helps most", np.argsort(-row, kind="stable")[:n], "positive"),
        ("Validation pairs it hurts most", np.argsort(row, kind="stable")[:n], "negative"),
    ):
        st.markdown(f"**:{MD_COLOUR[sign]}[{title}]**")
        for col, j in zip(st.columns(n), order, strict=True):
            val = run.val[int(j)]
            with col.container(border=True, gap="small"):
                st.markdown(
                    f'<div class="tv-row">{run.thumbnail(val["image"])}<div>'
                    f"<b style='color:{COLOUR[sign]}'>{row[j]:+.4f}</b>"
                    f"{_caption(val['caption'])}</div></div>",
                    unsafe_allow_html=True,
                )
                st.page_link(
                    "views/explore.py",
                    label=plain(val["id"]),
                    icon=":material/arrow_forward:",
                    query_params={"val": val["id"]},
                )


def influence_view(
    run: RunView,
    result: QueryResult,
    k: int,
    key: str,
    query_image: Image.Image | None = None,
    figures: Callable[[], tuple[go.Figure, go.Figure]] | None = None,
    plots_key: str | None = None,
) -> None:
    """Galleries (helps / hurts / similar), export buttons and the score plots.

    The plots sit in a section drawn only while it is open (``plots_key``, default
    ``KEY-plots``, keeps it open or closed across selections): drawing them is most of what
    the browser does on a selection (BENCHMARKS.md, `bench_scale`: 0.5 s closed, 1.7-2.0 s open).
    ``figures`` makes them (``plots.result_figures`` of the result by default; a page passes
    its cached ones)."""
    main, side = st.columns([4, 1], gap="medium")
    pos, neg = result.positive[:k], result.negative[:k]
    with main:
        clicks = [gallery(run, pos, "positive", f"{key}-pos", n_cols=6)]
        clicks.append(gallery(run, neg, "negative", f"{key}-neg", n_cols=6))
        shown = replace(result, positive=pos, negative=neg, similar=result.similar[:k])
        export_buttons(run, shown, key, query_image)
    with side:
        clicks.append(compact_list(run, result.similar[:k], "similar", f"{key}-sim"))
    section = st.expander(
        "Plots: the scores of all training pairs, influence vs. similarity, the map",
        icon=":material/scatter_plot:",
        key=plots_key or f"{key}-plots",
        on_change="rerun",
    )
    if section.open:
        with section:
            st.caption("Click a point to open that training pair.")
            left, right = st.columns([1, 2])
            histogram, maps = figures() if figures else plots.result_figures(run, result, k)
            with left:
                plot(histogram, f"{key}-hist", clickable=False)
            with right:
                clicks.append(plot(maps, f"{key}-maps"))
    opened = first(clicks)
    if opened is not None:
        train_detail(run, opened)


def first(values: Sequence[int | None]) -> int | None:
    """The first value that is not None (row 0 is a valid training row)."""
    return next((v for v in values if v is not None), None)


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"
