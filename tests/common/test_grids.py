"""A sweep's grid page: its cells drawn within the page's pixel cap, labels included, whatever
the sweep's shape; each cell's image opened only when it is drawn."""

from __future__ import annotations

import gc
import weakref

import pytest
from PIL import Image

from lorafleet.common.services.grids import (
    CELL_MAX,
    CELL_MIN,
    KEEP_CELLS,
    PAGE_MAX_PIXELS,
    cell_size,
    draw_page,
    page_size,
)


@pytest.mark.parametrize(
    ("image", "columns", "rows"),
    [
        (1024, 1, 1000),  # a tall single column: the label column is most of the page's width
        (1024, 1, 10000),  # a sweep at the default job cap
        (1024, 10000, 1),
        (1024, 3, 333),
        (512, 32, 32),
        (512, 100, 100),
        (64, 100, 100),
    ],
)
def test_a_page_stays_within_its_pixel_cap_whatever_the_sweeps_shape(image, columns, rows):
    cell = cell_size(image, image, columns, rows)
    width, height = page_size(cell, columns, rows)
    assert width * height <= PAGE_MAX_PIXELS
    assert width * height > PAGE_MAX_PIXELS * 0.95 or cell == (min(image, CELL_MAX),) * 2


def test_a_small_sweep_keeps_its_cells_legible_and_a_large_image_is_scaled_down():
    assert cell_size(64, 64, 3, 4) == (CELL_MIN, CELL_MIN)
    assert cell_size(1024, 768, 3, 4) == (CELL_MAX, 384)
    assert cell_size(512, 512, 2, 2) == (512, 512)


def test_each_cells_image_is_opened_when_it_is_drawn_and_let_go_after():
    layout = [{"axis": "seed", "labels": ["1", "2", "3"]}]
    opened: list[weakref.ref] = []

    def cell(colour: str):
        def open_it() -> Image.Image:
            gc.collect()
            assert all(ref() is None for ref in opened)  # no earlier cell's image is still held
            image = Image.new("RGB", (64, 64), colour)
            opened.append(weakref.ref(image))
            return image

        return open_it

    cells = {(0, 0): cell("red"), (1, 0): "failed", (2, 0): cell("blue")}
    page = draw_page(layout, cells, (64, 64), "sweep")
    assert len(opened) == 2
    assert page.size == page_size((CELL_MIN, CELL_MIN), 3, 1)
    top = page.size[1] - CELL_MIN
    assert page.getpixel((page_size((CELL_MIN, CELL_MIN), 0, 1)[0] + 5, top + 5)) == (255, 0, 0)
    assert page.getpixel((page_size((CELL_MIN, CELL_MIN), 1, 1)[0] + 5, top + 5)) == (0xBB, 0xBB, 0xBB)
    assert page.getpixel((page_size((CELL_MIN, CELL_MIN), 2, 1)[0] + 5, top + 5)) == (0, 0, 255)


def test_a_long_page_calls_keep_every_few_cells():
    layout = [{"axis": "seed", "labels": [str(i) for i in range(2 * KEEP_CELLS + 3)]}]
    kept = []
    draw_page(layout, {}, (8, 8), "sweep", keep=lambda: kept.append(1))
    assert len(kept) == 2  # after cell 64 and after cell 128: the caller's lease renewed
