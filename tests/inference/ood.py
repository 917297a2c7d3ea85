"""Out-of-distribution image sets for the input-distribution gate, generated in code and seeded.

Every generator returns a float image in [0, 1] (1 bright on MONOCHROME2), square, which
:func:`as_chest_cr` wraps as a CR chest instance so that only the pixels are out of distribution.
"""

from collections.abc import Callable

import cv2
import numpy as np
from pydicom import Dataset

from dicom_node.phantoms import Phantom, render, to_dataset
from dicom_node.phantoms.cross_section import cross_section

Generator = Callable[[int, int], np.ndarray]  # (seed, size) -> image


def as_chest_cr(image: np.ndarray, seed: int) -> Dataset:
    """``image`` as a CR chest radiograph (the phantom's header; the pixels are ``image``'s)."""
    size = image.shape[0]
    labels = dict.fromkeys(("nodule", "consolidation", "effusion", "cardiomegaly"), False)
    ds = to_dataset(Phantom(np.clip(image, 0, 1).astype(np.float32), {}, labels, seed, 430.0 / size))
    return ds


def _radiograph(seed: int, size: int) -> np.ndarray:
    return render(seed, size).image


def cross_sectional(modality: str) -> Generator:
    """A CT or MR phantom slice's pixels, relabelled as a chest CR."""
    def make(seed: int, size: int) -> np.ndarray:
        values = cross_section(seed, modality, size).dataset.pixel_array.astype(np.float32)
        return (values - values.min()) / max(float(np.ptp(values)), 1.0)
    return make


def inverted(seed: int, size: int) -> np.ndarray:
    return 1.0 - _radiograph(seed, size)


def rotated(quarter_turns: int) -> Generator:
    def make(seed: int, size: int) -> np.ndarray:
        return np.rot90(_radiograph(seed, size), quarter_turns).copy()
    return make


def cropped(seed: int, size: int) -> np.ndarray:
    """One quarter of the radiograph (a corner, chosen by the seed), scaled back to full size."""
    image = _radiograph(seed, size)
    half = size // 2
    row, column = divmod(seed % 4, 2)
    corner = image[row * half:(row + 1) * half, column * half:(column + 1) * half]
    return cv2.resize(corner, (size, size), interpolation=cv2.INTER_LINEAR)


def noised(seed: int, size: int) -> np.ndarray:
    """Heavy Gaussian noise, standard deviation 0.35 of the full range."""
    return _radiograph(seed, size) + np.random.default_rng(seed).normal(0, 0.35, (size, size))


def photograph(seed: int, size: int) -> np.ndarray:
    """Natural-image-like: a smooth colour gradient, texture and filled shapes, to luminance."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    colour = np.stack([a * x + b * y + c for a, b, c in rng.uniform(-1, 1, (3, 3))], axis=-1)
    colour += rng.normal(0, 0.08, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)[:size, :size]
    canvas = np.ascontiguousarray(((colour - colour.min()) / np.ptp(colour) * 255).astype(np.uint8))
    for _ in range(rng.integers(4, 9)):
        bgr = tuple(int(v) for v in rng.integers(0, 256, 3))
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            cv2.circle(canvas, centre, int(rng.integers(size // 16, size // 4)), bgr, -1)
        else:
            cv2.rectangle(canvas, centre, tuple(int(v) for v in rng.integers(0, size, 2)), bgr, -1)
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255


def text_only(seed: int, size: int) -> np.ndarray:
    """Lines of text on a blank canvas, dark on light or light on dark by the seed."""
    rng = np.random.default_rng(seed)
    background = 0 if seed % 2 else 255
    canvas = np.full((size, size), background, np.uint8)
    words = ["PATIENT", "REPORT", "CHEST", "PA", "1.2.840", "SCANNED", "PAGE", "REQUEST", "DOSE"]
    for row in range(1, 7):
        text = " ".join(rng.choice(words, 3))
        cv2.putText(canvas, text, (2, row * size // 7), cv2.FONT_HERSHEY_SIMPLEX, size / 400, 255 - background,
                    max(1, size // 128), cv2.LINE_AA)
    return canvas.astype(np.float32) / 255


def squeezed(seed: int, size: int) -> np.ndarray:
    """Lateral-like, roughly: the radiograph squeezed to 45% of its width, centred on black (a
    narrow body seen side-on). It has a lateral's outline, not its anatomy (one lung field, the
    spine at the back, the heart in front)."""
    image = _radiograph(seed, size)
    width = int(size * 0.45)
    narrow = cv2.resize(image, (width, size), interpolation=cv2.INTER_AREA)
    out = np.zeros_like(image)
    start = (size - width) // 2
    out[:, start:start + width] = narrow
    return out


def half_mirrored(seed: int, size: int) -> np.ndarray:
    """Lateral-like, roughly: one half of the chest and its mirror image, so that both sides show
    the same hemithorax (a lateral shows both lungs superimposed; this is not that either)."""
    image = _radiograph(seed, size)
    half = image[:, :size // 2]
    return np.concatenate([half, half[:, ::-1]], axis=1)


def side_profile(seed: int, size: int) -> np.ndarray:
    """Lateral-like: a side-on trunk outline (an ellipse, brighter at the back where the spine
    lies, a dark superimposed lung field in front of it), with noise."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((size, size), np.float32)
    centre = (size // 2 + int(rng.integers(-size // 16, size // 16)), size // 2)
    cv2.ellipse(canvas, centre, (int(size * 0.3), int(size * 0.45)), 0, 0, 360, 0.7, -1)
    cv2.ellipse(canvas, (centre[0] - size // 20, centre[1] - size // 10), (int(size * 0.18), int(size * 0.25)),
                0, 0, 360, 0.3, -1)
    cv2.rectangle(canvas, (centre[0] + int(size * 0.17), size // 8), (centre[0] + int(size * 0.24), size),
                  0.95, -1)
    canvas = cv2.GaussianBlur(canvas, (0, 0), size / 100)
    return canvas + rng.normal(0, 0.02, canvas.shape).astype(np.float32)


OOD_SETS: dict[str, Generator] = {
    "ct": cross_sectional("CT"), "mr": cross_sectional("MR"), "inverted": inverted,
    "rotated90": rotated(1), "rotated180": rotated(2), "cropped": cropped, "noised": noised,
    "photograph": photograph, "text": text_only, "squeezed": squeezed, "half_mirrored": half_mirrored,
    "side_profile": side_profile,
}
