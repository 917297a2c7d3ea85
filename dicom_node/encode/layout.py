"""The layout of an overlay: the source image, scaled by an integer factor when it is too small
to carry legible text, below an annotation band that holds the banner and the colour scale.

Nothing in the band covers the image: the band is added to it (PS3.3 A.8.1 Secondary Capture
allows any rows and columns). Text is FONT_HERSHEY_SIMPLEX (ASCII only; " · " is drawn as a dot)
with a cap height that follows the image part's longer side:

- cap height >= :data:`MIN_CAP` pixels, and <= ``max(MIN_CAP, CAP_SHARE * longer side)``;
- an image whose longer side is under :data:`MIN_SIDE` pixels is scaled up by the smallest
  integer factor that brings it there (64 px -> x4), nearest neighbour;
- lines are wrapped to the band's width; the band is at least as wide as the widest word.
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np

MIN_CAP = 8  # pixels: the cap height of an 11 px font, legible on a screen at 1:1
CAP_SHARE = 0.016  # the cap height's share of the image's longer side (33 px at 2048)
MIN_SIDE = 256  # smaller images are scaled up: below this, 8 px text would dwarf the image
CAP_PER_SCALE = 20.3  # ink height of a capital at font scale 1 (measured on OpenCV's Hershey simplex)
FONT = cv2.FONT_HERSHEY_SIMPLEX
DOT = "·"  # drawn as a filled circle: Hershey fonts have no middle dot
SEPARATOR = 128  # mid grey: visible against the black band and against a black film edge
RAMP_CAPS = 20  # the colour scale's length, in cap heights, when the band is wide enough
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Line:
    """One line of the banner, wrapped to the band's width when it is too long."""

    text: str
    colour: Colour


@dataclass(frozen=True)
class Layout:
    """Where the parts of an overlay go.

    ``rows`` x ``columns`` is the whole SC; the image part (the source scaled by ``factor``,
    ``image_rows`` x ``image_columns``) starts at (``top``, ``left``); the band is rows ``0`` to
    ``top - 1``, the full width. ``lines``: the banner's wrapped lines, then the colour scale's
    label when it does not fit before the scale, each a tuple of words, with its colour;
    ``scale_prefix``: the label's words when they do.
    """

    rows: int
    columns: int
    top: int
    left: int
    image_rows: int
    image_columns: int
    factor: int
    cap: int
    lines: tuple[tuple[tuple[str, ...], Colour], ...]
    scale_prefix: tuple[str, ...]
    scale_colour: Colour

    @property
    def image_slices(self) -> tuple[slice, slice]:
        """The image part of the SC's pixel array, as (rows, columns) slices."""
        return slice(self.top, self.top + self.image_rows), slice(self.left, self.left + self.image_columns)

    @property
    def scale(self) -> float:
        return self.cap / CAP_PER_SCALE

    @property
    def thickness(self) -> int:
        return max(1, round(self.cap / 10))

    @property
    def line_height(self) -> int:
        return _line_height(self.cap)


def scale_factor(rows: int, columns: int) -> int:
    """The integer factor an image of ``rows`` x ``columns`` is scaled up by (1: none)."""
    return max(1, math.ceil(MIN_SIDE / max(rows, columns, 1)))


def cap_bounds(longer_side: int) -> tuple[int, int]:
    """The documented bounds of the cap height for an image part whose longer side is given."""
    return MIN_CAP, max(MIN_CAP, round(CAP_SHARE * longer_side))


def plan(rows: int, columns: int, lines: list[Line], scale_label: str) -> Layout:
    """The layout for a source image of ``rows`` x ``columns`` pixels and these banner lines.

    Raises
    ------
    ValueError
        If ``rows`` or ``columns`` is not positive.
    """
    if rows < 1 or columns < 1:
        raise ValueError(f"image size: expected positive rows and columns, got {rows} x {columns}")
    factor = scale_factor(rows, columns)
    height, width = rows * factor, columns * factor
    words = [(line.text.split(), line.colour) for line in lines] + [(scale_label.split(), lines[-1].colour)]
    widest = max(_width(word, MIN_CAP) for text, _ in words for word in text)
    band_width = max(width, 2 * MIN_CAP + max(widest, _ramp_row(MIN_CAP, 4 * MIN_CAP)))
    cap = cap_bounds(max(height, width))[1]
    while cap > MIN_CAP and 2 * cap + max(max(_width(w, cap) for t, _ in words for w in t),
                                         _ramp_row(cap, 4 * cap)) > band_width:
        cap -= 1
    room = band_width - 2 * cap
    wrapped = [(tuple(part), colour) for text, colour in words[:-1] for part in _wrap(text, cap, room)]
    label, colour = words[-1]
    prefix: tuple[str, ...] = ()
    if _phrase_width(label, cap) + _width(" ", cap) + _ramp_row(cap, 8 * cap) <= room:
        prefix = tuple(label)  # the label fits before the colour scale: one line less
    else:
        wrapped += [(tuple(part), colour) for part in _wrap(label, cap, room)]
    top = cap + (len(wrapped) + 1) * _line_height(cap) + cap // 2
    left = (band_width - width) // 2
    return Layout(top + height, band_width, top, left, height, width, factor, cap, tuple(wrapped), prefix,
                  colour)


def draw_band(canvas: np.ndarray, layout: Layout, ramp: np.ndarray) -> None:
    """The banner's lines and the colour scale (``ramp``: 256 RGB colours, low to high) drawn in
    the band of ``canvas``; the image part is not touched."""
    cap, height = layout.cap, layout.line_height
    for i, (words, colour) in enumerate(layout.lines):
        _draw_words(canvas, words, (cap, cap + i * height + cap), layout, colour)
    _draw_scale(canvas, layout, ramp, cap + len(layout.lines) * height + cap)
    # a grey rule on the band's last rows: where the annotations end and the image begins
    canvas[layout.top - layout.thickness:layout.top, :] = SEPARATOR


def _draw_scale(canvas: np.ndarray, layout: Layout, ramp: np.ndarray, baseline: int) -> None:
    """The label (when it fits on the row), "0", the colour ramp (one cap high) and "max"."""
    cap, colour, x = layout.cap, layout.scale_colour, layout.cap
    if layout.scale_prefix:
        _draw_words(canvas, layout.scale_prefix, (x, baseline), layout, colour)
        x += _phrase_width(list(layout.scale_prefix), cap) + _width(" ", cap)
    length = min(RAMP_CAPS * cap, layout.columns - cap - x - _ramp_row(cap, 0))
    _draw_words(canvas, ("0",), (x, baseline), layout, colour)
    x += _width("0", cap) + cap // 2
    steps = np.linspace(0, 255, length).round().astype(np.intp)
    canvas[baseline - cap:baseline, x:x + length] = ramp[steps][None]
    _draw_words(canvas, ("max",), (x + length + cap // 2, baseline), layout, colour)


def _line_height(cap: int) -> int:
    return round(1.8 * cap)  # room for descenders and a gap


def _ramp_row(cap: int, ramp: int) -> int:
    """Width of the colour scale's row: "0", the ramp, "max" and the gaps between them."""
    return _width("0", cap) + _width("max", cap) + 2 * (cap // 2) + ramp


def _phrase_width(words: list[str], cap: int) -> int:
    return sum(_width(word, cap) for word in words) + _width(" ", cap) * (len(words) - 1)


def _width(word: str, cap: int) -> int:
    if word == DOT:
        return cap
    return cv2.getTextSize(word, FONT, cap / CAP_PER_SCALE, max(1, round(cap / 10)))[0][0]


def _wrap(words: list[str], cap: int, width: int) -> list[list[str]]:
    """Greedy word wrap to ``width`` pixels; a separator dot never starts or ends a line."""
    space = _width(" ", cap)
    lines: list[list[str]] = [[]]
    used = 0
    for word in words:
        size = _width(word, cap)
        if lines[-1] and used + space + size > width:
            lines.append([])
            used = 0
        if not lines[-1] and word == DOT:
            continue
        used += (space if lines[-1] else 0) + size
        lines[-1].append(word)
    return [line[:-1] if line and line[-1] == DOT else line for line in lines if line]


def _draw_words(canvas: np.ndarray, words: tuple[str, ...], origin: tuple[int, int], layout: Layout,
                colour: Colour) -> None:
    x, y = origin
    cap, space = layout.cap, _width(" ", layout.cap)
    for word in words:
        if word == DOT:
            cv2.circle(canvas, (x + cap // 2, y - cap // 2), max(1, cap // 8), colour, -1, cv2.LINE_AA)
        else:
            cv2.putText(canvas, word, (x, y), FONT, layout.scale, colour, layout.thickness, cv2.LINE_AA)
        x += _width(word, cap) + space
