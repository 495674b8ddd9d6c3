"""edge/png.py: the PNG encoder read back by a small reader of its own (signature, IHDR, every
chunk's CRC, IDAT inflated to height x (1 + width x channels)) and the confusion-matrix renderer
(darker cells for larger shares of a row, text where the labels and counts go)."""

from __future__ import annotations

import binascii
import struct
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edge.png import (
    FONT,
    GLYPH_H,
    SIGNATURE,
    Layout,
    encode_png,
    render_confusion,
    text_mask,
    text_width,
)

CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}


def read_png(data: bytes) -> dict[str, Any]:
    """Parse ``data`` strictly: every chunk's CRC checked; the pixels from the inflated IDATs."""
    assert data[:8] == SIGNATURE, data[:8]
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == binascii.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data), "trailing bytes after the last chunk"
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds, kinds
    width, height, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, comp, filt, interlace) == (8, 0, 0, 0)
    channels = CHANNELS[color]
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == height * (1 + width * channels), (len(raw), height, width, channels)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all(), "only filter type 0 is written"
    pixels = rows[:, 1:].reshape(height, width, channels)
    return {"width": width, "height": height, "channels": channels, "pixels": pixels, "kinds": kinds}


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_the_encoder_round_trips_every_channel_count(channels: int) -> None:
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, size=(7, 13, channels), dtype=np.uint8)
    png = read_png(encode_png(pixels))
    assert (png["width"], png["height"], png["channels"]) == (13, 7, channels)
    assert np.array_equal(png["pixels"], pixels)
    assert encode_png(pixels) == encode_png(pixels.copy())  # the same pixels, the same bytes


def test_the_encoder_refuses_what_is_no_8_bit_image() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2), dtype=np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not empty"):
        encode_png(np.zeros((0, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="HxW"):
        encode_png(np.zeros((2, 2, 5), dtype=np.uint8))


def test_the_font_has_digits_letters_and_the_punctuation_labels_use() -> None:
    for ch in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_-.% ":
        assert ch in FONT and FONT[ch].shape == (7, 5)
    glyphs = {ch: FONT[ch].tobytes() for ch in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_-.%"}
    assert len(set(glyphs.values())) == len(glyphs)  # no two characters drawn alike
    assert not FONT[" "].any()
    assert np.array_equal(text_mask("abc"), text_mask("ABC"))  # lower case drawn as capitals
    assert np.array_equal(text_mask("é"), text_mask("?"))
    assert text_mask("8", 2).shape == (14, 10) and text_width("88", 2) == 22


def _cell_background(pixels: npt.NDArray[np.uint8], lay: Layout, row: int, col: int) -> float:
    x0, y0, _, _ = lay.cell_box(row, col)
    return float(pixels[y0 + 2, x0 + 2, :3].astype(float).mean())  # a corner, away from the count


def _has_ink(pixels: npt.NDArray[np.uint8], box: tuple[int, int, int, int], background: float) -> bool:
    x0, y0, x1, y1 = box
    region = pixels[y0:y1, x0:x1, :3].astype(float).mean(axis=2)
    return bool((np.abs(region - background) > 60).any())


def test_larger_shares_of_a_row_are_darker_and_every_label_and_count_is_written() -> None:
    labels = ["off", "fridge", "kettle_1", "tv-set", "lamp.2", "dryer %"]
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 40, size=(6, 6))
    np.fill_diagonal(counts, 200)
    counts[2, 2] = 0  # a row whose largest share is elsewhere
    counts[5] = 0  # a class never seen on the holdout: all white
    data = render_confusion(labels, counts, "appliance holdout (n=123)")
    png = read_png(data)
    pixels = png["pixels"]
    lay = Layout(labels, np.asarray(counts), "appliance holdout (n=123)", 2)
    assert (png["width"], png["height"], png["channels"]) == (lay.width, lay.height, 3)
    for i in range(6):
        row = counts[i]
        if row.sum() == 0:
            assert all(_cell_background(pixels, lay, i, j) == 255 for j in range(6))
            continue
        order = np.argsort(row)
        lightness = [_cell_background(pixels, lay, i, int(j)) for j in order]
        for (a, la), (b, lb) in zip(
            zip(order, lightness, strict=True), list(zip(order, lightness, strict=True))[1:], strict=False
        ):
            if row[b] > row[a]:
                assert lb < la, (i, row.tolist(), lightness)  # a larger count: a darker cell
    # every count is written in its cell
    for i in range(6):
        for j in range(6):
            assert _has_ink(pixels, lay.cell_box(i, j), _cell_background(pixels, lay, i, j)), (i, j)
    # the labels: left of each row and above each column; the title at the top
    for i in range(6):
        x0, y0, _, y1 = lay.cell_box(i, 0)
        assert _has_ink(pixels, (lay.pad, y0, x0 - 1, y1), 255.0), labels[i]
        cx0, _, cx1, _ = lay.cell_box(0, i)
        assert _has_ink(pixels, (cx0, lay.note_y + lay.line, cx1, lay.top), 255.0), labels[i]
    assert _has_ink(pixels, (0, lay.title_y, lay.width, lay.title_y + GLYPH_H * 2), 255.0)
    # and nothing is written in the blank margin between the row labels and a row's first cell
    x0, y0, _, y1 = lay.cell_box(0, 0)
    assert not _has_ink(pixels, (x0 - lay.pad + 1, y0, x0 - 1, y1), 255.0)


def test_a_matrix_that_does_not_fit_its_labels_is_refused() -> None:
    with pytest.raises(ValueError, match="2x2"):
        render_confusion(["a", "b"], [[1, 2, 3]])
    with pytest.raises(ValueError, match="negative"):
        render_confusion(["a", "b"], [[1, -2], [0, 1]])
