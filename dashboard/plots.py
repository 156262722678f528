"""The dashboard's figures (plotly): score distributions and maps of the training pairs.

Each function returns a figure; ``ui.plot`` draws one and reports a clicked training row.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.explore.results import Influencer, Points, QueryResult
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
    histogram: tuple[np.ndarray, np.ndarray], pos: list[Influencer], neg: list[Influencer]
) -> go.Figure:
    """Distribution of the target's scores over all training pairs, shown top-k marked: binned
    where the scores are (the run's summaries), the browser gets the bars, not the scores."""
    counts, edges = histogram
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


def _points(fig: go.Figure, col: int, x, y, at: np.ndarray, points: Points, ids, **kw) -> None:
    fig.add_trace(
        go.Scattergl(
            x=x[at],
            y=y[at],
            mode="markers",
            customdata=points.rows[at],  # the training row a click opens
            text=[ids[p] for p in at],
            hovertemplate="%{text}<br>x %{x:.3f}, y %{y:.4f}<extra></extra>",
            **kw,
        ),
        row=1,
        col=col,
    )


def influence_maps(
    points: Points,
    coords: np.ndarray,
    ids: list[str],
    pos: list[Influencer],
    neg: list[Influencer],
) -> go.Figure:
    """Two views of some training pairs, one figure (one WebGL canvas, so it redraws faster).

    Left: TRAK score against CLIP image similarity. Right: the 2-D PCA map of the training
    images coloured by the target's scores. Drawn: ``points`` (a fixed sample of the training
    set, so the figure does not grow with it, and the shown top-k, highlighted in both).

    Args:
        points: the drawn training pairs with their scores and similarity.
        coords: (len(points.rows), 2) their map coordinates; ids: their ids.
    """
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=["<b>Influence vs. similarity</b>", "<b>Map of training images (PCA)</b>"],
    )
    fig.update_annotations(font=dict(size=15, color="#31333f"))
    at = {int(r): p for p, r in enumerate(points.rows)}  # training row -> position
    shown_pos = np.array([at[c.index] for c in pos if c.index in at], dtype=int)
    shown_neg = np.array([at[c.index] for c in neg if c.index in at], dtype=int)
    shown = np.concatenate([shown_pos, shown_neg])
    rest = np.setdiff1d(np.arange(len(points.rows)), shown)
    x, y = points.similarity, points.scores
    _points(fig, 1, x, y, rest, points, ids, marker=dict(color=GREY, size=4), name="other")
    for idx, sign in ((shown_pos, "positive"), (shown_neg, "negative")):
        _points(
            fig,
            1,
            x,
            y,
            idx,
            points,
            ids,
            marker=dict(color=COLOUR[sign], size=9, line=dict(width=1, color="white")),
            name=f"shown: {TITLE[sign].lower()}",
        )
    scores = points.scores
    lim = float(np.abs(scores).max()) if len(scores) else 1.0
    order = np.argsort(np.abs(scores), kind="stable")  # strongest drawn last, on top
    _points(
        fig,
        2,
        coords[:, 0],
        coords[:, 1],
        order,
        points,
        ids,
        marker=dict(
            color=scores[order],
            colorscale=[[0, RED], [0.5, "#eeeeee"], [1, GREEN]],
            cmin=-(lim or 1.0),
            cmax=lim or 1.0,
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
        points,
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
    histogram = score_histogram(result.histogram, pos, neg)
    rows = result.points.rows
    ids = [str(run.train[int(i)]["id"]) for i in rows]
    maps = influence_maps(result.points, run.map_coordinates(rows), ids, pos, neg)
    return histogram, maps
