"""The report's thumbnails packed into a few JPEG sprite sheets (``report/s0.jpg``, ``s1.jpg``, ...).

A DetReIDX-sized test shows ~5,000 query strips and as many gallery tiles; one file each costs more in file
creation than in decoding. A sheet is a column of rows ``TILE`` high and ``T`` tiles wide: a query's strip of the
scorer's T frames fills a row, gallery tiles share rows. The page shows a thumbnail as a CSS background at its
offset, so a browser fetches only the sheets of the queries on screen; sheets are filled in page order (worst
queries first), so the first page needs the first sheets. Tiles are multiples of 16 px, JPEG's 4:2:0 block, so no
colour bleeds from one tile into the next.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farreid.evaluation.frames import TILE, save_jpeg

ROWS = 64  # rows per sheet: 4,096 px high


class SpriteSheets:
    """Writes tiles into sheets as they fill; a tile's reference is ``[sheet, x, y, width]`` in pixels.

    Args:
        folder: where ``s{k}.jpg`` go (created). slots: tiles per row (the clip's T frames).
        rows: rows per sheet. tile: (height, width) of one tile.
    """

    def __init__(self, folder: Path, slots: int, rows: int = ROWS, tile: tuple[int, int] = TILE) -> None:
        self.folder, self.slots, self.rows, self.tile = folder, slots, rows, tile
        folder.mkdir(parents=True, exist_ok=True)
        height, width = tile
        self._sheet = np.zeros((rows * height, slots * width, 3), dtype=np.uint8)
        self._index, self._row, self._slot = 0, 0, 0  # the next free row; the next free slot of the shared row
        self._shared: int | None = None  # the row gallery tiles are filling, if any
        self.sheets = 0

    def _take_row(self) -> int:
        if self._row == self.rows:
            self._flush()
        row, self._row = self._row, self._row + 1
        return row

    def add_strip(self, strip: np.ndarray) -> list[int]:
        """A (H, n * W, 3) strip, n <= slots, at the start of a row of its own."""
        height, width = self.tile
        if strip.shape[0] != height or strip.shape[1] > self.slots * width:
            raise ValueError(f"a strip of {strip.shape} does not fit a row of {self.slots} tiles of {self.tile}")
        row = self._take_row()
        self._sheet[row * height : (row + 1) * height, : strip.shape[1]] = strip
        return [self._index, 0, row * height, int(strip.shape[1])]

    def add_tile(self, tile: np.ndarray) -> list[int]:
        """One (H, W, 3) tile in the shared row (a new one when it is full or on a new sheet)."""
        height, width = self.tile
        if self._shared is None or self._slot == self.slots:
            self._shared, self._slot = self._take_row(), 0
        sheet, row, slot = self._index, self._shared, self._slot
        self._sheet[row * height : (row + 1) * height, slot * width : (slot + 1) * width] = tile
        self._slot += 1
        return [sheet, slot * width, row * height, width]

    def _flush(self) -> None:
        if self._row:
            height = self._row * self.tile[0]
            save_jpeg(np.ascontiguousarray(self._sheet[:height]), self.folder / f"s{self._index}.jpg")
            self.sheets += 1
            self._index += 1
        self._sheet[:] = 0
        self._row, self._shared, self._slot = 0, None, 0

    def close(self) -> int:
        """Write the last sheet; returns the number of sheets."""
        self._flush()
        return self.sheets

    def path(self, ref: list[int]) -> Path:
        return self.folder / f"s{ref[0]}.jpg"
