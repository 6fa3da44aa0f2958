"""A tiny line-chart PNG writer in pure Python (zlib + struct): the soak's plot without matplotlib.

Panels stacked vertically, each with its title, y axis from 0, ticks with labels, one coloured line
per series and a legend; optional dashed vertical marks (e.g. relay restarts) on every panel. Text
is a 3x5 bitmap font (upper case, digits, a little punctuation) drawn at twice its size.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001010010", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101",
    "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101",
    "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    " ": "000000000000000", ".": "000000000000010", "-": "000000111000000",
    "(": "001010010010001", ")": "100010010010100", ":": "000010000010000",
    "%": "101001010100101", "/": "001001010100100", ",": "000000000010100",
    "_": "000000000000111",
}  # fmt: skip
SCALE = 2
CHAR_W = 4 * SCALE  # 3 columns and a gap
TEXT_H = 5 * SCALE
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, colour: Colour, size: int = 1) -> None:
        for dx in range(size):
            for dy in range(size):
                px, py = x + dx, y + dy
                if 0 <= px < self.width and 0 <= py < self.height:
                    i = (py * self.width + px) * 3
                    self.pixels[i : i + 3] = bytes(colour)

    def line(
        self, x0: int, y0: int, x1: int, y1: int, colour: Colour, size: int = 1, dash: int = 0
    ) -> None:
        """Bresenham; ``dash`` > 0 draws ``dash`` pixels on, ``dash`` off."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        while True:
            if not dash or (n // dash) % 2 == 0:
                self.dot(x0, y0, colour, size)
            n += 1
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, colour: Colour = (0, 0, 0)) -> None:
        for k, char in enumerate(text.upper()):
            glyph = _GLYPHS.get(char, _GLYPHS[" "])
            for bit, on in enumerate(glyph):
                if on == "1":
                    row, col = divmod(bit, 3)
                    self.dot(x + k * CHAR_W + col * SCALE, y + row * SCALE, colour, SCALE)

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * self.width * 3 : (y + 1) * self.width * 3])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def nice_step(span: float, ticks: int = 5) -> float:
    """A 1, 2 or 5 times a power of ten near ``span / ticks``."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def line_chart_png(
    panels: Sequence[tuple[str, Sequence[Series]]],
    *,
    x_label: str = "",
    marks: Sequence[float] = (),
    width: int = 1100,
    panel_height: int = 300,
) -> bytes:
    """Panels sharing one x range; returns the PNG file's bytes."""
    left, right, top, gap = 70, 20, 34, 56
    height = top + len(panels) * (panel_height + gap) + 10
    canvas = Canvas(width, height)
    xs = [x for _, series in panels for s in series for x, _ in s.points]
    x_min, x_max = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_max <= x_min:
        x_max = x_min + 1
    plot_w = width - left - right
    for p, (title, series) in enumerate(panels):
        y0 = top + p * (panel_height + gap)
        ys = [y for s in series for _, y in s.points]
        y_step = nice_step(max(ys, default=1.0) * 1.05 or 1.0)
        y_max = y_step * math.ceil(max(ys, default=1.0) * 1.05 / y_step) or 1.0

        def px(x: float) -> int:
            return left + round((x - x_min) / (x_max - x_min) * plot_w)

        def py(y: float, base: int = y0, top_y: float = y_max) -> int:
            return base + panel_height - round(y / top_y * panel_height)

        canvas.text(left, y0 - 2 * TEXT_H - 4, title)
        grey, axis = (225, 225, 225), (0, 0, 0)
        tick = 0.0
        while tick <= y_max + 1e-9:
            canvas.line(left, py(tick), left + plot_w, py(tick), grey)
            label = _fmt(tick)
            canvas.text(left - 6 - len(label) * CHAR_W, py(tick) - TEXT_H // 2, label)
            tick += y_step
        x_step = nice_step(x_max - x_min, 10)
        tick = math.ceil(x_min / x_step) * x_step
        while tick <= x_max + 1e-9:
            canvas.line(px(tick), y0 + panel_height, px(tick), y0 + panel_height + 4, axis)
            label = _fmt(tick)
            canvas.text(px(tick) - len(label) * CHAR_W // 2, y0 + panel_height + 8, label)
            tick += x_step
        canvas.line(left, y0, left, y0 + panel_height, axis)
        canvas.line(left, y0 + panel_height, left + plot_w, y0 + panel_height, axis)
        for mark in marks:
            canvas.line(px(mark), y0, px(mark), y0 + panel_height, (120, 120, 120), dash=4)
        legend_x = left + plot_w
        for k, s in reversed(list(enumerate(series))):
            colour = COLOURS[k % len(COLOURS)]
            legend_x -= len(s.label) * CHAR_W + 30
            canvas.dot(legend_x, y0 - 2 * TEXT_H - 4, colour, TEXT_H)
            canvas.text(legend_x + TEXT_H + 6, y0 - 2 * TEXT_H - 4, s.label)
            for (xa, ya), (xb, yb) in zip(s.points, s.points[1:], strict=False):
                canvas.line(px(xa), py(ya), px(xb), py(yb), colour, size=2)
            if len(s.points) == 1:
                canvas.dot(px(s.points[0][0]), py(s.points[0][1]), colour, 3)
    if x_label:
        canvas.text(left + (plot_w - len(x_label) * CHAR_W) // 2, height - TEXT_H - 10, x_label)
    return canvas.png()
