"""Deterministic text images for the OCR models: lines and pages rendered with the DejaVu fonts.

The real models (``$ONNXHQ_SHARED/models/real``, see its README) come without data; their inputs
are rendered here from English words, so any machine with Pillow and Debian's
``fonts-dejavu-core`` makes the same arrays. Preprocessing follows the models' package: RGB,
``x = (pixel / 255 - 0.5) / 0.5``, channels first; lines resized to height 48 keeping the aspect
ratio and zero-padded on the right (in normalized units) to the model's width.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
#: Words to draw from (the opening of Darwin's "On the Origin of Species", public domain).
PROSE = (
    "When on board HMS Beagle as naturalist I was much struck with certain facts in the "
    "distribution of the organic beings inhabiting South America and in the geological relations "
    "of the present to the past inhabitants of that continent These facts as will be seen in the "
    "latter chapters of this volume seemed to throw some light on the origin of species that "
    "mystery of mysteries as it has been called by one of our greatest philosophers On my return "
    "home it occurred to me in 1837 that something might perhaps be made out on this question by "
    "patiently accumulating and reflecting on all sorts of facts which could possibly have any "
    "bearing on it After five years work I allowed myself to speculate on the subject and drew "
    "up some short notes these I enlarged in 1844 into a sketch of the conclusions"
)
TEXT = PROSE.split()


def _font(index: int, size: int):
    from PIL import ImageFont

    path = FONT_DIR / FONTS[index % len(FONTS)]
    if not path.is_file():
        raise SystemExit(f"error: font {path} is missing; install Debian's fonts-dejavu-core")
    return ImageFont.truetype(str(path), size)


def _phrase(rng: np.random.Generator, words: int) -> str:
    start = int(rng.integers(0, len(TEXT) - words))
    return " ".join(TEXT[start : start + words])


def render_line(text: str, font_index: int, size: int = 32) -> np.ndarray:
    """One text line, dark on light, uint8 RGB (H, W, 3) with a small margin."""
    from PIL import Image, ImageDraw

    font = _font(font_index, size)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right - left + 16, bottom - top + 12), (250, 250, 245))
    ImageDraw.Draw(image).text((8 - left, 6 - top), text, font=font, fill=(20, 20, 30))
    return np.asarray(image)


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return ((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def line_batch(n: int, *, width: int, seed: int, flip_every: int = 0) -> tuple[np.ndarray, list]:
    """``n`` rendered lines as the recognizer/classifier input float32 (n, 3, 48, width) and their
    texts. With ``flip_every`` = m, every m-th line is turned 180 degrees (orientation task)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.zeros((n, 3, 48, width), np.float32)  # zero padding in normalized units
    texts = []
    for i in range(n):
        text = _phrase(rng, int(rng.integers(1, 4)))
        rgb = render_line(text, int(rng.integers(0, len(FONTS))), size=int(rng.integers(26, 40)))
        if flip_every and i % flip_every == 0:
            rgb = rgb[::-1, ::-1]
        w = min(width, max(1, round(rgb.shape[1] * 48 / rgb.shape[0])))
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, 48)))
        out[i, :, :, :w] = normalize(resized)
        texts.append(text)
    return out, texts


def page_batch(n: int, *, height: int, width: int, seed: int) -> np.ndarray:
    """``n`` pages of scattered text lines: the detector input float32 (n, 3, height, width);
    ``height`` and ``width`` multiples of 32."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    pages = np.empty((n, 3, height, width), np.float32)
    for i in range(n):
        page = Image.new("RGB", (width, height), (245, 243, 235))
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(4, 20))
        while y < height - 30:
            font = _font(int(rng.integers(0, len(FONTS))), int(rng.integers(14, 28)))
            x = int(rng.integers(4, width // 4))
            draw.text((x, y), _phrase(rng, int(rng.integers(2, 7))), font=font, fill=(15, 15, 25))
            y += int(rng.integers(28, 56))
        pages[i] = normalize(np.asarray(page))
    return pages
