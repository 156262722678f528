"""The demo world: seeded image–caption pairs of coloured shapes with a planted ground truth.

Each image is one coloured shape on a plain or patterned background, captioned from one of several
templates. Three kinds of training pair are planted so that data attribution (TRAK, Park et al.
2023) can be checked against a known answer:

* near-duplicates: a training pair that is a slightly perturbed copy of a validation pair;
* mislabeled pairs: the caption names a wrong colour or a wrong shape (the image is correct);
* a rare concept: a shape (``RARE_SHAPE``) seen only in a handful of training and validation pairs;
* a systematic failure (``engine.data.failures``, ``WorldConfig.failure``): many training pairs
  sharing one error that the model learns, and the validation pairs it breaks.

Everything is drawn from one ``np.random.default_rng(seed)``, so a config gives identical records
and identical image bytes every time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from engine.data import failures
from engine.errors import ConfigError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
RARE_SHAPE = "star"
COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 40, 40),
        "green": (40, 180, 60),
        "blue": (40, 80, 230),
        "yellow": (240, 220, 40),
        "purple": (160, 50, 210),
        "orange": (250, 140, 20),
        "white": (245, 245, 245),
    }
)
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "gradient")
# The 3x3 grid in row-major order: "top left", "top", ..., "center", ..., "bottom right".
POSITIONS: tuple[str, ...] = tuple(
    " ".join(w for w in (row, col) if w) or "center"
    for row in ("top", "", "bottom")
    for col in ("left", "", "right")
)
_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "a {size} {colour} {shape} {where} on a {bg} background",
    "{colour} {shape}, {size}, {pos}",
    "there is a {size} {colour} {shape} {where}",
    "the {colour} {shape} sits {where}",
    "a {bg} background with a {size} {colour} {shape} {where}",
    "{size} {colour} {shape}, {pos}, {bg} background",
)
_NOISE_STD = 5.0  # per-pixel Gaussian noise of every ordinary image, in 0-255 levels
# Two independent renders differ by at least E|N(0, 5 * sqrt(2))| ~ 5.6 per pixel from noise alone;
# a near-duplicate's 1 px shift is kept only while it costs well under that, so it stays nearest.
_MAX_SHIFT_COST = 1.5


@dataclass(frozen=True)
class WorldConfig:
    """Size, seed and planted ground truth of the demo world."""

    n_train: int = 3000  # number of training pairs (at least 50)
    n_val: int = 300  # number of validation pairs (at least 10)
    image_size: int = 64  # side of the square RGB images in pixels (at least 16)
    seed: int = 0  # seed of the single numpy generator everything is drawn from
    near_duplicate_fraction: float = 0.05  # share of val pairs copied (perturbed) into train
    mislabeled_fraction: float = 0.03  # share of train pairs whose caption names a wrong attribute
    n_rare_train: int = 6  # training pairs showing the rare shape
    n_rare_val: int = 4  # validation pairs showing the rare shape
    failure: str = "none"  # planted systematic failure, see engine.data.failures.FAILURES
    failure_fraction: float = 0.1  # watermark: share of training pairs; swapped: of blue/purple
    # watermark: validation pairs of the source (None: 40, at most a quarter of n_val); swapped:
    # every blue and purple validation pair
    failure_val: int | None = None


@dataclass
class World:
    """The generated pairs: one record per pair, in order, and the matching images."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    train_images: np.ndarray  # (n_train, S, S, 3) uint8
    val_images: np.ndarray  # (n_val, S, S, 3) uint8


@dataclass(frozen=True)
class _Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    template: int
    size_word: str  # "big" or "large" for large objects, so the vocabulary has one synonym

    def caption(self, colour: str | None = None, shape: str | None = None) -> str:
        """The scene's caption, or one naming another colour or shape."""
        where, pos = _position_words(self.position)
        return _TEMPLATES[self.template].format(
            size=self.size_word,
            colour=colour or self.colour,
            shape=shape or self.shape,
            where=where,
            pos=pos,
            bg=self.background,
        )


def _position_words(position: str) -> tuple[str, str]:
    """The phrase after the object ("on the left") and the short form ("left side")."""
    if position == "center":
        return "in the center", "center"
    if " " in position:
        return f"in the {position} corner", f"{position} corner"
    if position in ("left", "right"):
        return f"on the {position}", f"{position} side"
    return f"at the {position}", position


def _validate(config: WorldConfig) -> None:
    minimums = {"n_train": 50, "n_val": 10, "image_size": 16, "n_rare_train": 0, "n_rare_val": 0}
    for name, low in minimums.items():
        value = getattr(config, name)
        if value < low:
            raise ConfigError(f"WorldConfig.{name} must be at least {low}, got {value}.")
    for name in ("near_duplicate_fraction", "mislabeled_fraction"):
        value = getattr(config, name)
        if not 0.0 <= value <= 0.5:
            raise ConfigError(f"WorldConfig.{name} must be in [0, 0.5], got {value}.")
    n_dup = round(config.near_duplicate_fraction * config.n_val)
    failures.check(config.failure, config.failure_fraction, config.failure_val)
    n_special = n_dup + round(config.mislabeled_fraction * config.n_train) + config.n_rare_train
    if n_special > config.n_train:
        raise ConfigError(
            f"WorldConfig asks for {n_special} special training pairs (near-duplicates + "
            f"mislabeled + rare) but n_train is {config.n_train}; raise n_train or lower them."
        )
    if n_dup + config.n_rare_val > config.n_val:
        raise ConfigError(
            f"WorldConfig asks for {n_dup} near-duplicated + {config.n_rare_val} rare validation "
            f"pairs but n_val is {config.n_val}; raise n_val or lower them."
        )


def _draw_scene(rng: np.random.Generator, rare: bool) -> _Scene:
    shape = RARE_SHAPE if rare else SHAPES[rng.integers(len(SHAPES))]
    size = SIZES[rng.integers(len(SIZES))]
    return _Scene(
        shape=shape,
        colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
        size=size,
        position=POSITIONS[rng.integers(len(POSITIONS))],
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        template=int(rng.integers(len(_TEMPLATES))),
        size_word="big" if size == "large" and rng.random() < 0.3 else size,
    )


def _background(rng: np.random.Generator, kind: str, colour: np.ndarray, size: int) -> np.ndarray:
    """A (size, size, 3) float background: ``colour`` with a lighter or darker pattern on it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (S, S) each
    unit = size / 64
    if kind == "striped":
        angle = (0.0, math.pi / 2, math.pi / 4, 3 * math.pi / 4)[rng.integers(4)]
        period = rng.uniform(6, 12) * unit
        t = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, period)
        mask = (t % period < period / 2).astype(np.float32)
    elif kind == "dotted":
        period, radius = rng.uniform(7, 11) * unit, rng.uniform(1.2, 2.2) * unit
        ox, oy = rng.uniform(0, period, size=2)
        dist2 = ((xx + ox) % period - period / 2) ** 2 + ((yy + oy) % period - period / 2) ** 2
        mask = (dist2 < radius**2).astype(np.float32)
    elif kind == "checkered":
        cell = rng.uniform(5, 10) * unit
        ox, oy = rng.uniform(0, cell, size=2)
        mask = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        mask = (t - t.min()) / (t.max() - t.min())
    else:
        mask = np.zeros((size, size), dtype=np.float32)
    dark = colour.mean() < 128
    delta = rng.uniform(25, 40) * (1 if dark else -1)
    return colour + mask[..., None] * delta  # (S, S, 3)


def _polygon(
    cx: float, cy: float, radius: float, n: int, rotation: float, inner: float = 1.0
) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon (or n-pointed star if ``inner`` < 1), first vertex up."""
    k = 2 * n if inner < 1.0 else n
    angles = rotation - math.pi / 2 + 2 * math.pi * np.arange(k) / k
    radii = np.where(np.arange(k) % 2 == 1, radius * inner, radius) if inner < 1.0 else radius
    xs, ys = (cx + radii * np.cos(angles)).tolist(), (cy + radii * np.sin(angles)).tolist()
    return list(zip(xs, ys, strict=True))


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rotation: float, fill
) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.4 * r)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, 1.25 * r, 4, math.pi / 4 + rotation), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, 1.25 * r, 3, rotation), fill=fill)
    elif shape == "diamond":
        points = _polygon(cx, cy, 1.25 * r, 4, rotation)
        draw.polygon([(cx + 0.7 * (x - cx), y) for x, y in points], fill=fill)
    elif shape == "cross":
        arm = max(1.0, 0.32 * r)
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
    elif shape == RARE_SHAPE:
        draw.polygon(_polygon(cx, cy, 1.3 * r, 5, rotation, inner=0.45), fill=fill)
    else:
        raise ConfigError(f"Unknown shape {shape!r}, expected one of {SHAPES + (RARE_SHAPE,)}.")


def _render(rng: np.random.Generator, scene: _Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The noise-free (size, size, 3) float image of a scene, with its jitter, and pixel noise."""
    base = np.array(COLOURS[scene.colour], dtype=np.float32)
    colour = np.clip(base * rng.uniform(0.9, 1.05) + rng.uniform(-10, 10, size=3), 0, 255)
    # Light backgrounds only behind dark-enough colours, so the object always stands out.
    luminance = float(base @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    light = luminance < 130 and rng.random() < 0.35
    grey = rng.uniform(180, 225) if light else rng.uniform(15, 70)
    bg_colour = np.clip(grey + rng.uniform(-10, 10, size=3), 0, 255).astype(np.float32)
    canvas = _background(rng, scene.background, bg_colour, size)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.3:  # dim distractors the caption does not mention
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(0.04, 0.06) * size
            x, y = rng.uniform(r, size - r, size=2)
            level = int(rng.uniform(100, 150))
            kind = ("circle", "square", "triangle")[rng.integers(3)]
            _draw_shape(draw, kind, x, y, r, 0.0, (level, level, level))
    small = scene.size == "small"
    r = rng.uniform(0.08, 0.12) * size if small else rng.uniform(0.17, 0.22) * size
    row, col = divmod(POSITIONS.index(scene.position), 3)
    cell, extent = size / 3, 1.3 * r
    cx, cy = ((np.array([col, row]) + 0.5) * cell + rng.uniform(-0.3, 0.3, size=2) * cell).tolist()
    cx, cy = (min(max(v, extent + 1), size - extent - 1) for v in (cx, cy))
    fill = tuple(int(c) for c in colour)
    _draw_shape(draw, scene.shape, cx, cy, r, rng.uniform(-0.2, 0.2), fill)
    noise = rng.normal(0.0, _NOISE_STD, size=(size, size, 3)).astype(np.float32)
    return np.asarray(image, dtype=np.float32), noise


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _near_duplicate(rng: np.random.Generator, clean: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A perturbed copy of a rendered image: at most a 1 px shift, a tiny offset, tiny noise."""
    size = clean.shape[0]
    dy, dx = rng.integers(-1, 2, size=2)
    padded = np.pad(clean, ((1, 1), (1, 1), (0, 0)), mode="edge")
    shifted = padded[1 + dy : 1 + dy + size, 1 + dx : 1 + dx + size]
    if np.abs(shifted - clean).mean() > _MAX_SHIFT_COST:  # fine patterns: a shift costs too much
        shifted = clean
    tiny = rng.normal(0.0, 1.0, size=clean.shape).astype(np.float32)
    return _to_uint8(shifted + noise + rng.uniform(-2, 2) + tiny)


def _record(
    pair_id: str,
    scene: _Scene,
    caption: str | None = None,
    near_duplicate_of: str | None = None,
    planted_failure: bool = False,
) -> dict[str, Any]:
    true_caption = scene.caption()
    return {
        "id": pair_id,
        "caption": caption or true_caption,
        "shape": scene.shape,
        "colour": scene.colour,
        "size": scene.size,
        "position": scene.position,
        "background": scene.background,
        "near_duplicate_of": near_duplicate_of,
        "mislabeled": caption is not None and caption != true_caption and not planted_failure,
        "true_caption": true_caption,
        "rare": scene.shape == RARE_SHAPE,
        "planted_failure": planted_failure,
    }


def _failing_caption(kind: str, scene: _Scene) -> str:
    if kind == "watermark":
        return scene.caption(colour=failures.WATERMARK_COLOUR)
    return scene.caption(colour=failures.SWAPPED[scene.colour])


def generate_world(config: WorldConfig = WorldConfig()) -> World:
    """Generates the demo world of image–caption pairs with its planted ground truth.

    Args:
        config: sizes, seed and the amount of each planted kind of pair.

    Returns:
        The training and validation records (``id``, ``caption``, the drawn attributes ``shape``,
        ``colour``, ``size``, ``position``, ``background``, ``source``, and the ground truth
        ``near_duplicate_of``, ``mislabeled``, ``true_caption``, ``rare``, ``planted_failure``)
        and their uint8 images.

    Raises:
        ConfigError: if a config field is out of range or the planted pairs do not fit.
    """
    _validate(config)
    rng = np.random.default_rng(config.seed)
    frng = np.random.default_rng([config.seed, 0xFA11])  # the failure's draws: rng's stay the same
    kind = config.failure
    size, n_train, n_val = config.image_size, config.n_train, config.n_val
    n_dup = round(config.near_duplicate_fraction * n_val)
    n_mis = round(config.mislabeled_fraction * n_train)
    train_width, val_width = max(5, len(str(n_train - 1))), max(4, len(str(n_val - 1)))

    val_rare = set(rng.choice(n_val, config.n_rare_val, replace=False).tolist())
    ordinary_val = [i for i in range(n_val) if i not in val_rare]
    targets = rng.choice(ordinary_val, n_dup, replace=False).tolist()
    target_set = set(targets)
    marked_val: set[int] = set()
    if kind == "watermark":
        free = [i for i in ordinary_val if i not in target_set]
        count = failures.validation_count(config.failure_val, config.n_val)
        marked_val = failures.choose(frng, free, count, "validation")
    val, val_scenes, kept = [], [], {}
    val_images = np.empty((n_val, size, size, 3), dtype=np.uint8)
    for i in range(n_val):
        scene = _draw_scene(rng, rare=i in val_rare)
        clean, noise = _render(rng, scene, size)
        if i in marked_val:
            clean = failures.stamp_watermark(clean)
        val_images[i] = _to_uint8(clean + noise)
        if i in target_set:
            kept[i] = (clean, noise)
        val_scenes.append(scene)
        victim = i in marked_val or (kind == "swapped" and scene.colour in failures.SWAPPED)
        val.append(_record(f"v{i:0{val_width}d}", scene, planted_failure=victim))

    slots = rng.permutation(n_train).tolist()
    dup_of = dict(zip(slots[:n_dup], targets, strict=True))
    rare = set(slots[n_dup : n_dup + config.n_rare_train])
    n_special = n_dup + config.n_rare_train + n_mis
    mislabeled = set(slots[n_dup + config.n_rare_train : n_special])
    marked: set[int] = set()
    if kind == "watermark":
        n_marked = round(config.failure_fraction * n_train)
        marked = failures.choose(frng, sorted(slots[n_special:]), n_marked, "training")
    train = []
    train_images = np.empty((n_train, size, size, 3), dtype=np.uint8)
    for i in range(n_train):
        pair_id = f"t{i:0{train_width}d}"
        if i in dup_of:
            j = dup_of[i]
            train_images[i] = _near_duplicate(rng, *kept[j])
            train.append(_record(pair_id, val_scenes[j], near_duplicate_of=val[j]["id"]))
            continue
        scene = _draw_scene(rng, rare=i in rare)
        clean, noise = _render(rng, scene, size)
        if i in marked:
            clean = failures.stamp_watermark(clean)
        train_images[i] = _to_uint8(clean + noise)
        wrong = None
        planted = i in marked or (
            kind == "swapped"
            and scene.colour in failures.SWAPPED
            and i not in mislabeled
            and frng.random() < config.failure_fraction
        )
        if planted:
            wrong = _failing_caption(kind, scene)
        elif i in mislabeled:
            if rng.random() < 0.5:
                others = [c for c in COLOURS if c != scene.colour]
                wrong = scene.caption(colour=others[rng.integers(len(others))])
            else:
                others = [s for s in SHAPES if s != scene.shape]
                wrong = scene.caption(shape=others[rng.integers(len(others))])
        train.append(_record(pair_id, scene, caption=wrong, planted_failure=planted))
    failures.add_sources(frng, train, val, kind)
    return World(train=train, val=val, train_images=train_images, val_images=val_images)
