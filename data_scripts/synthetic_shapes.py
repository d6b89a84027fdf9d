"""Procedural shapes: an offline *pretraining* set for the flower ViT, disjoint from the flowers.

Every example is one object on a textured background, with an exact object mask. There
are 30 classes:

* 26 shape families -- polygons with 3, 4, 5, 6 and 8 corners, disks, ellipses, rings,
  crescents, hearts, crosses, arrows, letters, bars, frames, two-tone targets, ... -- told
  apart by their outline (corners, curvature, holes, an inner disk of another colour);
* 4 texture classes -- an irregular blob filled with stripes, dots, a checkerboard or a
  grid of lines -- told apart by the texture.

Colour is a cue too, as for the flowers, but never enough: each class draws the hue of
its first colour from its own range a quarter of the hue circle wide (:func:`hue_range`),
and every hue is shared by about a quarter of the classes; saturation, brightness, the
second colour and the fill (flat or shaded) are drawn at random.

Position, size and rotation are random; the backgrounds are the flower set's six families
(grass, leaves, sky, soil, brick, water) plus plain and gradient ones. No class is a flower:
nothing has petals arranged around a centre, and there are no stars (the class names are
disjoint from the flower species, see ``tests/test_data_shapes.py``).

Example ``i`` of split ``s`` is a pure function of ``(config, s, i)``: every random draw
comes from a numpy Generator seeded with ``(config.seed, split index, i)``.

Rendering: the object's coverage (and the coverage of its second-colour region) is drawn
with PIL at ``SUPERSAMPLE`` x the output size and box-filtered down; the silhouette is
binarised at 50 % coverage and the image is ``where(mask, object, background)``, so the
mask is exactly the set of pixels that show the object (holes show the background).

The builder is used directly (``datasets`` >= 4 does not run loading scripts)::

    builder = SyntheticShapes(config=SyntheticShapesConfig(train_per_class=150), cache_dir=...)
    builder.download_and_prepare(num_proc=2)
    ds = builder.as_dataset()  # DatasetDict: train / validation / test
"""

from __future__ import annotations

import colorsys
import dataclasses
import logging

import datasets
import numpy as np
from PIL import Image, ImageDraw

from .errors import UserError
from .synthetic_flowers import BACKGROUND_FAMILIES as FLOWER_BACKGROUND_FAMILIES
from .synthetic_flowers import SPLITS, SyntheticBuilder, SyntheticSplits, render_background, to_images

logger = logging.getLogger(__name__)

# Bump when the renderer changes: it is part of the cache key.
RENDERER_VERSION = "1.0.0"
SUPERSAMPLE = 4

# Texture classes: a blob whose fill pattern is the class.
TEXTURES = ("stripes", "dots", "checker", "grid")

# (class name, shape family, fill). fill "any": flat or shaded, drawn at random; a texture
# name: that pattern. Ordered so that the first few classes of a smaller config are varied.
CLASSES: tuple[tuple[str, str, str], ...] = (
    ("triangle", "triangle", "any"),
    ("disk", "disk", "any"),
    ("striped blob", "blob", "stripes"),
    ("square", "square", "any"),
    ("ring", "ring", "any"),
    ("plus cross", "cross", "any"),
    ("dotted blob", "blob", "dots"),
    ("pentagon", "pentagon", "any"),
    ("heart", "heart", "any"),
    ("arrow", "arrow", "any"),
    ("checkered blob", "blob", "checker"),
    ("hexagon", "hexagon", "any"),
    ("crescent", "crescent", "any"),
    ("letter L", "letter_l", "any"),
    ("gridded blob", "blob", "grid"),
    ("octagon", "octagon", "any"),
    ("ellipse", "ellipse", "any"),
    ("letter T", "letter_t", "any"),
    ("target", "target", "any"),
    ("diamond", "diamond", "any"),
    ("letter H", "letter_h", "any"),
    ("semicircle", "semicircle", "any"),
    ("square frame", "frame", "any"),
    ("letter Z", "letter_z", "any"),
    ("dotted disk", "eye", "any"),
    ("trapezoid", "trapezoid", "any"),
    ("chevron", "chevron", "any"),
    ("arc", "arc", "any"),
    ("bar", "bar", "any"),
    ("hourglass", "hourglass", "any"),
)
MAX_CLASSES = len(CLASSES)

# A class draws its first colour's hue from its own range, a quarter of the hue circle wide
# (see hue_range): colour narrows the class down and the outline (or texture) decides.
HUE_RANGE_WIDTH = 0.25  # of the hue circle: each hue is shared by about a quarter of the classes
_INVERSE_GOLDEN_RATIO = (5**0.5 - 1) / 2

BACKGROUND_FAMILIES: tuple[str, ...] = FLOWER_BACKGROUND_FAMILIES + ("plain", "gradient")

# Region codes of the shape polygons, drawn in order: later polygons paint over earlier ones.
_HOLE, _PRIMARY, _SECONDARY = 0, 1, 2


@dataclasses.dataclass
class SyntheticShapesConfig(SyntheticSplits, datasets.BuilderConfig):
    """Parameters of the synthetic shapes dataset.

    Attributes:
        num_classes: number of classes (the first ``num_classes`` of the table), 2..MAX_CLASSES.
        image_size: side of the square images in pixels.
        train_per_class / validation_per_class / test_per_class: examples per class and
            split; a split with 0 is not generated.
        seed: base seed of every random draw.
    """

    RENDERER_VERSION = RENDERER_VERSION

    name: str = "shapes"
    num_classes: int = MAX_CLASSES
    image_size: int = 64
    train_per_class: int = 150
    validation_per_class: int = 10
    test_per_class: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise UserError(f"num_classes must be in 2..{MAX_CLASSES}, got {self.num_classes}.")
        if self.image_size < 16:
            raise UserError(f"image_size must be >= 16 pixels, got {self.image_size}.")
        if self.train_per_class < 1:
            raise UserError(f"train_per_class must be >= 1, got {self.train_per_class}.")
        if self.validation_per_class < 0 or self.test_per_class < 0:
            raise UserError("validation_per_class and test_per_class must be >= 0.")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}.")

    def params(self) -> dict:
        """The parameters that determine the pixels (everything but name/version/paths)."""
        return {
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "train_per_class": self.train_per_class,
            "validation_per_class": self.validation_per_class,
            "test_per_class": self.test_per_class,
            "seed": self.seed,
        }



def class_names(num_classes: int = MAX_CLASSES) -> list[str]:
    """Names of the first ``num_classes`` classes."""
    return [name for name, _, _ in CLASSES[:num_classes]]


# --------------------------------------------------------------------------------------
# Example specification: every random choice that is not texture noise.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """Every random choice of one example, drawn before any pixel is rendered.

    Attributes:
        label: class index (balanced: ``index % num_classes``).
        background_family: index into BACKGROUND_FAMILIES.
        primary_rgb / secondary_rgb: the object's two colours, floats in [0, 1].
        fill: "flat", "shaded" or one of TEXTURES.
        radius: radius of the disk that holds the object, in output pixels.
        centre_yx: object centre in output pixels.
        rotation: rotation in radians.
        shape_seed / background_seed: seeds of the shape's own parameters (aspect, hole
            size, ...), the fill pattern and noise, and of the background texture.
    """

    label: int
    background_family: int
    primary_rgb: tuple[float, float, float]
    secondary_rgb: tuple[float, float, float]
    fill: str
    radius: float
    centre_yx: tuple[float, float]
    rotation: float
    shape_seed: int
    background_seed: int


def hue_range(label: int) -> tuple[float, float]:
    """Hue range of a class's first colour, as (start, end) in turns (end > start; wrap mod 1).

    Class ``c`` is centred at ``c / golden ratio`` (mod 1), so any number of classes spreads
    evenly round the hue circle, and is HUE_RANGE_WIDTH wide: every hue is shared by about
    ``num_classes * HUE_RANGE_WIDTH`` classes.
    """
    centre = (label * _INVERSE_GOLDEN_RATIO) % 1.0
    return centre - HUE_RANGE_WIDTH / 2, centre + HUE_RANGE_WIDTH / 2


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def sample_spec(config: SyntheticShapesConfig, split: str, index: int) -> ShapeSpec:
    """Draw every random choice of example ``index`` of ``split`` (no rendering).

    Args:
        config: dataset parameters.
        split: "train", "validation" or "test".
        index: example index within the split.

    Returns:
        The example's specification.
    """
    config.check_index(split, index)
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    label = index % config.num_classes
    _, _, class_fill = CLASSES[label]
    family = int(rng.integers(len(BACKGROUND_FAMILIES)))

    lo, hi = hue_range(label)
    hue, saturation, value = rng.uniform(lo, hi), rng.uniform(0.35, 1.0), rng.uniform(0.5, 1.0)
    primary = _hsv(hue, saturation, value)
    if class_fill in TEXTURES or rng.random() < 0.5:  # a contrasting hue
        secondary = _hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.35, 1.0), rng.uniform(0.5, 1.0))
    else:  # the same hue, much darker or much lighter
        dark = rng.random() < 0.5
        secondary = _hsv(hue, saturation * rng.uniform(0.3, 0.8), value * rng.uniform(0.2, 0.45) if dark else 1.0)
    if class_fill in TEXTURES and rng.random() < 0.5:
        primary, secondary = secondary, primary
    fill = class_fill if class_fill in TEXTURES else ("flat" if rng.random() < 0.5 else "shaded")

    size = config.image_size
    radius = float(min(size * rng.uniform(0.22, 0.46), size / 2 - 1.5))
    # Whole object inside the image (every shape fits in its disk of ``radius``).
    cy = rng.uniform(radius + 1, size - radius - 1)
    cx = rng.uniform(radius + 1, size - radius - 1)
    rotation = rng.uniform(0, 2 * np.pi)
    shape_seed, background_seed = (int(v) for v in rng.integers(0, 2**31 - 1, 2))
    return ShapeSpec(
        label=label,
        background_family=family,
        primary_rgb=primary,
        secondary_rgb=secondary,
        fill=fill,
        radius=radius,
        centre_yx=(float(cy), float(cx)),
        rotation=float(rotation),
        shape_seed=shape_seed,
        background_seed=background_seed,
    )


# --------------------------------------------------------------------------------------
# Shape geometry: polygons in unit coordinates, inside the unit disk.
# --------------------------------------------------------------------------------------


def _ngon(n: int, radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0), phase: float = 0.0) -> np.ndarray:
    """Regular ``n``-gon with its corners on a circle. Returns [n, 2] (x, y)."""
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def _circle(radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    return _ngon(64, radius, centre)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _annulus_sector(r_out: float, r_in: float, start: float, stop: float) -> np.ndarray:
    t = np.linspace(start, stop, 48)
    outer = np.stack([r_out * np.cos(t), r_out * np.sin(t)], axis=1)
    inner = np.stack([r_in * np.cos(t[::-1]), r_in * np.sin(t[::-1])], axis=1)
    return np.concatenate([outer, inner])


# Shape families by how their outline is built; shape_polygons dispatches on these groups.
_POLYGON_CORNERS = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
_ANGULAR_FAMILIES = (*_POLYGON_CORNERS, "frame", "diamond", "trapezoid", "chevron", "hourglass")
_ROUND_FAMILIES = ("disk", "ellipse", "ring", "crescent", "heart", "semicircle", "target", "eye", "arc", "blob")
_STROKE_FAMILIES = ("cross", "arrow", "letter_l", "letter_t", "letter_h", "letter_z", "bar")


def _angular_polygons(family: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Straight-edged outlines: regular polygons, the square frame, diamond, trapezoid, chevron, hourglass."""
    P, H = _PRIMARY, _HOLE
    if family in _POLYGON_CORNERS:
        return [(_ngon(_POLYGON_CORNERS[family]), P)]
    if family == "frame":
        return [(_ngon(4, phase=np.pi / 4), P), (_ngon(4, rng.uniform(0.5, 0.65), phase=np.pi / 4), H)]
    if family == "diamond":
        a = rng.uniform(0.45, 0.6)
        return [(np.array([[1.0, 0.0], [0.0, a], [-1.0, 0.0], [0.0, -a]]), P)]
    if family == "trapezoid":
        return [(np.array([[-0.9, 0.45], [0.9, 0.45], [0.42, -0.45], [-0.42, -0.45]]) * 0.95, P)]
    if family == "chevron":
        t = rng.uniform(0.4, 0.55)
        pts = np.array([[-0.9, -0.6], [0.0, 0.2], [0.9, -0.6], [0.9, -0.6 + t], [0.0, 0.2 + t], [-0.9, -0.6 + t]])
        return [(pts * 0.9, P)]
    if family == "hourglass":
        pts = np.array([[-0.7, -0.8], [0.7, -0.8], [0.12, 0.0], [0.7, 0.8], [-0.7, 0.8], [-0.12, 0.0]])
        return [(pts * 0.92, P)]
    raise AssertionError(f"{family!r} is not an angular shape family")


def _round_polygons(family: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Curved outlines: disks, ellipse, ring, crescent, heart, semicircle, target, eye, arc and the blob."""
    P, S, H = _PRIMARY, _SECONDARY, _HOLE
    if family == "disk":
        return [(_circle(), P)]
    if family == "ellipse":
        return [(_circle() * [1.0, rng.uniform(0.4, 0.65)], P)]
    if family == "ring":
        return [(_circle(), P), (_circle(rng.uniform(0.45, 0.65)), H)]
    if family == "crescent":
        r = rng.uniform(0.8, 0.92)
        return [(_circle(), P), (_circle(r, (1.0 - r + rng.uniform(0.25, 0.4), 0.0)), H)]
    if family == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 2.5
        return [(np.stack([x, y], axis=1) / 17.5, P)]
    if family == "semicircle":
        t = np.linspace(np.pi, 2 * np.pi, 48)
        return [(np.stack([0.92 * np.cos(t), 0.35 + 0.92 * np.sin(t)], axis=1), P)]
    if family == "target":
        return [(_circle(), P), (_circle(0.7), S), (_circle(0.42), P), (_circle(0.16), S)]
    if family == "eye":
        return [(_circle(), P), (_circle(rng.uniform(0.25, 0.4)), S)]
    if family == "arc":
        span = np.deg2rad(rng.uniform(200, 250))
        return [(_annulus_sector(1.0, rng.uniform(0.5, 0.65), -span / 2, span / 2), P)]
    if family == "blob":  # a potato: low harmonics only, nothing radial or petal-like
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        r = np.full_like(t, 0.85)
        for k in (1, 2, 3):
            r += rng.uniform(0.0, 0.05) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        return [(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), P)]
    raise AssertionError(f"{family!r} is not a round shape family")


def _stroke_polygons(family: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Outlines made of bars: the plus cross, arrow, letters L, T, H and Z, and the bar itself."""
    P = _PRIMARY
    if family == "cross":
        w = rng.uniform(0.28, 0.42) / 2
        return [(_rect(-0.95, -w, 0.95, w), P), (_rect(-w, -0.95, w, 0.95), P)]
    if family == "arrow":
        w = rng.uniform(0.15, 0.22)
        head = np.array([[0.15, -0.6], [0.97, 0.0], [0.15, 0.6]])
        return [(_rect(-0.97, -w, 0.2, w), P), (head, P)]
    if family == "letter_l":
        t = rng.uniform(0.28, 0.38)
        return [(_rect(-0.55, -0.78, -0.55 + t, 0.78), P), (_rect(-0.55, 0.78 - t, 0.55, 0.78), P)]
    if family == "letter_t":
        t = rng.uniform(0.28, 0.38)
        return [(_rect(-0.68, -0.72, 0.68, -0.72 + t), P), (_rect(-t / 2, -0.72, t / 2, 0.72), P)]
    if family == "letter_h":
        t = rng.uniform(0.24, 0.32)
        return [
            (_rect(-0.6, -0.78, -0.6 + t, 0.78), P),
            (_rect(0.6 - t, -0.78, 0.6, 0.78), P),
            (_rect(-0.6, -t / 2, 0.6, t / 2), P),
        ]
    if family == "letter_z":
        t = rng.uniform(0.24, 0.32)
        diagonal = np.array([[0.6 - 1.2 * t, -0.72 + t], [0.6, -0.72 + t], [-0.6 + 1.2 * t, 0.72 - t], [-0.6, 0.72 - t]])
        return [(_rect(-0.6, -0.72, 0.6, -0.72 + t), P), (_rect(-0.6, 0.72 - t, 0.6, 0.72), P), (diagonal, P)]
    if family == "bar":
        h = rng.uniform(0.12, 0.2)
        return [(_rect(-0.95, -h, 0.95, h), P)]
    raise AssertionError(f"{family!r} is not a stroke shape family")


def shape_polygons(family: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """The polygons of one object of ``family``, in unit coordinates inside the unit disk.

    Args:
        family: shape family (second column of the class table).
        rng: source of the family's own parameters (aspect ratio, hole size, ...).

    Returns:
        ``[(points [N, 2] (x, y), region)]`` drawn in order; region is 1 (object, first
        colour), 2 (object, second colour) or 0 (a hole: background shows through).
    """
    if family in _ANGULAR_FAMILIES:
        return _angular_polygons(family, rng)
    if family in _ROUND_FAMILIES:
        return _round_polygons(family, rng)
    if family in _STROKE_FAMILIES:
        return _stroke_polygons(family, rng)
    raise AssertionError(f"unknown shape family {family!r}")


# --------------------------------------------------------------------------------------
# Object layer.
# --------------------------------------------------------------------------------------


def _pattern(fill: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Second-colour share of a fill pattern (0 = first colour, 1 = second) at rotated coordinates."""
    period = rng.uniform(4.0, 7.0) * size / 64
    if fill == "stripes":
        return (np.mod(u / period, 1.0) < rng.uniform(0.4, 0.55)).astype(np.float32)
    if fill == "dots":
        du, dv = np.mod(u / period, 1.0) - 0.5, np.mod(v / period, 1.0) - 0.5
        return (np.hypot(du, dv) < rng.uniform(0.25, 0.35)).astype(np.float32)
    if fill == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if fill == "grid":
        width = rng.uniform(0.22, 0.3)
        return ((np.mod(u / period, 1.0) < width) | (np.mod(v / period, 1.0) < width)).astype(np.float32)
    raise AssertionError(f"unknown fill {fill!r}")


def render_object_layer(config: SyntheticShapesConfig, spec: ShapeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Render the object of ``spec`` on nothing.

    Args:
        config: dataset parameters.
        spec: the example's specification.

    Returns:
        ``(colours, mask)``: object colours float32 [S, S, 3] in [0, 1] (black outside the
        mask) and the binary object mask bool [S, S] (coverage >= 50 %).
    """
    size, k = config.image_size, SUPERSAMPLE
    rng = np.random.default_rng(spec.shape_seed)
    _, family, _ = CLASSES[spec.label]
    cos, sin = np.cos(spec.rotation), np.sin(spec.rotation)
    cy, cx = spec.centre_yx

    cover = Image.new("L", (size * k, size * k), 0)
    second = Image.new("L", (size * k, size * k), 0)
    draw_cover, draw_second = ImageDraw.Draw(cover), ImageDraw.Draw(second)
    for points, region in shape_polygons(family, rng):
        x = cx + spec.radius * (cos * points[:, 0] - sin * points[:, 1])
        y = cy + spec.radius * (sin * points[:, 0] + cos * points[:, 1])
        xy = [(float(a), float(b)) for a, b in zip(x * k, y * k)]
        draw_cover.polygon(xy, fill=0 if region == _HOLE else 255)
        draw_second.polygon(xy, fill=255 if region == _SECONDARY else 0)
    coverage = np.asarray(cover.reduce(k), dtype=np.float32) / 255.0  # [S, S]
    second_share = np.asarray(second.reduce(k), dtype=np.float32) / 255.0  # [S, S]
    mask = coverage >= 0.5

    # Output-pixel coordinates in the object's rotated frame.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = cos * (xx - cx) + sin * (yy - cy)
    v = -sin * (xx - cx) + cos * (yy - cy)
    primary = np.asarray(spec.primary_rgb, dtype=np.float32)
    secondary = np.asarray(spec.secondary_rgb, dtype=np.float32)
    if spec.fill in TEXTURES:
        share = _pattern(spec.fill, u, v, rng, size)
    else:
        share = second_share / np.maximum(coverage, 1e-6)
    colours = (1 - share)[..., None] * primary + share[..., None] * secondary
    if spec.fill == "shaded":  # light falling off along a random direction of the object's frame
        direction = rng.uniform(0, 2 * np.pi)
        t = (np.cos(direction) * u + np.sin(direction) * v) / (2 * spec.radius) + 0.5
        colours = colours * (rng.uniform(0.45, 0.7) + rng.uniform(0.3, 0.55) * np.clip(t, 0, 1))[..., None]
    colours = colours * rng.uniform(0.94, 1.06, (size, size, 1)).astype(np.float32)  # fine grain
    colours = np.where(mask[..., None], np.clip(colours, 0, 1), 0).astype(np.float32)
    return colours, mask


# --------------------------------------------------------------------------------------
# Background layer: the flower set's families plus two plain ones.
# --------------------------------------------------------------------------------------


def _bg_plain(rng: np.random.Generator, s: int) -> np.ndarray:
    """One muted random colour with soft light patches. Returns [s, s, 3]."""
    base = np.asarray(_hsv(rng.uniform(0, 1), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.9)), dtype=np.float32)
    grid = rng.random((4, 4)).astype(np.float32)
    light = np.asarray(Image.fromarray(grid, mode="F").resize((s, s), Image.BILINEAR))
    return base * (0.85 + 0.3 * light)[..., None]


def _bg_gradient(rng: np.random.Generator, s: int) -> np.ndarray:
    """A linear blend of two random colours along a random direction. Returns [s, s, 3]."""
    a = np.asarray(_hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.7), rng.uniform(0.3, 0.95)), dtype=np.float32)
    b = np.asarray(_hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.7), rng.uniform(0.3, 0.95)), dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1) - 0.5
    t = np.clip(np.cos(angle) * xx + np.sin(angle) * yy + 0.5, 0, 1)[..., None]
    return (1 - t) * a + t * b


def render_background_layer(config: SyntheticShapesConfig, spec: ShapeSpec) -> np.ndarray:
    """Render the background of ``spec`` (the whole image, no object). Returns float32 [S, S, 3]."""
    rng = np.random.default_rng(spec.background_seed)
    family = BACKGROUND_FAMILIES[spec.background_family]
    if family == "plain":
        bg = _bg_plain(rng, config.image_size)
    elif family == "gradient":
        bg = _bg_gradient(rng, config.image_size)
    else:
        return render_background(family, rng, config.image_size)
    return np.clip(bg, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------
# Public rendering API.
# --------------------------------------------------------------------------------------


def render_example(config: SyntheticShapesConfig, split: str, index: int) -> tuple[Image.Image, Image.Image, int]:
    """Render example ``index`` of ``split``.

    Args:
        config: dataset parameters.
        split: "train", "validation" or "test".
        index: example index within the split.

    Returns:
        ``(image, mask, label)``: RGB image, "L" mask (255 = object), class index.
    """
    spec = sample_spec(config, split, index)
    colours, mask = render_object_layer(config, spec)  # [S, S, 3], [S, S]
    background = render_background_layer(config, spec)  # [S, S, 3]
    image = np.where(mask[..., None], colours, background)
    return *to_images(image, mask), spec.label


# --------------------------------------------------------------------------------------
# datasets builder.
# --------------------------------------------------------------------------------------


class SyntheticShapes(SyntheticBuilder):
    """``datasets`` builder of the synthetic shapes; use it directly (see module doc)."""

    BUILDER_CONFIG_CLASS = SyntheticShapesConfig
    VERSION = datasets.Version(RENDERER_VERSION)
    DESCRIPTION = "Procedural shapes and textures with exact masks (flower-vit-lens pretraining set)."
    class_names = staticmethod(class_names)
    render = staticmethod(render_example)
