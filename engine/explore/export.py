"""Exports of a query's influencer gallery: zip, self-contained html, png contact sheet, csv, json.

``gallery_bytes`` renders a ``QueryResult`` in memory; ``export`` writes those bytes atomically to
one file, so a failure (unknown format, missing image) leaves nothing behind. Only the positive
and negative galleries are exported (the TRAK influencers, TRAK paper section 2); every image is
re-encoded as PNG so all formats refer to the same pixels.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import zipfile
from enum import Enum
from pathlib import Path
from typing import Any

from PIL import Image

from engine import __version__, files
from engine.data.images import TAR_SEPARATOR, open_image, open_query_image
from engine.errors import ExportError, ImageProblem
from engine.explore.results import Influencer, QueryResult
from engine.explore.sheet import SIGNS, TITLES, contact_sheet


class ExportFormat(str, Enum):
    """The formats ``gallery_bytes`` and ``export`` write."""

    ZIP = "zip"
    HTML = "html"
    PNG = "png"
    CSV = "csv"
    JSON = "json"


FORMATS = tuple(f.value for f in ExportFormat)
COLUMNS = ("rank", "sign", "train_id", "train_index", "caption", "image", "score")

# Largest side of the images embedded in the html file; the zip keeps full resolution.
HTML_MAX_SIDE = 512
# Below this side an image is shown with `image-rendering: pixelated` (upscaled in the page).
PIXELATED_BELOW = 160

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: the same result gives the same bytes


def safe_name(text: str, limit: int = 60) -> str:
    """A file-name stem from user data: letters, digits, ``_`` and ``-`` only (no dots, no
    separators, no control characters), at most ``limit`` characters, never empty."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit]
    return stem or "item"


def rows(result: QueryResult) -> list[dict[str, Any]]:
    """One row per exported influencer (positives by rank, then negatives), columns ``COLUMNS``."""
    return [
        {
            "rank": card.rank,
            "sign": sign,
            "train_id": card.id,
            "train_index": card.index,
            "caption": card.caption,
            "image": card.image,
            "score": card.score,
        }
        for sign, card in _cards(result)
    ]


def gallery_bytes(
    run: Path,
    result: QueryResult,
    fmt: str,
    query_image: Image.Image | None = None,
) -> bytes:
    """Renders a query's influencer gallery as one file, in memory.

    Args:
        run: the run directory the result comes from (influencer images are relative to it).
        result: a validation pair's (``QueryEngine.for_val``) or a new query's result.
        fmt: one of ``FORMATS``: ``zip`` (query.png, positive/ and negative/ PNGs,
            influencers.csv, index.html, query.json), ``html`` (one self-contained page, images
            as data URIs), ``png`` (a contact sheet, see ``sheet_size``), ``csv`` or ``json``
            (the ``rows``; json adds the query's summary as ``{"query": ..., "influencers":
            [...]}``).
        query_image: the query's image; needed for a new query's zip, html or png, else the
            validation pair's image ``run / result.image`` is used.

    Raises:
        ExportError: an unknown format, a missing influencer image, or no query image.
    """
    run = Path(run)
    kind = parse_format(fmt)
    if kind is ExportFormat.CSV:
        return _csv(result).encode("utf-8")
    if kind is ExportFormat.JSON:
        doc = {"query": _summary(run, result), "influencers": rows(result)}
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    query, cards = _images(run, result, query_image)
    if kind is ExportFormat.PNG:
        return _png_bytes(contact_sheet(result, query, cards))
    if kind is ExportFormat.HTML:
        page = _html(result, run, (query, _data_uri(query)), [(*c, _data_uri(c[2])) for c in cards])
        return page.encode("utf-8")
    return _zip(run, result, query, cards)


def export(
    run: Path,
    result: QueryResult,
    fmt: str,
    out: Path,
    query_image: Image.Image | None = None,
) -> Path:
    """Writes ``gallery_bytes(run, result, fmt, query_image)`` atomically to the file ``out``.

    The file is rendered completely before anything touches the disk; ``out``'s folder is created
    if needed and nothing else is written.

    Returns:
        ``out``.

    Raises:
        ExportError: as ``gallery_bytes``, or ``out`` is an existing folder.
    """
    out = Path(out)
    if out.is_dir():
        raise ExportError(
            f"--out {out} is a folder; expected a file path such as {out / ('gallery.' + fmt)}"
        )
    payload = gallery_bytes(run, result, fmt, query_image)
    files.write_bytes(out, payload)
    return out


# --- inputs ------------------------------------------------------------------------------------


def parse_format(fmt: str) -> ExportFormat:
    """``fmt`` as an ``ExportFormat``, or an ``ExportError`` listing the formats."""
    try:
        return ExportFormat(fmt)
    except ValueError:
        raise ExportError(
            f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}"
        ) from None


def _cards(result: QueryResult) -> list[tuple[str, Influencer]]:
    # The sign is the gallery a card sits in, never the card's own (user-settable) field.
    return [(sign, card) for sign in SIGNS for card in getattr(result, sign)]


def _images(
    run: Path, result: QueryResult, query_image: Image.Image | None
) -> tuple[Image.Image, list[tuple[str, Influencer, Image.Image]]]:
    """The query's image and every influencer's, all checked before anything is rendered."""
    if query_image is None:
        if result.image is None:
            raise ExportError(
                "this result is a new query, so its image is not in the run; pass the query "
                "image (query_image=..., or --image on the command line)"
            )
        query_image = _open(
            run / result.image, f"the query image of validation pair {result.val_id!r}"
        )
    cards = []
    for sign, card in _cards(result):
        what = f"the image of {sign} influencer #{card.rank} (train id {card.id!r})"
        cards.append((sign, card, _open(run / card.image, what)))
    return query_image.convert("RGB"), cards


def _open(path: Path, what: str) -> Image.Image:
    if TAR_SEPARATOR in str(path):  # an image inside a WebDataset shard
        try:
            return open_image(path)
        except ImageProblem as err:
            raise ExportError(f"{what} cannot be read from its shard: {err}") from err
    if not path.is_file():
        raise ExportError(
            f"{what} is missing: expected a file at {path} (paths in train.jsonl/val.jsonl are "
            "relative to the run directory); restore the image or rebuild the run"
        )
    return open_query_image(path)


def _summary(run: Path, result: QueryResult) -> dict[str, Any]:
    return {
        "caption": result.caption,
        "val_id": result.val_id,
        "image": result.image,
        "clip_similarity": result.clip_similarity,
        "margin": result.margin,
        "notes": list(result.notes),
        "k": max(len(result.positive), len(result.negative)),
        "run": str(run.resolve()),
        "trust": result.trust,
        "trakview_version": __version__,
    }


# --- csv / zip ---------------------------------------------------------------------------------


def _csv(result: QueryResult) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows(result):
        writer.writerow({**row, "score": repr(row["score"])})
    return buffer.getvalue()


def _member_names(cards: list[tuple[str, Influencer, Image.Image]]) -> list[str]:
    width = max(2, len(str(max((c.rank for _, c, _ in cards), default=1))))
    names, seen = [], set()
    for sign, card, _ in cards:
        name = f"{sign}/{card.rank:0{width}d}_{safe_name(card.id)}.png"
        n = 2
        while name in seen:  # equal ranks in a hand-made result
            name = f"{sign}/{card.rank:0{width}d}_{safe_name(card.id)}_{n}.png"
            n += 1
        seen.add(name)
        names.append(name)
    return names


def _zip(
    run: Path,
    result: QueryResult,
    query: Image.Image,
    cards: list[tuple[str, Influencer, Image.Image]],
) -> bytes:
    names = _member_names(cards)
    page = _html(
        result, run, (query, "query.png"), [(*c, n) for c, n in zip(cards, names, strict=True)]
    )
    members: list[tuple[str, bytes]] = [
        ("query.png", _png_bytes(query)),
        *((name, _png_bytes(img)) for (_, _, img), name in zip(cards, names, strict=True)),
        ("influencers.csv", _csv(result).encode("utf-8")),
        ("index.html", page.encode("utf-8")),
        ("query.json", (json.dumps(_summary(run, result), indent=2) + "\n").encode("utf-8")),
    ]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            archive.writestr(info, payload, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- html --------------------------------------------------------------------------------------


def _data_uri(image: Image.Image) -> str:
    if max(image.size) > HTML_MAX_SIDE:
        image = image.copy()
        image.thumbnail((HTML_MAX_SIDE, HTML_MAX_SIDE), Image.Resampling.LANCZOS)
    return "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode("ascii")


_CSS = """
:root{--pos:#1a7f37;--neg:#cf222e;--ink:#1f2328;--muted:#656d76;--line:#d0d7de;--bg:#f6f8fa}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  color:var(--ink);background:#fff}
main{max-width:1240px;margin:0 auto;padding:28px 32px 48px}
header{display:flex;gap:28px;align-items:center;padding:20px;background:var(--bg);
  border:1px solid var(--line);border-radius:14px}
header img{width:220px;height:220px;flex:none;object-fit:contain;background:#fff;
  border:1px solid var(--line);border-radius:10px}
.pixelated{image-rendering:pixelated}
.kicker{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.06em}
h1{font-size:26px;line-height:1.25;margin:4px 0 14px}
.stats{display:flex;gap:32px}
.stat b{display:block;font-size:22px;font-variant-numeric:tabular-nums}
.stat span{color:var(--muted);font-size:12px}
.notes{margin:12px 0 0;padding-left:18px;color:var(--muted);font-size:13px}
h2{margin:34px 0 12px;font-size:19px;padding-left:10px;border-left:5px solid}
h2.positive{border-color:var(--pos)}h2.negative{border-color:var(--neg)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:14px}
.card{position:relative;border:1px solid var(--line);border-radius:10px;overflow:hidden;
  background:#fff}
.card img{display:block;width:100%;aspect-ratio:1;object-fit:contain;background:var(--bg)}
.rank{position:absolute;top:8px;left:8px;padding:2px 8px;border-radius:10px;font-size:12px;
  font-weight:600;color:#fff;background:rgba(0,0,0,.72)}
.body{padding:8px 10px 10px}
.score{font-weight:700;font-variant-numeric:tabular-nums}
.positive .score{color:var(--pos)}.negative .score{color:var(--neg)}
.id{float:right;color:var(--muted);font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.caption{margin-top:4px;font-size:13px}
footer{margin-top:36px;color:var(--muted);font-size:12px}
"""


def _img_tag(src: str, image: Image.Image, alt: str) -> str:
    pixelated = ' class="pixelated"' if max(image.size) < PIXELATED_BELOW else ""
    return f'<img src="{html.escape(src)}"{pixelated} alt="{html.escape(alt)}">'


def _html(
    result: QueryResult,
    run: Path,
    query: tuple[Image.Image, str],
    cards: list[tuple[str, Influencer, Image.Image, str]],
) -> str:
    """The gallery page; every image comes with its URL (a data URI, or a path in the zip)."""
    esc = html.escape
    kicker = f"validation pair {result.val_id}" if result.val_id is not None else "new query"
    notes = "".join(f"<li>{esc(n)}</li>" for n in result.notes)
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>trakview: {esc(result.caption)}</title><style>{_CSS}</style></head>",
        "<body><main><header>",
        _img_tag(query[1], query[0], "query image"),
        f'<div><div class="kicker">{esc(kicker)}</div><h1>{esc(result.caption)}</h1>',
        '<div class="stats">',
        f'<div class="stat"><b>{result.clip_similarity:.3f}</b><span>CLIP similarity</span></div>',
        f'<div class="stat"><b>{result.margin:.3f}</b><span>CLIP margin</span></div>',
        "</div>",
        f'<ul class="notes">{notes}</ul>' if notes else "",
        "</div></header>",
    ]
    for sign in SIGNS:
        parts.append(f'<h2 class="{sign}">{esc(TITLES[sign])}</h2><div class="grid {sign}">')
        for card_sign, card, image, src in cards:
            if card_sign != sign:
                continue
            parts.append(
                f'<div class="card"><span class="rank">#{card.rank}</span>'
                f"{_img_tag(src, image, card.caption)}"
                f'<div class="body"><span class="score">{card.score:+.4g}</span>'
                f'<span class="id">{esc(card.id)}</span>'
                f'<div class="caption">{esc(card.caption)}</div></div></div>'
            )
        parts.append("</div>")
    parts.append(
        f"<footer>trakview {esc(__version__)} · run {esc(run.resolve().name)} · TRAK scores: how "
        "much each training pair raises (positive) or lowers (negative) the CLIP margin of this "
        "pair (Park et al., 2023)</footer></main></body></html>\n"
    )
    return "\n".join(p for p in parts if p)
