"""The run's counterfactual evaluation (``trakview eval``) on the dashboard: the LDS of TRAK and
the baselines, the removal experiment's summary, and one validation pair's removal result.

Results are read from ``RUN/eval/*.json`` on every rerun (small files), so an evaluation that
finishes while the dashboard is open shows up on the next click.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from dashboard.plots import BLUE, GREEN, GREY, RED
from engine.attribution.settings import estimator_label
from engine.evaluate.results import read_lds, read_removal
from engine.explore.trust import lds_trust
from engine.run.manifest import open_manifest

LABELS = {
    "trak": "TRAK (trakview)",
    "clip-image": "CLIP image similarity",
    "clip-text": "CLIP caption similarity",
    "clip-pair": "CLIP pair similarity",
    "grad-dot": "gradient dot product",
    "random": "random",
}
COLOURS = {"trak": GREEN, "random": GREY, "grad-dot": RED}


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _interval(ci: list[float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _figure(fig: go.Figure, title: str, height: int = 320) -> go.Figure:
    fig.update_layout(
        title=dict(text=f"<b>{title}</b>", font=dict(size=15, color="#31333f"), x=0.5),
        height=height,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def lds_figure(result: dict[str, Any]) -> go.Figure:
    """LDS of each method with its interval, best on top."""
    ranked = sorted(result["methods"].items(), key=lambda kv: kv[1]["lds"])
    fig = go.Figure()
    for name, m in ranked:
        fig.add_trace(
            go.Scatter(
                x=[m["lds"]],
                y=[_label(name)],
                mode="markers",
                marker=dict(size=11, color=COLOURS.get(name, BLUE)),
                error_x=dict(
                    type="data",
                    symmetric=False,
                    array=[m["ci"][1] - m["lds"]],
                    arrayminus=[m["lds"] - m["ci"][0]],
                ),
                name=_label(name),
                showlegend=False,
                hovertemplate=f"{_label(name)}: %{{x:.3f}} {_interval(m['ci'])}<extra></extra>",
            )
        )
    fig.add_vline(x=0, line=dict(color=GREY, dash="dot"))
    fig.update_xaxes(title_text="linear datamodeling score (Spearman)")
    return _figure(fig, "LDS with 95% intervals")


def removal_figure(summary: list[dict[str, Any]]) -> go.Figure:
    """Mean change of the targets' margins per removal rule and k, with 95% intervals."""
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in summary):
        rows = [r for r in summary if r["method"] == method]
        fig.add_trace(
            go.Bar(
                x=[f"k = {r['k']}" for r in rows],
                y=[r["mean_delta"] for r in rows],
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[r["ci"][1] - r["mean_delta"] for r in rows],
                    arrayminus=[r["mean_delta"] - r["ci"][0] for r in rows],
                ),
                marker_color=COLOURS.get(method, BLUE),
                name=f"without top-k by {_label(method)}"
                if method != "random"
                else "without k random",
            )
        )
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="change of the target's CLIP margin")
    return _figure(fig, "Retrained without k pairs: margin change")


def lds_meaning(result: dict[str, Any]) -> str:
    """What the LDS numbers say, in one sentence a reader can act on."""
    methods = result["methods"]
    trak = methods.get("trak")
    if trak is None:
        return ""
    trust = result.get("trust") or lds_trust(methods)
    said = f"**TRAK's LDS is {trak['lds']:+.3f} {_interval(trak['ci'])}.** "
    if trust["above_random"] is False:
        return said + (
            "Its interval overlaps the random baseline's: on retrained models these scores "
            "predict the model no better than chance. Treat the galleries as noise."
        )
    if trust["above_clip"] is False:
        return said + (
            "It beats random, but its interval is not above plain CLIP similarity's: the "
            "galleries add little to 'the most similar training pairs'."
        )
    return said + (
        "Its interval is above random's and every CLIP-similarity baseline's: removing the "
        "pairs TRAK ranks high changes the model as TRAK predicts, beyond what similarity tells."
    )


def lds_section(run: Path) -> None:
    """The LDS table and plot, or how to compute them."""
    result = read_lds(run)
    if result is None:
        st.info(
            f"No LDS evaluation yet: `trakview eval lds {run}` trains models on random halves of "
            "the training set and checks how well each method's scores predict their margins."
        )
        return
    s, c = result["settings"], result["counts"]
    estimator = estimator_label(open_manifest(run).config)
    st.markdown(f"This run's scores (`trak` below): estimator **{estimator}**.")
    st.caption(
        "Linear datamodeling score (TRAK paper): over models retrained on random subsets "
        f"({c['subsets']} subsets of {s['fraction']:.0%} of the pairs, {s['models_per_subset']} "
        "model(s) each, the run's trainer), the Spearman correlation between the sum of a "
        "method's scores over the subset and the model's actual CLIP margin, averaged over the "
        f"{c['n_val']} validation pairs. 1 = perfect, 0 = no better than chance."
    )
    st.markdown(lds_meaning(result))
    ranked = sorted(result["methods"].items(), key=lambda kv: -kv[1]["lds"])
    left, right = st.columns([3, 2])
    left.dataframe(
        {
            "method": [_label(n) for n, _ in ranked],
            "LDS": [f"{m['lds']:+.3f}" for _, m in ranked],
            "95% interval": [_interval(m["ci"]) for _, m in ranked],
            "TRAK minus method": [
                f"{m['reference_minus_this']['mean']:+.3f} "
                + _interval(m["reference_minus_this"]["ci"])
                if "reference_minus_this" in m
                else ""
                for _, m in ranked
            ],
        },
        hide_index=True,
        key="eval-lds-table",
    )
    with right:
        st.plotly_chart(lds_figure(result), key="eval-lds-plot", config={"displaylogo": False})


def removal_section(run: Path) -> None:
    """The removal experiment's summary table and plot, when there is one."""
    result = read_removal(run)
    if result is None:
        st.info(
            f"No removal experiment yet: `trakview eval remove {run} --targets 20` retrains "
            "without each target's top-k influencers (and, as controls, the top-k by CLIP "
            "similarity and k random pairs)."
        )
        return
    st.caption(
        f"{len(result['targets'])} validation pairs, each retrained without k training pairs "
        f"({result['models']} model(s) per removal, the seeds of the run's members); the change "
        "is against a model trained on every pair with the same seed. Negative = the pairs "
        "mattered for the match."
    )
    summary = result["summary"]
    left, right = st.columns([3, 2])
    left.dataframe(
        {
            "k": [r["k"] for r in summary],
            "removed": [_label(r["method"]) for r in summary],
            "mean change": [f"{r['mean_delta']:+.3f}" for r in summary],
            "95% interval": [_interval(r["ci"]) for r in summary],
            "margin dropped for": [f"{r['share_dropped']:.0%}" for r in summary],
            "targets": [r["targets"] for r in summary],
        },
        hide_index=True,
        key="eval-remove-table",
    )
    with right:
        st.plotly_chart(
            removal_figure(summary), key="eval-remove-plot", config={"displaylogo": False}
        )


def pair_check(run: Path, val_id: str, row: int) -> None:
    """A validation pair's removal result and LDS, when the run's evaluation has them."""
    removal = read_removal(run)
    entry = (removal or {}).get("targets", {}).get(val_id)
    lds = read_lds(run)
    per_target = ((lds or {}).get("methods", {}).get("trak") or {}).get("per_target")
    if entry is None and per_target is None:
        return
    with st.expander("Counterfactual check: retrained without its top influencers", expanded=True):
        if per_target is not None and row < len(per_target) and per_target[row] is not None:
            st.markdown(
                f"TRAK's LDS for this pair: **{per_target[row]:+.3f}** "
                f"(mean over the validation set {lds['methods']['trak']['lds']:+.3f})."
            )
        if entry is None:
            st.caption(
                f"No removal experiment for this pair: `trakview eval remove {run} --val {val_id}`"
            )
            return
        rows = [
            (int(k), method, res)
            for method, by_k in entry["removed"].items()
            for k, res in by_k.items()
        ]
        rows.sort(key=lambda r: (r[0], r[1] != "trak", r[1]))
        st.markdown(
            f"Margin of a model trained on every pair: **{entry['margin_full']:+.3f}**. "
            "Retrained without:"
        )
        st.dataframe(
            {
                "k": [k for k, _, _ in rows],
                "removed": [
                    "k random pairs" if m == "random" else f"top-k by {_label(m)}"
                    for _, m, _ in rows
                ],
                "margin": [f"{res['margin']:+.3f}" for _, _, res in rows],
                "change": [f"{res['delta']:+.3f}" for _, _, res in rows],
                "TRAK score of the removed": [
                    f"{res['trak_score_sum']:+.3f}" for _, _, res in rows
                ],
            },
            hide_index=True,
            key="eval-pair-table",
        )
