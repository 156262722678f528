"""What a comparison of two runs reports (``engine.evaluate.compare``): per group of validation
pairs the change of margins, caption ranks and retrieval hits; TRAK's prediction held against the
actual change (correlations, sign agreement and explained share, with bootstrap intervals over
the validation pairs); all of it as plain JSON, and as one self-contained HTML page (inline
images and an SVG scatter: no network, no script).
"""

from __future__ import annotations

import html
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from engine import __version__
from engine.errors import ImageProblem
from engine.evaluate import stats
from engine.evaluate.compare import HITS, CompareConfig, Comparison, describe
from engine.explore.view import thumbnail_tag

FORMAT = 1  # version of the comparison's JSON
BOOT_CHUNK = 100  # bootstrap resamples computed at a time (memory: chunk x pairs)
SCATTER_POINTS = 3000  # drawn in the HTML page's scatter at most (a fixed sample past it)


def summary(c: Comparison, at: np.ndarray) -> dict[str, Any]:
    """Means over the matched pairs at positions ``at``; the margin change with its interval
    (bootstrap over the pairs)."""
    at = np.asarray(at, dtype=np.int64)
    if at.size == 0:
        return {"n": 0}
    cfg, d = c.cfg, c.delta[at]
    ra, rb = c.rank_a[at], c.rank_b[at]
    out: dict[str, Any] = {
        "n": int(at.size),
        "margin_a": float(c.margin_a[at].mean()),
        "margin_b": float(c.margin_b[at].mean()),
        "margin_change": {
            "mean": float(d.mean()),
            "ci": stats.mean_ci(d, cfg.bootstrap, cfg.seed, cfg.level),
        },
        "improved": float((d > 0).mean()),
        "regressed": float((d < 0).mean()),
        "caption_rank": {
            "median_a": float(np.median(ra)),
            "median_b": float(np.median(rb)),
            "better": float((rb < ra).mean()),
            "worse": float((rb > ra).mean()),
        },
        "retrieval": {
            name: {"a": float(c.hits_a[name][at].mean()), "b": float(c.hits_b[name][at].mean())}
            for name in HITS
        },
        "predicted_change": None if c.predicted is None else float(c.predicted[at].mean()),
        "fixed_change": None if c.fixed_delta is None else float(c.fixed_delta[at].mean()),
    }
    return out


def pair(c: Comparison, at: int) -> dict[str, Any]:
    """One matched pair's numbers."""
    rec = c.a.val[int(c.rows_a[at])]
    return {
        "id": str(rec["id"]),
        "caption": rec["caption"],
        "margin_a": float(c.margin_a[at]),
        "margin_b": float(c.margin_b[at]),
        "change": float(c.delta[at]),
        "fixed_change": None if c.fixed_delta is None else float(c.fixed_delta[at]),
        "rank_a": int(c.rank_a[at]),
        "rank_b": int(c.rank_b[at]),
        "predicted": None if c.predicted is None else float(c.predicted[at]),
    }


def prediction(c: Comparison) -> dict[str, Any] | None:
    """TRAK's predicted change against the actual one (and at a fixed contrast batch)."""
    if c.predicted is None:
        return None
    out = {"actual": agreement(c.predicted, c.delta, c.cfg)}
    if c.fixed_delta is not None:
        out["fixed"] = agreement(c.predicted, c.fixed_delta, c.cfg)
    return out


def to_json(c: Comparison) -> dict[str, Any]:
    """Plain JSON: the runs, what was matched, the summaries, the prediction's check, the pairs
    that improved and regressed most, and every matched pair (``pairs``, in A's order)."""
    up, down = c.ranked(c.cfg.k)
    basket = None if c.basket is None else {k: v for k, v in c.basket.items() if k != "rows"}
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": {"a": describe(c.a), "b": describe(c.b)},
        "settings": asdict(c.cfg),
        "val": c.val,
        "train": c.train,
        "basket": basket,
        "metrics": {"margin": "CLIP margin, each run's own (mean over its checkpoints)"} | HITS,
        "overall": summary(c, np.arange(c.delta.size)),
        "groups": {name: summary(c, at) for name, at in c.groups.items()},
        "prediction": prediction(c),
        "improved": [pair(c, int(p)) for p in up],
        "regressed": [pair(c, int(p)) for p in down],
        "notes": c.notes,
        "pairs": [pair(c, p) for p in range(c.delta.size)],
    }


# --- predicted against actual ---------------------------------------------------------------


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x @ x) * (y @ y)))
    return float(x @ y) / den if den > 0 else float("nan")


def explained(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """How much of the actual change's variance the prediction explains: R^2 of the
    least-squares line (Pearson r squared), of the best-scaled prediction c * predicted (c fitted
    through the origin, reported) and of the prediction as it is (below 0: worse than the mean)."""
    p, y = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    total = float(((y - y.mean()) ** 2).sum())
    scale = float(p @ y / (p @ p)) if p @ p > 0 else 0.0
    r = pearson(p, y)

    def r2(fit: np.ndarray) -> float:
        return 1.0 - float(((y - fit) ** 2).sum()) / total if total > 0 else float("nan")

    return {"fit": r * r, "scaled": r2(scale * p), "scale": scale, "as_predicted": r2(p)}


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(r,) Pearson correlation of each row of x with the same row of y, both (r, n)."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (x * y).sum(axis=1) / den, np.nan)


def _agree(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Share of pairs whose predicted and actual changes have one sign (along the last axis)."""
    return (np.sign(p) == np.sign(y)).mean(axis=-1)


def agreement(predicted: np.ndarray, actual: np.ndarray, cfg: CompareConfig) -> dict[str, Any]:
    """Pearson and Spearman correlations and the sign agreement of predicted and actual changes
    over validation pairs, each with a bootstrap interval over the pairs (the same resamples for
    the three); the agreement independent signs would have (``chance``); ``explained``; means."""
    p, y = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    n = p.size
    rng = np.random.default_rng([cfg.seed, 23])
    reps: dict[str, list[np.ndarray]] = {"pearson": [], "spearman": [], "sign": []}
    for start in range(0, cfg.bootstrap, BOOT_CHUNK):
        idx = rng.integers(0, n, (min(BOOT_CHUNK, cfg.bootstrap - start), n))  # (r, n)
        reps["pearson"].append(_pearson_rows(p[idx], y[idx]))
        reps["spearman"].append(stats.spearman_columns(p[idx].T, y[idx].T))
        reps["sign"].append(_agree(p[idx], y[idx]))
    point = {
        "pearson": pearson(p, y),
        "spearman": float(stats.spearman_columns(p[:, None], y[:, None])[0]),
        "sign": float(_agree(p, y)),
    }
    tails = [(1 - cfg.level) / 2, 1 - (1 - cfg.level) / 2]
    out: dict[str, Any] = {"n": int(n)}
    for name, value in point.items():
        drawn = np.concatenate(reps[name]) if reps[name] else np.zeros(0)
        drawn = drawn[~np.isnan(drawn)]
        ci = [float(v) for v in np.quantile(drawn, tails)] if drawn.size else [value, value]
        out[name] = {"value": value, "ci": ci}
    out["sign"]["chance"] = float(
        sum((np.sign(p) == s).mean() * (np.sign(y) == s).mean() for s in (-1, 0, 1))
    )
    out["explained"] = explained(p, y)
    out["mean_predicted"] = float(p.mean())
    out["mean_actual"] = float(y.mean())
    return out


# --- the HTML page ----------------------------------------------------------------------------


def thumbnails(c: Comparison, ids: list[str]) -> dict[str, str]:
    """Inline ``<img>`` tags of some validation pairs' images (run A's), skipping unreadable."""
    out = {}
    for val_id in ids:
        rec = c.a.val[c.a.val_position(val_id)]
        try:
            out[val_id] = thumbnail_tag(c.a.image_ref(rec["image"]))
        except (ImageProblem, OSError):
            continue
    return out


def _num(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _ci(value: dict[str, Any], digits: int = 3, key: str = "mean") -> str:
    lo, hi = value["ci"]
    return f"{value[key]:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary table (overall, then each group) as header and cells (HTML-escaped)."""
    header = ["pairs", "n", "margin A → B", "change [95%]", "improved", "regressed"]
    header += ["median caption rank A → B", "i→t R@1 A → B", "t→i R@1 A → B", "TRAK predicted"]
    rows = []
    for name, s in {"all matched pairs": doc["overall"], **doc["groups"]}.items():
        if not s["n"]:
            rows.append([html.escape(name), "0"] + ["-"] * (len(header) - 2))
            continue
        r, rank = s["retrieval"], s["caption_rank"]
        rows.append(
            [
                html.escape(name),
                str(s["n"]),
                f"{s['margin_a']:.3f} → {s['margin_b']:.3f}",
                _ci(s["margin_change"]),
                f"{s['improved']:.0%}",
                f"{s['regressed']:.0%}",
                f"{rank['median_a']:g} → {rank['median_b']:g}",
                f"{r['i2t_r1']['a']:.2f} → {r['i2t_r1']['b']:.2f}",
                f"{r['t2i_r1']['a']:.2f} → {r['t2i_r1']['b']:.2f}",
                _num(s["predicted_change"], sign=True),
            ]
        )
    return header, rows


def scatter_svg(predicted: list[float], actual: list[float], scale: float) -> str:
    """Predicted (x) against actual (y) change per validation pair: points, y = x (dashed) and
    the best-scaled prediction y = scale * x (solid), as an inline SVG."""
    x, y = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    if x.size > SCATTER_POINTS:
        keep = np.sort(np.random.default_rng(0).choice(x.size, SCATTER_POINTS, replace=False))
        x, y = x[keep], y[keep]
    w, h, pad = 560, 420, 48
    lo = float(min(x.min(), y.min(), 0.0))
    hi = float(max(x.max(), y.max(), 0.0))
    span = (hi - lo) or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span

    def px(v: float) -> float:
        return pad + (v - lo) / (hi - lo) * (w - 2 * pad)

    def py(v: float) -> float:
        return h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" font-size="12" font-family="sans-serif">',
        f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="#fafbfc" '
        'stroke="#d0d7de"/>',
        f'<line x1="{px(0):.1f}" y1="{pad}" x2="{px(0):.1f}" y2="{h - pad}" stroke="#bbb"/>',
        f'<line x1="{pad}" y1="{py(0):.1f}" x2="{w - pad}" y2="{py(0):.1f}" stroke="#bbb"/>',
        f'<line x1="{px(lo):.1f}" y1="{py(lo):.1f}" x2="{px(hi):.1f}" y2="{py(hi):.1f}" '
        'stroke="#888" stroke-dasharray="4 4"/>',
    ]
    a, b = lo, hi  # the line y = scale * x inside the box (lo < 0 < hi)
    if scale > 0:
        a, b = max(lo, lo / scale), min(hi, hi / scale)
    elif scale < 0:
        a, b = max(lo, hi / scale), min(hi, lo / scale)
    parts.append(
        f'<line x1="{px(a):.1f}" y1="{py(scale * a):.1f}" x2="{px(b):.1f}" '
        f'y2="{py(scale * b):.1f}" stroke="#4575b4" stroke-width="1.5"/>'
    )
    parts += [
        f'<circle cx="{px(u):.1f}" cy="{py(v):.1f}" r="2.6" fill="#4575b4" fill-opacity="0.55"/>'
        for u, v in zip(x.tolist(), y.tolist(), strict=True)
    ]
    for v in (lo, 0.0, hi):
        parts.append(
            f'<text x="{px(v):.1f}" y="{h - pad + 16}" text-anchor="middle">{v:+.2f}</text>'
        )
        parts.append(f'<text x="{pad - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:+.2f}</text>')
    parts.append(
        f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">TRAK predicted margin change</text>'
        f'<text x="14" y="{h / 2}" text-anchor="middle" transform="rotate(-90 14 {h / 2})">'
        "actual margin change (B − A)</text></svg>"
    )
    return "".join(parts)


_CSS = """
body{margin:0;font:14px/1.45 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  color:#1f2328}
main{max-width:1240px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:24px;margin:0 0 6px}h2{font-size:18px;margin:30px 0 10px}
.muted{color:#656d76}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #d0d7de;padding:5px 10px;text-align:left;vertical-align:middle;
  white-space:nowrap}
.cap{white-space:normal}
th{background:#f6f8fa;font-weight:600}
.tv-img{width:56px;height:56px;object-fit:contain;background:#f3f4f6;border-radius:4px}
.tv-img.px{image-rendering:pixelated}
.up{color:#1a7f37;font-weight:600}.down{color:#cf222e;font-weight:600}
"""


def html_report(doc: dict[str, Any], images: dict[str, str] | None = None) -> str:
    """The comparison ``doc`` (``to_json``) as one self-contained HTML page; ``images``: the
    inline ``<img>`` tags of listed pairs, by id (``thumbnails``)."""
    esc, images = html.escape, images or {}
    runs, val, train = doc["runs"], doc["val"], doc["train"]
    basket = doc["basket"]
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>trakview compare</title><style>{_CSS}</style></head><body><main>",
        "<h1>Did the fix work? Two runs compared</h1>",
        f'<div class="muted">A: {esc(runs["a"]["run"])} ({runs["a"]["n_train"]} training pairs, '
        f"{runs['a']['checkpoints']} checkpoints)<br>B: {esc(runs['b']['run'])} "
        f"({runs['b']['n_train']} training pairs, {runs['b']['checkpoints']} checkpoints)</div>",
        f"<p>{val['matched']} validation pairs matched by id ({val['only_a']} only in A, "
        f"{val['only_b']} only in B); {train['removed']} of A's training pairs are not in B's, "
        f"{train['added']} of B's not in A's."
        + (
            f" Prediction: removing <b>{esc(basket['name'])}</b> ({basket['pairs']} pairs)."
            if basket
            else ""
        )
        + "</p>",
    ]
    if doc["notes"]:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in doc["notes"]) + "</ul>")
    parts.append("<h2>Margins, caption ranks and retrieval, per group</h2>")
    parts.append(_table(*summary_rows(doc)))
    check = doc["prediction"]
    if check:
        rows = []
        for name, label in (("actual", "own margins"), ("fixed", "fixed contrast batch")):
            if name not in check:
                continue
            a, e = check[name], check[name]["explained"]
            rows.append(
                [
                    label,
                    _ci(a["pearson"], key="value"),
                    _ci(a["spearman"], key="value"),
                    f"{_ci(a['sign'], 2, 'value')} (chance {a['sign']['chance']:.2f})",
                    f"{e['fit']:.3f}",
                    f"{e['scaled']:.3f} (x{e['scale']:.2f})",
                    f"{e['as_predicted']:.3f}",
                    f"{a['mean_predicted']:+.4f} / {a['mean_actual']:+.4f}",
                ]
            )
        header = ["actual change", "Pearson r", "Spearman ρ", "sign agreement", "R² (fit)"]
        header += ["R² (scaled)", "R² (as predicted)", "mean predicted / actual"]
        parts += ["<h2>TRAK's prediction against what retraining did</h2>", _table(header, rows)]
        pairs = doc["pairs"]
        parts.append(
            scatter_svg(
                [p["predicted"] for p in pairs],
                [p["change"] for p in pairs],
                check["actual"]["explained"]["scale"],
            )
        )
    for title, key in (("Improved most", "improved"), ("Regressed most", "regressed")):
        rows = [
            [
                images.get(p["id"], ""),
                esc(p["id"]),
                f'<span class="cap">{esc(p["caption"])}</span>',
                f"{p['margin_a']:.3f} → {p['margin_b']:.3f}",
                f'<span class="{"up" if p["change"] > 0 else "down"}">{p["change"]:+.3f}</span>',
                f"{p['rank_a']} → {p['rank_b']}",
                _num(p["predicted"], sign=True),
            ]
            for p in doc[key]
        ]
        header = ["", "id", "caption", "margin A → B", "change", "caption rank", "predicted"]
        parts += [f"<h2>{title}</h2>", _table(header, rows) if rows else "<p>none</p>"]
    parts.append(
        f'<p class="muted">trakview {esc(__version__)}, {esc(doc["created"])}. Margins are each '
        "run's own (mean over its checkpoints, over its own contrast batches); TRAK's prediction "
        "is minus the removed pairs' scores in run A, summed (Park et al., 2023).</p>"
    )
    return "\n".join(parts + ["</main></body></html>\n"])
