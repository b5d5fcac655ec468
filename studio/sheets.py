"""Contact sheets: one PNG per report group, rows = strategies, columns = seeds (or weights), scores below.

A sheet is for sharing (chat, slides, issues) where the HTML report cannot go; it carries the same grid as the
report's table for that group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


@dataclass
class Cell:
    image: Path | None       # None: missing or failed
    caption: str


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _fit(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(title: str, row_labels: list[str], column_labels: list[str], cells: list[list[Cell]],
                  cell_size: int | None = None) -> Image.Image:
    """Draw the grid; images are scaled to ``cell_size`` (default: 128-256 px, from the first image)."""
    first = next((c.image for row in cells for c in row if c.image is not None), None)
    if cell_size is None:
        natural = Image.open(first).size[0] if first is not None else 128
        cell_size = max(128, min(256, natural))
    font, small, big = _font(14), _font(12), _font(16)
    label_w, header_h, title_h, caption_h, pad = 150, 24, 30, 34, 6
    width = label_w + len(column_labels) * (cell_size + pad) + pad
    height = title_h + header_h + len(row_labels) * (cell_size + caption_h + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), _fit(title, big, width - 2 * pad, draw), fill="black", font=big)
    for j, label in enumerate(column_labels):
        x = label_w + j * (cell_size + pad)
        draw.text((x, title_h), _fit(label, font, cell_size, draw), fill="black", font=font)
    for i, label in enumerate(row_labels):
        y = title_h + header_h + i * (cell_size + caption_h + pad)
        draw.text((pad, y + cell_size // 2 - 8), _fit(label, font, label_w - 2 * pad, draw), fill="black", font=font)
        for j, cell in enumerate(cells[i]):
            x = label_w + j * (cell_size + pad)
            if cell.image is not None:
                with Image.open(cell.image) as image:
                    resample = Image.NEAREST if image.size[0] < cell_size else Image.LANCZOS
                    sheet.paste(image.convert("RGB").resize((cell_size, cell_size), resample), (x, y))
            else:
                draw.rectangle((x, y, x + cell_size - 1, y + cell_size - 1), outline="#bbbbbb", fill="#f3f3f3")
            for k, line in enumerate(cell.caption.split("\n")[:2]):
                draw.text((x, y + cell_size + 2 + 15 * k), _fit(line, small, cell_size, draw), fill="#333333", font=small)
    return sheet
