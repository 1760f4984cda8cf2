"""A sweep's labelled grid: X values as columns, Y as rows, one page per Z value (A1111's X/Y/Z
plot), each cell the image of that combination (its first image), a failed or cancelled cell
drawn as a grey tile that says so. Drawn with PIL from the stored images, stored beside them
(``<prefix>/<batch_id>/grid-<z>.png``) when the batch's last job has ended (services/batches.py
takes it from the batch-end tracker); the sweep's layout then lists the grids' keys. A page
holds at most PAGE_MAX_PIXELS: the cells of a large sweep are drawn smaller."""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Callable

import redis
from PIL import Image, ImageDraw

from lorafleet.common.fleet.store import parsed
from lorafleet.common.infra.storage import Storage, check_key
from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import JobStatus

logger = logging.getLogger(__name__)

LABEL_HEIGHT = 24
LABEL_WIDTH = 160
"""Room for the row labels at the left and the column labels on top, in pixels."""
CELL_MAX = 512
"""A cell is the image scaled down to at most this many pixels a side..."""
CELL_MIN = 128
"""...or up (nearest neighbour) to at least this many, so that small images stay legible..."""
PAGE_MAX_PIXELS = 64 * 2**20
"""...unless the page would pass this many pixels (about 8192 x 8192, 192 MiB as RGB while it is
drawn), labels included: then every cell is drawn smaller until it fits, whatever CELL_MIN
says (down to one pixel a side; a sweep's job cap keeps cells far larger than that)."""


KEEP_CELLS = 64
"""Cells drawn between two calls of a page's ``keep`` (the caller's lease renewal)."""


def page_size(cell: tuple[int, int], columns: int, rows: int) -> tuple[int, int]:
    """The page's width and height: the row labels' column and two label rows on top."""
    return LABEL_WIDTH + cell[0] * columns, LABEL_HEIGHT * 2 + cell[1] * rows


def cell_size(width: int, height: int, columns: int, rows: int) -> tuple[int, int]:
    """The size each cell of a ``columns`` x ``rows`` page is drawn at, for images of
    ``width`` x ``height``: CELL_MIN..CELL_MAX a side, and the page within PAGE_MAX_PIXELS.

    Semantics: with cells of ``width·s`` x ``height·s``, the page is
    ``(LABEL_WIDTH + a·s)(2·LABEL_HEIGHT + b·s)`` pixels (a = width·columns, b = height·rows);
    ``s`` is the preferred scale, or the positive root of that product = PAGE_MAX_PIXELS if
    less. Cells are rounded down, so the page never passes the cap.
    """
    scale = min(CELL_MAX / max(width, height), max(1.0, CELL_MIN / max(width, height)))
    a, b = width * columns, height * rows
    labels_w, labels_h = LABEL_WIDTH, LABEL_HEIGHT * 2
    # a·b·s² + (labels_w·b + labels_h·a)·s + labels_w·labels_h − PAGE_MAX_PIXELS = 0
    linear = labels_w * b + labels_h * a
    constant = labels_w * labels_h - PAGE_MAX_PIXELS
    fit = (-linear + (linear * linear - 4 * a * b * constant) ** 0.5) / (2 * a * b)
    scale = min(scale, fit)
    cell = max(1, int(width * scale)), max(1, int(height * scale))
    while _pixels(page_size(cell, columns, rows)) > PAGE_MAX_PIXELS and cell != (1, 1):
        cell = max(1, cell[0] - 1), max(1, cell[1] - 1)  # float rounding at the root: a pixel less
    return cell


def _pixels(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def draw_page(
    layout: list[dict],
    cells: dict[tuple[int, int], Callable[[], Image.Image] | str],
    size: tuple[int, int],
    title: str,
    keep: Callable[[], None] = lambda: None,
) -> Image.Image:
    """One page of images of ``size``: ``cells[(x, y)]`` opens the cell's image (called once,
    when the cell is drawn: one image is held at a time) or is the text of a cell without one."""
    xs = layout[0]["labels"]
    ys = layout[1]["labels"] if len(layout) > 1 else [""]
    cw, ch = cell_size(*size, len(xs), len(ys))
    page = Image.new("RGB", page_size((cw, ch), len(xs), len(ys)), "white")
    draw = ImageDraw.Draw(page)
    names = f"X: {layout[0]['axis']}" + (f", Y: {layout[1]['axis']}" if len(layout) > 1 else "")
    draw.text((4, 4), f"{title} · {names}", fill="black")
    for i, label in enumerate(xs):
        draw.text((LABEL_WIDTH + i * cw + 4, LABEL_HEIGHT + 4), label, fill="black")
    for j, label in enumerate(ys):
        top = LABEL_HEIGHT * 2 + j * ch
        if label:
            draw.text((4, top + ch // 2), label, fill="black")
        for i in range(len(xs)):
            left = LABEL_WIDTH + i * cw
            cell = cells.get((i, j), "missing")
            if isinstance(cell, str):
                draw.rectangle((left, top, left + cw - 1, top + ch - 1), fill="#bbbbbb", outline="white")
                draw.text((left + 6, top + ch // 2), cell, fill="black")
            else:
                _paste(page, cell, (left, top), (cw, ch))
            if (j * len(xs) + i) % KEEP_CELLS == KEEP_CELLS - 1:
                keep()
    return page


def _paste(
    page: Image.Image, cell: Callable[[], Image.Image], at: tuple[int, int], size: tuple[int, int]
) -> None:
    with cell() as image:  # let go on return, before the next cell's is opened
        page.paste(image.convert("RGB").resize(size, Image.Resampling.NEAREST), at)


class GridBuilder:
    """Draws a sweep's grid pages and stores them."""

    def __init__(self, client: redis.Redis, storage: Storage) -> None:
        self.redis = client
        self.storage = storage

    def build(self, batch_id: str, keep: Callable[[], None] = lambda: None) -> list[str]:
        """Draw and store the batch's grid pages; returns their keys. ``keep`` is called every
        KEEP_CELLS cells and at each page (services/batches.py renews its lease there)."""
        layout_raw = self.redis.get(keys.sweep(batch_id))
        if layout_raw is None:
            return []
        sweep = json.loads(layout_raw)
        axes = sweep["axes"]
        ids = [
            i.decode() if isinstance(i, bytes) else i for i in self.redis.zrange(keys.batch(batch_id), 0, -1)
        ]
        raws = self.redis.mget([keys.job(i) for i in ids])
        records = [
            r for r in (parsed(i, raw) for i, raw in zip(ids, raws)) if r is not None and not r.damaged
        ]
        pages: dict[int, dict[tuple[int, int], Callable[[], Image.Image] | str]] = {}
        sizes: dict[int, tuple[int, int]] = {}  # a page's image size: its first image's, as recorded
        for record in records:
            tags = record.job.tags
            if "sweep.x.index" not in tags:
                continue
            x, y, z = (int(tags.get(f"sweep.{a}.index", 0)) for a in "xyz")
            cells = pages.setdefault(z, {})
            if record.status is JobStatus.succeeded and record.images:
                image = record.images[0]
                cells[(x, y)] = functools.partial(self._open, image.key)
                sizes.setdefault(z, (image.width, image.height))
            elif (x, y) not in cells or isinstance(cells[(x, y)], str):
                cells[(x, y)] = record.status.value
        zs = axes[2]["labels"] if len(axes) > 2 else [""]
        stored = []
        for z, label in enumerate(zs):  # one page in memory at a time, and one image in it
            keep()
            title = f"sweep {batch_id}" + (f" · {axes[2]['axis']}: {label}" if label else "")
            page = draw_page(axes, pages.get(z, {}), sizes.get(z, (128, 128)), title, keep)
            buffer = io.BytesIO()
            page.save(buffer, format="PNG")
            del page
            key = check_key(f"{sweep['prefix']}/{batch_id}/grid-{z}.png")
            self.storage.put(key, buffer.getvalue(), "image/png")
            stored.append(key)
        keep()  # a lease lost while the last page was drawn stops here, before the layout
        sweep["grids"] = stored
        self.redis.set(keys.sweep(batch_id), json.dumps(sweep), keepttl=True)
        logger.info("sweep %s: %d grid page(s) stored", batch_id, len(stored))
        return stored

    def _open(self, key: str) -> Image.Image:
        return Image.open(io.BytesIO(self.storage.get(key)))
