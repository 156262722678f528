"""The dashboard's figures (plotly): score distributions and maps of the training pairs.

Each function returns a figure; ``ui.plot`` draws one and reports a clicked training row.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.explore.results import Influencer, QueryResult
from engine.explore.view import RunView

GREEN, RED, BLUE, GREY = "#1a9850", "#d73027", "#4575b4", "#b0b0b0"
COLOUR = {"positive": GREEN, "negative": RED, "similar": BLUE}
TITLE = {
    "positive": "Helps most",
    "negative": "Hurts most",
    "similar": "Most similar images (CLIP)",
    "suspect": "Most suspect",
}


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(
        title=dict(
            text=f"<b>{title}</b>", font=dict(size=15, color="#31333f"), x=0.5, xanchor="center"
        ),
        xaxis_title=x,
        yaxis_title=y,
        height=360,
        margin=dict(l=10, r=10, t=40, b=10),
        showlegend=True,
        legend=dict(orientation="h", y=-0.22),
    )
    return fig


def score_histogram(
    scores: np.ndarray, pos: list[Influencer], neg: list[Influencer], bins: int = 80
) -> go.Figure:
    """Distribution of the target's scores over all training pairs, shown top-k marked. The
    counts are binned here: the browser gets ``bins`` bars, not every training pair's score."""
    counts, edges = np.histogram(scores, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(
        go.Bar(
            x=centres,
            y=counts,
            width=edges[1] - edges[0],
            marker_color=GREY,
            name="all training",
            hovertemplate="%{x:.4f}: %{y} pairs<extra></extra>",
        )
    )
    for cards, sign in ((pos, "positive"), (neg, "negative")):
        fig.add_trace(
            go.Scatter(
                x=[c.score for c in cards],
                y=[0.6] * len(cards),
                mode="markers",
                marker=dict(symbol="triangle-up", size=11, color=COLOUR[sign]),
                name=f"shown: {TITLE[sign].lower()}",
                text=[c.id for c in cards],
                hovertemplate="%{text}: %{x:.4f}<extra></extra>",
            )
        )
    fig.update_yaxes(type="log", dtick=1)
    return _layout(fig, "Scores of all training pairs", "TRAK score", "pairs (log)")


def _points(fig: go.Figure, col: int, x: np.ndarray, y: np.ndarray, idx, ids, **kw) -> None:
    fig.add_trace(
        go.Scattergl(
            x=x[idx],
            y=y[idx],
            mode="markers",
            customdata=idx,
            text=[ids[i] for i in idx],
            hovertemplate="%{text}<br>x %{x:.3f}, y %{y:.4f}<extra></extra>",
            **kw,
        ),
        row=1,
        col=col,
    )


def influence_maps(
    scores: np.ndarray,
    similarity: np.ndarray,
    coords: np.ndarray,
    ids: list[str],
    pos: list[Influencer],
    neg: list[Influencer],
    sample: np.ndarray,
) -> go.Figure:
    """Two views of the training pairs, one figure (one WebGL canvas, so it redraws faster).

    Left: TRAK score against CLIP image similarity. Right: the 2-D PCA map of the training
    images coloured by the target's scores. Drawn: the rows ``sample`` (a fixed-size sample of
    the training set, so the figure's size does not grow with it) and the shown top-k,
    highlighted in both.
    """
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=["<b>Influence vs. similarity</b>", "<b>Map of training images (PCA)</b>"],
    )
    fig.update_annotations(font=dict(size=15, color="#31333f"))
    shown_pos = np.array([c.index for c in pos], dtype=int)
    shown_neg = np.array([c.index for c in neg], dtype=int)
    shown = np.concatenate([shown_pos, shown_neg])
    rest = np.setdiff1d(sample, shown)
    _points(fig, 1, similarity, scores, rest, ids, marker=dict(color=GREY, size=4), name="other")
    for idx, sign in ((shown_pos, "positive"), (shown_neg, "negative")):
        _points(
            fig,
            1,
            similarity,
            scores,
            idx,
            ids,
            marker=dict(color=COLOUR[sign], size=9, line=dict(width=1, color="white")),
            name=f"shown: {TITLE[sign].lower()}",
        )
    lim = float(np.abs(scores).max()) or 1.0
    drawn = np.union1d(rest, shown)
    order = drawn[np.argsort(np.abs(scores[drawn]), kind="stable")]  # strongest on top
    _points(
        fig,
        2,
        coords[:, 0],
        coords[:, 1],
        order,
        ids,
        marker=dict(
            color=scores[order],
            colorscale=[[0, RED], [0.5, "#eeeeee"], [1, GREEN]],
            cmin=-lim,
            cmax=lim,
            size=6,
            colorbar=dict(title="score", thickness=10),
        ),
        name="training images (colour: score)",
    )
    _points(
        fig,
        2,
        coords[:, 0],
        coords[:, 1],
        shown,
        ids,
        marker=dict(size=11, color="rgba(0,0,0,0)", line=dict(width=1.5, color="black")),
        name="shown in galleries",
    )
    fig.update_xaxes(title_text="CLIP image similarity", row=1, col=1)
    fig.update_yaxes(title_text="TRAK score", row=1, col=1)
    fig.update_xaxes(title_text="PC 1", showticklabels=False, row=1, col=2)
    fig.update_yaxes(title_text="PC 2", showticklabels=False, row=1, col=2)
    fig.update_layout(
        height=360,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", y=-0.22),
    )
    return fig


def result_figures(run: RunView, result: QueryResult, k: int) -> tuple[go.Figure, go.Figure]:
    """The two figures of a result with its top ``k`` shown: scores, and the maps."""
    pos, neg = result.positive[:k], result.negative[:k]
    histogram = score_histogram(result.scores, pos, neg)
    maps = influence_maps(
        result.scores, result.train_similarity, run.pca, run.train_ids, pos, neg, run.map_sample
    )
    return histogram, maps
