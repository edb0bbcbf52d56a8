"""Rendered images with short questions and exact answers, for the tiny vision-language model (`tiny-vlm`).

Six kinds of question, each about one image drawn here with Pillow:

    number  "What number is shown?"       a 1-3 digit number in some font          -> "347"
    word    "What word is shown?"         one of WORDS, lower case                  -> "lamp"
    shape   "What shape is this?"         a filled circle / square / triangle / star -> "star"
    colour  "What colour is the shape?"   the same kind of picture                  -> "purple"
    count   "How many dots are there?"    1-9 dots of one colour                    -> "7"
    chart   "Which bar is tallest?"       3-4 bars labelled A, B, C, D              -> "C"

Training images use TRAIN_FONTS; held-out images (benchmarks/vlm.py) use HELD_OUT_FONTS, which no training
image uses, and their own seeds (HELD_OUT_SEED; VALIDATION_SEED for the images settings are tuned on), image
sizes, positions, colours and noise draws. Everything is a pure function of (seed, index):
`make_sample(kind, seed, index, held_out)`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

KINDS = ("number", "word", "shape", "colour", "count", "chart")
QUESTIONS = {
    "number": "What number is shown?",
    "word": "What word is shown?",
    "shape": "What shape is this?",
    "colour": "What colour is the shape?",
    "count": "How many dots are there?",
    "chart": "Which bar is tallest?",
}
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "cake", "door", "ship",
         "frog", "lamp", "rain", "milk", "king", "road", "wolf", "bell", "hat", "cup", "box", "key")
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (240, 210, 20),
           "orange": (245, 130, 20), "purple": (140, 50, 180)}
BAR_LABELS = "ABCD"

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
TRAIN_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
               "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansCondensed.ttf", "DejaVuSans-Oblique.ttf",
               "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf", "LiberationSerif-Bold.ttf",
               "LiberationMono-Regular.ttf", "LiberationSansNarrow-Bold.ttf", "LiberationSerif-Italic.ttf")
HELD_OUT_FONTS = ("LiberationSerif-Regular.ttf", "LiberationSans-Italic.ttf", "DejaVuSerifCondensed-Bold.ttf",
                  "LiberationMono-Bold.ttf", "DejaVuSansCondensed-BoldOblique.ttf", "LiberationSansNarrow-Regular.ttf")
BUILTIN_FONT = "pillow-default"  # Pillow's own font (always there): trained on, so a machine without fonts works

TRAIN_SEED = 14_000  # training stream: seed TRAIN_SEED + run seed
HELD_OUT_SEED = 914_914  # the held-out images of benchmarks/vlm.py and the tests
VALIDATION_SEED = 535_914  # images for choosing sampler and recipe settings (held-out fonts, another seed)


@dataclass
class Sample:
    kind: str
    image: "PIL.Image.Image"  # noqa: F821
    question: str
    answer: str


def available_fonts(names: tuple[str, ...]) -> list[str]:
    """The font files of `names` found on this machine (paths), plus Pillow's built-in font for training sets."""
    found = []
    for name in names:
        for folder in FONT_DIRS:
            if (folder / name).is_file():
                found.append(str(folder / name))
                break
    return found


@lru_cache(maxsize=512)
def _font(name: str, size: int):
    from PIL import ImageFont

    if name == BUILTIN_FONT:
        return ImageFont.load_default(size)
    return ImageFont.truetype(name, size)


def fonts_for(held_out: bool) -> list[str]:
    if held_out:
        fonts = available_fonts(HELD_OUT_FONTS)
        return fonts or [BUILTIN_FONT]
    return available_fonts(TRAIN_FONTS) + [BUILTIN_FONT]


# ------------------------------------------------------------------------------------------------- drawing
def _canvas(rng: random.Random, held_out: bool):
    """A light background of a random size and aspect ratio."""
    from PIL import Image

    lo, hi = (88, 200) if held_out else (96, 192)
    w = rng.randint(lo, hi)
    h = int(w * rng.uniform(0.75, 1.33))
    shade = rng.randint(215, 255)
    tint = tuple(min(255, shade + rng.randint(-12, 12)) for _ in range(3))
    return Image.new("RGB", (w, h), tint)


def _finish(image, rng: random.Random, held_out: bool):
    """Gaussian pixel noise (std up to 10 levels on held-out images, 8 in training)."""
    std = rng.uniform(0, 10 if held_out else 8)
    if std < 1:
        return image
    arr = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, std, arr.shape)
    from PIL import Image

    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def _dark(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 90) for _ in range(3))


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 25) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _text(image, text: str, rng: random.Random, fonts: list[str], height_share: tuple[float, float]):
    """Draw `text` in a random font, sized to a share of the image height, at a random position that fits."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    w, h = image.size
    font_name = rng.choice(fonts)
    size = max(8, int(h * rng.uniform(*height_share)))
    while True:
        font = _font(font_name, size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if (right - left) <= w - 8 and (bottom - top) <= h - 8 or size <= 8:
            break
        size = int(size * 0.9)
    x = rng.randint(4, max(4, w - 4 - (right - left))) - left
    y = rng.randint(4, max(4, h - 4 - (bottom - top))) - top
    draw.text((x, y), text, fill=_dark(rng), font=font)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r = r * 0.8
    elif shape == "triangle":
        corners = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    else:  # star: five points, inner radius 0.45
        corners = [((1 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                    (1 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in corners]


def draw_shape(rng: random.Random, held_out: bool) -> tuple["PIL.Image.Image", str, str]:  # noqa: F821
    from PIL import ImageDraw

    image = _canvas(rng, held_out)
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    w, h = image.size
    r = min(w, h) * rng.uniform(0.18, 0.36)
    cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
    fill = _jitter(COLOURS[colour], rng)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, math.radians(rng.uniform(-15, 15))), fill=fill)
    return image, shape, colour


def draw_dots(rng: random.Random, held_out: bool) -> tuple["PIL.Image.Image", int]:  # noqa: F821
    from PIL import ImageDraw

    n = rng.randint(1, 9)
    while True:  # a fresh canvas until all n dots fit apart
        image = _canvas(rng, held_out)
        w, h = image.size
        r = min(w, h) * rng.uniform(0.04, 0.07)
        centres: list[tuple[float, float]] = []
        for _ in range(400):
            c = (rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2))
            if all(math.dist(c, o) > 2.6 * r for o in centres):
                centres.append(c)
                if len(centres) == n:
                    break
        if len(centres) == n:
            break
    draw = ImageDraw.Draw(image)
    fill = _jitter(rng.choice(list(COLOURS.values())), rng) if rng.random() < 0.7 else _dark(rng)
    for cx, cy in centres:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    return image, n


def draw_chart(rng: random.Random, held_out: bool, fonts: list[str]) -> tuple["PIL.Image.Image", str]:  # noqa: F821
    """3-4 vertical bars on a baseline, a letter under each; the tallest is at least 15% taller than the rest."""
    from PIL import ImageDraw

    image = _canvas(rng, held_out)
    w, h = image.size
    n = rng.choice((3, 4))
    tallest = rng.randrange(n)
    heights = [rng.uniform(0.15, 0.8) for _ in range(n)]
    heights[tallest] = min(1.0, max(heights) * rng.uniform(1.15, 1.4))
    heights = [min(x, heights[tallest] / 1.15) if i != tallest else x for i, x in enumerate(heights)]
    draw = ImageDraw.Draw(image)
    font = _font(rng.choice(fonts), max(9, int(h * rng.uniform(0.12, 0.17))))
    label_h = draw.textbbox((0, 0), "A", font=font)[3] + 4
    left, right = w * rng.uniform(0.04, 0.1), w * (1 - rng.uniform(0.04, 0.1))
    top, base = h * rng.uniform(0.04, 0.1), h - label_h - 4
    slot = (right - left) / n
    bar_w = slot * rng.uniform(0.45, 0.75)
    fill = _jitter(rng.choice(list(COLOURS.values())), rng)
    dark = _dark(rng)
    draw.line([(left, base), (right, base)], fill=dark, width=1)
    for i, frac in enumerate(heights):
        x0 = left + i * slot + (slot - bar_w) / 2
        draw.rectangle([x0, base - frac * (base - top), x0 + bar_w, base], fill=fill)
        lb = draw.textbbox((0, 0), BAR_LABELS[i], font=font)
        draw.text((x0 + bar_w / 2 - (lb[2] + lb[0]) / 2, base + 3 - lb[1]), BAR_LABELS[i], fill=dark, font=font)
    return image, BAR_LABELS[tallest]


def make_sample(kind: str, seed: int, index: int, held_out: bool = False) -> Sample:
    """The `index`-th sample of `kind` in stream `seed` (training fonts, or held-out ones)."""
    rng = random.Random(f"{kind}/{seed}/{index}/{int(held_out)}")
    fonts = fonts_for(held_out)
    if kind == "number":
        digits = rng.choice((1, 2, 3))
        value = rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)
        image = _canvas(rng, held_out)
        _text(image, str(value), rng, fonts, (0.25, 0.5))
        answer = str(value)
    elif kind == "word":
        answer = rng.choice(WORDS)
        image = _canvas(rng, held_out)
        _text(image, answer, rng, fonts, (0.22, 0.4))
    elif kind in ("shape", "colour"):
        image, shape, colour = draw_shape(rng, held_out)
        answer = shape if kind == "shape" else colour
    elif kind == "count":
        image, n = draw_dots(rng, held_out)
        answer = str(n)
    elif kind == "chart":
        image, answer = draw_chart(rng, held_out, fonts)
    else:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    return Sample(kind, _finish(image, rng, held_out), QUESTIONS[kind], answer)


def training_sample(seed: int, index: int, kinds: tuple[str, ...] = KINDS) -> Sample:
    """The stream the recipe trains on: kinds in turn, each with its own index."""
    kind = kinds[index % len(kinds)]
    return make_sample(kind, TRAIN_SEED + seed, index // len(kinds))


def held_out_samples(kind: str, n: int) -> list[Sample]:
    return [make_sample(kind, HELD_OUT_SEED, i, held_out=True) for i in range(n)]


def validation_samples(kind: str, n: int) -> list[Sample]:
    """Images drawn as the held-out ones (held-out fonts, sizes and noise) from their own seed: for tuning
    settings (benchmarks/vlm.py --validation), so that the held-out figures stay untouched."""
    return [make_sample(kind, VALIDATION_SEED, i, held_out=True) for i in range(n)]
