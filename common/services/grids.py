"""A sweep's labelled grid: X values as columns, Y as rows, one page per Z value (A1111's X/Y/Z
plot), each cell the image of that combination (its first image), a failed or cancelled cell
drawn as a grey tile that says so. Drawn with PIL from the stored images, stored beside them
(``<prefix>/<batch_id>/grid-<z>.png``) when the batch's last job has ended (services/batches.py
takes it from the batch-end tracker); the sweep's layout then lists the grids' keys. A page
holds at most PAGE_MAX_PIXELS: the cells of a large sweep are drawn smaller."""

from __future__ import annotations

import io
import json
import logging

import redis
from PIL import Image, ImageDraw

from lorafleet.common.infra.storage import Storage, check_key
from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import JobRecord, JobStatus

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
drawn): then every cell is scaled down until it fits, whatever CELL_MIN says."""
CELL_FLOOR = 8
"""The least side a cell is drawn at (a sweep's job cap keeps pages within the cap at it)."""


def cell_size(width: int, height: int, columns: int, rows: int) -> tuple[int, int]:
    """The size each cell of a ``columns`` x ``rows`` page is drawn at, for images of
    ``width`` x ``height``: CELL_MIN..CELL_MAX a side, and the page within PAGE_MAX_PIXELS."""
    scale = min(CELL_MAX / max(width, height), max(1.0, CELL_MIN / max(width, height)))
    room = PAGE_MAX_PIXELS - LABEL_HEIGHT * 2 * (LABEL_WIDTH + width * scale * columns)
    fit = (max(room, 0) / (columns * rows * width * height)) ** 0.5
    if (width * scale * columns + LABEL_WIDTH) * (height * scale * rows + LABEL_HEIGHT * 2) > PAGE_MAX_PIXELS:
        scale = min(scale, fit)
    return max(CELL_FLOOR, int(width * scale)), max(CELL_FLOOR, int(height * scale))


def draw_page(layout: list[dict], cells: dict[tuple[int, int], Image.Image | str], title: str) -> Image.Image:
    """One page: ``cells[(x, y)]`` an image or the text of a cell without one."""
    xs = layout[0]["labels"]
    ys = layout[1]["labels"] if len(layout) > 1 else [""]
    sample = next((c for c in cells.values() if isinstance(c, Image.Image)), None)
    width, height = sample.size if sample is not None else (128, 128)
    cw, ch = cell_size(width, height, len(xs), len(ys))
    page = Image.new("RGB", (LABEL_WIDTH + cw * len(xs), LABEL_HEIGHT * 2 + ch * len(ys)), "white")
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
            if isinstance(cell, Image.Image):
                page.paste(cell.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST), (left, top))
            else:
                draw.rectangle((left, top, left + cw - 1, top + ch - 1), fill="#bbbbbb", outline="white")
                draw.text((left + 6, top + ch // 2), cell, fill="black")
    return page


class GridBuilder:
    """Draws a sweep's grid pages and stores them."""

    def __init__(self, client: redis.Redis, storage: Storage) -> None:
        self.redis = client
        self.storage = storage

    def build(self, batch_id: str) -> list[str]:
        """Draw and store the batch's grid pages; returns their keys."""
        layout_raw = self.redis.get(keys.sweep(batch_id))
        if layout_raw is None:
            return []
        sweep = json.loads(layout_raw)
        axes = sweep["axes"]
        ids = [
            i.decode() if isinstance(i, bytes) else i for i in self.redis.zrange(keys.batch(batch_id), 0, -1)
        ]
        records = [JobRecord.model_validate_json(r) for r in self.redis.mget([keys.job(i) for i in ids]) if r]
        pages: dict[int, dict[tuple[int, int], Image.Image | str]] = {}
        for record in records:
            tags = record.job.tags
            if "sweep.x.index" not in tags:
                continue
            x, y, z = (int(tags.get(f"sweep.{a}.index", 0)) for a in "xyz")
            cells = pages.setdefault(z, {})
            if record.status is JobStatus.succeeded and record.images:
                cells[(x, y)] = Image.open(io.BytesIO(self.storage.get(record.images[0].key)))
            elif (x, y) not in cells or not isinstance(cells[(x, y)], Image.Image):
                cells[(x, y)] = record.status.value
        zs = axes[2]["labels"] if len(axes) > 2 else [""]
        stored = []
        for z, label in enumerate(zs):
            title = f"sweep {batch_id}" + (f" · {axes[2]['axis']}: {label}" if label else "")
            page = draw_page(axes, pages.get(z, {}), title)
            buffer = io.BytesIO()
            page.save(buffer, format="PNG")
            key = check_key(f"{sweep['prefix']}/{batch_id}/grid-{z}.png")
            self.storage.put(key, buffer.getvalue(), "image/png")
            stored.append(key)
        sweep["grids"] = stored
        self.redis.set(keys.sweep(batch_id), json.dumps(sweep), keepttl=True)
        logger.info("sweep %s: %d grid page(s) stored", batch_id, len(stored))
        return stored
