"""PNG images without an imaging library: an encoder and a confusion-matrix renderer.

:func:`encode_png` writes 8-bit grey, RGB or RGBA pixels (a numpy array) as a PNG with the
standard library only (``zlib``, ``struct``, ``binascii.crc32``): the signature, ``IHDR``, one
``IDAT`` (every row with filter type 0) and ``IEND``. The same pixels always give the same bytes.

:func:`render_confusion` draws a confusion matrix: a title, the predicted classes written
upwards above the columns, the true classes left of the rows, each cell shaded by its
row-normalised count (white for none of the row, dark blue for all of it) with the count written
in it, using the 5x7 bitmap font below (digits, letters (lower case drawn as capitals),
``_-.%:/()=,+?`` and space; any other character is drawn as ``?``).
"""

from __future__ import annotations

import binascii
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)

# 5x7 glyphs, one string of seven 5-bit rows (top first, the left pixel the high bit) per character.
_FONT_ROWS = {
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    "_": "00000 00000 00000 00000 00000 00000 11111",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    "%": "11000 11001 00010 00100 01000 10011 00011",
    " ": "00000 00000 00000 00000 00000 00000 00000",
    ":": "00000 01100 01100 00000 01100 01100 00000",
    "/": "00000 00001 00010 00100 01000 10000 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000",
    "=": "00000 00000 11111 00000 11111 00000 00000",
    ",": "00000 00000 00000 00000 01100 00100 01000",
    "+": "00000 00100 00100 11111 00100 00100 00000",
    "?": "01110 10001 00001 00010 00100 00000 00100",
}
GLYPH_W, GLYPH_H = 5, 7
FONT: dict[str, npt.NDArray[np.bool_]] = {
    ch: np.array([[bit == "1" for bit in row] for row in rows.split()], dtype=bool)
    for ch, rows in _FONT_ROWS.items()
}

WHITE = np.array([255, 255, 255], dtype=np.float64)
DARK = np.array([8, 48, 107], dtype=np.float64)  # a full row: dark blue
INK = (0, 0, 0)
PAPER = (255, 255, 255)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", binascii.crc32(kind + data))


def encode_png(pixels: npt.NDArray[np.uint8], level: int = 9) -> bytes:
    """``pixels`` (height x width, or height x width x 1/2/3/4 channels, uint8) as PNG bytes."""
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ValueError(f"PNG pixels must be uint8, not {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in _COLOR_TYPES or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"PNG pixels must be HxW or HxWx(1-4) and not empty, not {array.shape}")
    height, width, channels = array.shape
    rows = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # filter byte 0 (None) per row
    rows[:, 1:] = array.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    return (
        SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


def glyph(ch: str) -> npt.NDArray[np.bool_]:
    found = FONT.get(ch)
    return found if found is not None else FONT.get(ch.upper(), FONT["?"])


def text_mask(text: str, scale: int = 1) -> npt.NDArray[np.bool_]:
    """The pixels of ``text`` in the bitmap font, one empty column between characters."""
    if not text:
        return np.zeros((GLYPH_H * scale, 0), dtype=bool)
    step = GLYPH_W + 1
    mask = np.zeros((GLYPH_H, step * len(text) - 1), dtype=bool)
    for i, ch in enumerate(text):
        mask[:, i * step : i * step + GLYPH_W] = glyph(ch)
    return mask.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else mask


def text_width(text: str, scale: int = 1) -> int:
    return max(0, (GLYPH_W + 1) * len(text) - 1) * scale


def draw_text(
    image: npt.NDArray[np.uint8],
    text: str,
    x: int,
    y: int,
    *,
    color: tuple[int, int, int] = INK,
    scale: int = 1,
    upwards: bool = False,
) -> None:
    """Write ``text`` into ``image`` (H x W x 3) with its top left corner at (x, y); ``upwards``
    turns it a quarter left (read bottom to top), its top left corner still at (x, y)."""
    mask = text_mask(text, scale)
    if upwards:
        mask = np.rot90(mask)
    h = min(mask.shape[0], image.shape[0] - y)
    w = min(mask.shape[1], image.shape[1] - x)
    if h <= 0 or w <= 0 or x < 0 or y < 0:
        return
    region = image[y : y + h, x : x + w]
    region[mask[:h, :w]] = color


def shade(fraction: float) -> tuple[int, int, int]:
    """The colour of a cell holding ``fraction`` of its row: white (0) to dark blue (1)."""
    f = min(max(float(fraction), 0.0), 1.0)
    r, g, b = np.rint(WHITE + (DARK - WHITE) * f).astype(int)
    return int(r), int(g), int(b)


class Layout:
    """Where :func:`render_confusion` puts things (for tests and for the renderer itself)."""

    def __init__(self, labels: Sequence[str], counts: npt.NDArray[np.int64], title: str, scale: int) -> None:
        n = len(labels)
        self.scale = scale
        self.pad = 4 * scale
        self.line = (GLYPH_H + 3) * scale
        digits = max((len(str(int(c))) for c in counts.reshape(-1)), default=1)
        self.cell = max(text_width("0" * digits, scale) + 2 * self.pad, self.line + 2 * self.pad)
        longest = max((text_width(label, scale) for label in labels), default=0)
        self.title_y = self.pad
        self.note_y = self.title_y + self.line
        self.top = self.note_y + self.line + self.pad + longest  # column labels written upwards
        self.left = self.pad + longest + self.pad
        grid = n * self.cell
        self.width = max(self.left + grid + self.pad, text_width(title, scale) + 2 * self.pad)
        self.height = self.top + self.pad + grid + self.pad
        self.grid_top = self.top + self.pad

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a cell, x1/y1 exclusive."""
        x0 = self.left + col * self.cell
        y0 = self.grid_top + row * self.cell
        return x0, y0, x0 + self.cell, y0 + self.cell


def render_confusion(
    labels: Sequence[str],
    counts: Sequence[Sequence[int]] | npt.NDArray[np.integer],
    title: str = "Confusion matrix",
    *,
    scale: int = 2,
) -> bytes:
    """A PNG of the confusion matrix ``counts`` (rows: true class, columns: predicted class, in
    ``labels``' order)."""
    matrix = np.asarray(counts, dtype=np.int64)
    n = len(labels)
    if n < 1 or matrix.shape != (n, n):
        raise ValueError(f"a confusion matrix of {n} labels must be {n}x{n}, not {list(matrix.shape)}")
    if (matrix < 0).any():
        raise ValueError("confusion counts cannot be negative")
    return encode_png(confusion_pixels(labels, matrix, title, scale=scale))


def confusion_pixels(
    labels: Sequence[str], matrix: npt.NDArray[np.int64], title: str, *, scale: int = 2
) -> npt.NDArray[np.uint8]:
    """The RGB pixels :func:`render_confusion` encodes."""
    lay = Layout(labels, matrix, title, scale)
    image = np.full((lay.height, lay.width, 3), 255, dtype=np.uint8)
    draw_text(image, title, lay.pad, lay.title_y, scale=scale)
    draw_text(image, "rows: true, columns: predicted", lay.pad, lay.note_y, color=(90, 90, 90), scale=scale)
    totals = matrix.sum(axis=1)
    for i, label in enumerate(labels):
        # the true class, right-aligned left of its row, centred on it
        _, y0, _, y1 = lay.cell_box(i, 0)
        ty = (y0 + y1 - GLYPH_H * scale) // 2
        draw_text(image, label, lay.left - lay.pad - text_width(label, scale), ty, scale=scale)
        # the predicted class, written upwards above its column, ending just above the grid
        x0, _, x1, _ = lay.cell_box(0, i)
        tx = (x0 + x1 - GLYPH_H * scale) // 2
        draw_text(image, label, tx, lay.top - text_width(label, scale), scale=scale, upwards=True)
    for i in range(len(labels)):
        for j in range(len(labels)):
            x0, y0, x1, y1 = lay.cell_box(i, j)
            fraction = matrix[i, j] / totals[i] if totals[i] else 0.0
            color = shade(fraction)
            image[y0:y1, x0:x1] = color
            text = str(int(matrix[i, j]))
            ink = PAPER if fraction >= 0.5 else INK
            tx = (x0 + x1 - text_width(text, scale)) // 2
            ty = (y0 + y1 - GLYPH_H * scale) // 2
            draw_text(image, text, tx, ty, color=ink, scale=scale)
    grid = slice(lay.grid_top, lay.grid_top + len(labels) * lay.cell + 1)
    for k in range(len(labels) + 1):  # grid lines
        x = min(lay.left + k * lay.cell, lay.width - 1)
        y = min(lay.grid_top + k * lay.cell, lay.height - 1)
        image[grid, x] = (160, 160, 160)
        image[y, lay.left : lay.left + len(labels) * lay.cell + 1] = (160, 160, 160)
    return image
