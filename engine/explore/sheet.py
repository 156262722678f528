"""The png contact sheet of an influencer gallery: the query, the positives, the negatives."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from engine.explore.results import Influencer, QueryResult

SIGNS = ("positive", "negative")
# Contact-sheet layout in pixels (see ``sheet_size``).
MARGIN = 16  # around the sheet
GAP = 12  # between cells of a row
ROW_GAP = 12  # between rows
TITLE_H = 28  # row title strip above each row
CELL_W = 192
THUMB = 128  # thumbnails fit in THUMB x THUMB (small images upscaled, nearest neighbour)
CELL_PAD = 8  # inside a cell, around the thumbnail and the text
LINE_H = 18
CAPTION_LINES = 4  # caption lines beneath the rank/id and score lines; longer ones end in "..."
CELL_H = CELL_PAD + THUMB + 6 + LINE_H * (2 + CAPTION_LINES) + CELL_PAD  # 258
_INK, _MUTED, _LINE = (31, 35, 40), (101, 109, 118), (208, 215, 222)
_SIGN_RGB = {"positive": (26, 127, 55), "negative": (207, 34, 46)}
TITLES = {
    "positive": "Helps the match most (positive TRAK score)",
    "negative": "Hurts the match most (negative TRAK score)",
}


def sheet_size(k: int) -> tuple[int, int]:
    """Size of the png contact sheet for ``k`` influencers per sign.

    Three rows (the query, then the positives, then the negatives), each a title strip of
    ``TITLE_H`` above cells of ``CELL_W`` x ``CELL_H``; ``k`` columns (at least one)::

        width  = 2 * MARGIN + k * CELL_W + (k - 1) * GAP  = 20 + 204 * k
        height = 2 * MARGIN + 3 * (TITLE_H + CELL_H) + 2 * ROW_GAP  = 914

    The cell in row ``r``, column ``c`` starts at ``x = MARGIN + c * (CELL_W + GAP)``,
    ``y = MARGIN + r * (TITLE_H + CELL_H + ROW_GAP) + TITLE_H``; its thumbnail is centred in
    the THUMB x THUMB box at ``(x + (CELL_W - THUMB) // 2, y + CELL_PAD)``.
    """
    cols = max(1, k)
    width = 2 * MARGIN + cols * CELL_W + (cols - 1) * GAP
    height = 2 * MARGIN + 3 * (TITLE_H + CELL_H) + 2 * ROW_GAP
    return width, height


# --- png contact sheet -------------------------------------------------------------------------


def printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _fit(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _wrap(
    text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int
) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in printable(text).split():
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width or not line:
            line = candidate
            continue
        lines.append(line)
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + " ...", font, width)
    return [_fit(line, font, width) for line in lines]


def _thumbnail(image: Image.Image) -> Image.Image:
    scale = THUMB / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def contact_sheet(
    result: QueryResult,
    query: Image.Image,
    cards: list[tuple[str, Influencer, Image.Image]],
) -> Image.Image:
    """The query, positives and negatives as three rows of cells (layout: ``sheet_size``)."""
    k = max(len(result.positive), len(result.negative))
    sheet = Image.new("RGB", sheet_size(k), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    title_font = ImageFont.load_default(size=16)
    text_w = CELL_W - 2 * CELL_PAD
    title_w = sheet.width - 2 * MARGIN

    def cell(row: int, col: int, image: Image.Image, lines: list[tuple[str, tuple]]) -> None:
        x = MARGIN + col * (CELL_W + GAP)
        y = MARGIN + row * (TITLE_H + CELL_H + ROW_GAP) + TITLE_H
        draw.rounded_rectangle((x, y, x + CELL_W - 1, y + CELL_H - 1), 8, outline=_LINE)
        thumb = _thumbnail(image)
        box_x, box_y = x + (CELL_W - THUMB) // 2, y + CELL_PAD
        sheet.paste(
            thumb, (box_x + (THUMB - thumb.width) // 2, box_y + (THUMB - thumb.height) // 2)
        )
        ty = box_y + THUMB + 6
        for text, colour in lines:
            draw.text((x + CELL_PAD, ty), text, font=font, fill=colour)
            ty += LINE_H

    def title(row: int, text: str, colour: tuple) -> None:
        y = MARGIN + row * (TITLE_H + CELL_H + ROW_GAP)
        draw.text((MARGIN, y + 4), _fit(text, title_font, title_w), font=title_font, fill=colour)

    kicker = f"validation pair {result.val_id}" if result.val_id is not None else "new query"
    level = result.trust.get("level", "reliable")
    trust = "" if level == "reliable" else f"  ·  trust: {level}: {result.trust.get('reason')}"
    title(0, f"Query ({kicker}){trust}", _INK)
    head = [
        (_fit(kicker, font, text_w), _MUTED),
        (_fit(f"sim {result.clip_similarity:.3f}  margin {result.margin:.3f}", font, text_w), _INK),
    ]
    caption = [(line, _INK) for line in _wrap(result.caption, font, text_w, CAPTION_LINES)]
    cell(0, 0, query, head + caption)
    for row, sign in enumerate(SIGNS, start=1):
        title(row, TITLES[sign], _SIGN_RGB[sign])
        col = 0
        for card_sign, card, image in cards:
            if card_sign != sign:
                continue
            lines = [
                (_fit(f"#{card.rank}  {printable(card.id)}", font, text_w), _MUTED),
                (f"score {card.score:+.4g}", _SIGN_RGB[sign]),
                *((line, _INK) for line in _wrap(card.caption, font, text_w, CAPTION_LINES)),
            ]
            cell(row, col, image, lines)
            col += 1
    return sheet
