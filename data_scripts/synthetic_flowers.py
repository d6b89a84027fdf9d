"""Procedural flowers: the project's embedded, offline default dataset.

Every example is a flower (petals + centre) on a textured background, with an exact
flower mask. Classes ("species") differ by petal count, petal shape, centre size and
centre colour, AND by petal hue; neighbouring species share about a third of their hue
range, so colour alone is not enough, as with real species.

Example ``i`` of split ``s`` is a pure function of ``(config, s, i)``: every random draw
comes from a numpy Generator seeded with ``(config.seed, split index, i)``, so generation is
reproducible and order-independent, and the background study can re-render any example
in pieces (:func:`render_variant`).

Rendering: the flower colour layer and its coverage are drawn at ``SUPERSAMPLE`` x the
output size and box-filtered down (anti-aliased colours inside the flower). The flower
silhouette is then binarised at 50 % coverage and the image is composited with that
binary mask, ``image = where(mask, flower, background)``. A hard silhouette keeps every
variant (flower on black, background only, flower on another background) an exact pixel
composition of the same two layers, so the background study compares like with like;
the mask is exactly the set of pixels that show the flower.

The builder is used directly (``datasets`` >= 4 does not run loading scripts)::

    builder = SyntheticFlowers(config=SyntheticFlowersConfig(num_classes=5), cache_dir=...)
    builder.download_and_prepare()
    ds = builder.as_dataset()  # DatasetDict: train / validation / test
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import hashlib
import io
import json
import logging
from typing import Optional

import datasets
import numpy as np
from PIL import Image, ImageDraw

from .errors import UserError

logger = logging.getLogger(__name__)

# Bump when the renderer changes: it is part of the cache key.
RENDERER_VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
SUPERSAMPLE = 3
# Shards per split, so that download_and_prepare(num_proc=...) can render in parallel.
_NUM_SHARDS = 8
BACKGROUND_MODES = ("random", "correlated")


@dataclasses.dataclass(frozen=True)
class Species:
    """Shape and colour signature of one synthetic flower class.

    Attributes:
        name: class name.
        num_petals: petals per flower (fixed per species).
        petal_shape: "round", "pointed", "notched" or "thin".
        petal_width: fraction of its angular sector a petal fills (1 = petals touch).
        centre_fraction: centre disk radius / petal length.
        centre_rgb: centre colour, floats in [0, 1].
    """

    name: str
    num_petals: int
    petal_shape: str
    petal_width: float
    centre_fraction: float
    centre_rgb: tuple[float, float, float]


# Ordered so that species next to each other on the hue axis (and so sharing hues)
# have clearly different shapes.
SPECIES: tuple[Species, ...] = (
    Species("black-eyed susan", 13, "thin", 0.62, 0.36, (0.25, 0.13, 0.05)),
    Species("star lily", 5, "pointed", 1.0, 0.13, (0.75, 0.85, 0.25)),
    Species("round poppy", 4, "round", 1.0, 0.24, (0.08, 0.05, 0.10)),
    Species("fringed pink", 6, "notched", 1.0, 0.14, (0.97, 0.95, 0.85)),
    Species("spider aster", 9, "thin", 0.42, 0.22, (1.0, 0.80, 0.10)),
    Species("trillium", 3, "pointed", 1.0, 0.16, (0.95, 0.90, 0.35)),
)
MAX_CLASSES = len(SPECIES)

BACKGROUND_FAMILIES: tuple[str, ...] = ("grass", "leaves", "sky", "soil", "brick", "water")
assert len(BACKGROUND_FAMILIES) == MAX_CLASSES, "one background family per possible class"

# Petal hues live on an arc from yellow (55 deg) through red and pink to blue (235 deg),
# skipping green and cyan, which are background colours.
_HUE_ARC_START_DEG = 55.0
_HUE_ARC_SPAN_DEG = 180.0
# Each class's hue range is 1.5 class spacings wide: it shares 1/3 of its range with
# each neighbour.
_HUE_RANGE_WIDTH = 1.5


class SyntheticSplits:
    """What the configs of the synthetic sets share: split sizes and a cache id from ``params()``.

    A config names its ``RENDERER_VERSION`` and the ``cache_prefix()`` of its cache id.
    """

    RENDERER_VERSION = RENDERER_VERSION

    def params(self) -> dict:
        raise NotImplementedError

    def cache_prefix(self) -> str:
        return f"{self.name}-{self.num_classes}c-{self.image_size}px"

    def cache_id(self) -> str:
        """Cache key: equal parameters (and renderer version) give the same id."""
        blob = json.dumps({"renderer": self.RENDERER_VERSION, **self.params()}, sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return f"{self.cache_prefix()}-{digest}"

    def num_examples(self, split: str) -> int:
        """Number of examples of ``split`` (balanced: per-class count x classes)."""
        per_class = {
            "train": self.train_per_class,
            "validation": self.validation_per_class,
            "test": self.test_per_class,
        }[split]
        return per_class * self.num_classes

    def check_index(self, split: str, index: int) -> None:
        """Raises ValueError unless ``index`` is an example of ``split``."""
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}.")
        n = self.num_examples(split)
        if not 0 <= index < n:
            raise UserError(f"index {index} out of range for split {split!r} with {n} examples.")


@dataclasses.dataclass
class SyntheticFlowersConfig(SyntheticSplits, datasets.BuilderConfig):
    """Parameters of the synthetic flower dataset (the ``--synthetic_*`` flags).

    Attributes:
        num_classes: number of species, 2..MAX_CLASSES.
        image_size: side of the square images in pixels.
        train_per_class / validation_per_class / test_per_class: examples per class and
            split; a split with 0 is not generated.
        background: "random" (background family independent of the class) or
            "correlated" (class c uses family c with probability ``bg_correlation``).
        bg_correlation: share of class-matched backgrounds in "correlated" mode.
        seed: base seed of every random draw.
    """

    name: str = "synthetic"
    num_classes: int = 5
    image_size: int = 64
    train_per_class: int = 300
    validation_per_class: int = 40
    test_per_class: int = 100
    background: str = "random"
    bg_correlation: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise UserError(f"num_classes must be in 2..{MAX_CLASSES}, got {self.num_classes}.")
        if self.image_size < 16:
            raise UserError(f"image_size must be >= 16, got {self.image_size}.")
        if self.train_per_class < 1:
            raise UserError(f"train_per_class must be >= 1, got {self.train_per_class}.")
        for name in ("validation_per_class", "test_per_class"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.background not in BACKGROUND_MODES:
            raise UserError(f"background must be one of {BACKGROUND_MODES}, got {self.background!r}.")
        if not 0.0 <= self.bg_correlation <= 1.0:
            raise UserError(f"bg_correlation must be in [0, 1], got {self.bg_correlation}.")
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
            "background": self.background,
            "bg_correlation": float(self.bg_correlation),
            "seed": self.seed,
        }

    def cache_prefix(self) -> str:
        return f"{self.name}-{self.num_classes}c-{self.image_size}px-{self.background}"


def class_names(num_classes: int) -> list[str]:
    """Names of the first ``num_classes`` species."""
    return [s.name for s in SPECIES[:num_classes]]


# --------------------------------------------------------------------------------------
# Example specification: every random choice that is not texture noise.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """Every random choice of one example, drawn before any pixel is rendered.

    Attributes:
        label: class index (balanced: ``index % num_classes``).
        background_family: index into BACKGROUND_FAMILIES.
        hue_deg: petal hue in degrees.
        saturation / value: petal HSV saturation and value.
        radius: petal length in output pixels.
        centre_yx: flower centre in output pixels.
        rotation: rotation in radians.
        petal_lengths: per-petal length factor in [0.85, 1].
        petal_shades: per-petal brightness factor.
        flower_seed / background_seed: seeds of the texture noise of the two layers.
    """

    label: int
    background_family: int
    hue_deg: float
    saturation: float
    value: float
    radius: float
    centre_yx: tuple[float, float]
    rotation: float
    petal_lengths: tuple[float, ...]
    petal_shades: tuple[float, ...]
    flower_seed: int
    background_seed: int


def hue_range_deg(label: int, num_classes: int) -> tuple[float, float]:
    """Hue range of a class as (start, end) degrees along the hue arc (end > start).

    Args:
        label: class index.
        num_classes: number of classes sharing the arc.

    Returns:
        Start and end of the range, in arc degrees before wrapping to [0, 360).
    """
    spacing = _HUE_ARC_SPAN_DEG / num_classes
    centre = (label + 0.5) * spacing
    half = 0.5 * _HUE_RANGE_WIDTH * spacing
    return centre - half, centre + half


def _arc_to_hue(arc_deg: float) -> float:
    # Walk the arc downwards from yellow: 55 -> 0 (red) -> 300 (magenta) -> 235 (blue).
    return (_HUE_ARC_START_DEG - arc_deg) % 360.0


@functools.lru_cache(maxsize=None)
def _species_fill(species_index: int) -> float:
    """Share of the disk of radius ``petal length`` that the species' flower covers."""
    size = 128
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    species = SPECIES[species_index]
    n = species.num_petals
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    theta = np.arctan2(yy - size / 2, xx - size / 2)
    profile = _petal_profile(species, _sector_coordinate(theta, n))
    inside = r <= np.maximum(profile, species.centre_fraction)
    return float(inside.sum() / (np.pi * (size / 2) ** 2))


def sample_spec(config: SyntheticFlowersConfig, split: str, index: int) -> ExampleSpec:
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
    num_classes = config.num_classes
    label = index % num_classes
    species = SPECIES[label]

    if config.background == "correlated":
        if rng.random() < config.bg_correlation:
            family = label
        else:  # a uniformly random *other* family: the spurious cue is broken
            family = int(rng.integers(num_classes - 1))
            family += family >= label
    else:
        family = int(rng.integers(num_classes))

    lo, hi = hue_range_deg(label, num_classes)
    hue = _arc_to_hue(rng.uniform(lo, hi))
    saturation = rng.uniform(0.55, 0.95)
    value = rng.uniform(0.78, 1.0)

    size = config.image_size
    # Flower covers ~20-45 % of the image; correct for how much of its disk the species fills.
    coverage = rng.uniform(0.20, 0.45)
    radius = size * np.sqrt(coverage / (np.pi * _species_fill(label)))
    radius = float(min(radius, 0.47 * size, size / 2 - 1.5))
    # Whole flower inside the image (petals are never longer than ``radius``).
    cy = rng.uniform(radius + 1, size - radius - 1)
    cx = rng.uniform(radius + 1, size - radius - 1)
    rotation = rng.uniform(0, 2 * np.pi)
    petal_lengths = tuple(float(v) for v in rng.uniform(0.85, 1.0, species.num_petals))
    petal_shades = tuple(float(v) for v in rng.uniform(0.88, 1.05, species.num_petals))
    flower_seed, background_seed = (int(v) for v in rng.integers(0, 2**31 - 1, 2))
    return ExampleSpec(
        label=label,
        background_family=family,
        hue_deg=float(hue),
        saturation=float(saturation),
        value=float(value),
        radius=radius,
        centre_yx=(float(cy), float(cx)),
        rotation=float(rotation),
        petal_lengths=petal_lengths,
        petal_shades=petal_shades,
        flower_seed=flower_seed,
        background_seed=background_seed,
    )


# --------------------------------------------------------------------------------------
# Flower layer.
# --------------------------------------------------------------------------------------


def _sector_coordinate(theta: np.ndarray, num_petals: int) -> np.ndarray:
    """Position across the nearest petal, -1 (one edge of its sector) .. 0 (midline) .. 1."""
    sector = 2 * np.pi / num_petals
    return (np.mod(theta + sector / 2, sector) - sector / 2) / (sector / 2)


def _petal_profile(species: Species, u: np.ndarray) -> np.ndarray:
    """Petal radius (fraction of petal length) as a function of the sector coordinate ``u``.

    Args:
        species: the species (shape and width of its petals).
        u: position across the sector in [-1, 1], any shape.

    Returns:
        Radius fraction in [0, 1], same shape as ``u``; 0 between separated petals.
    """
    v = np.abs(u) / species.petal_width  # 0 at the midline, 1 at the petal edge
    inside = v < 1
    v = np.minimum(v, 1.0)
    base = species.centre_fraction * 0.9  # petals start under the centre disk
    if species.petal_shape == "round":
        shape = np.sqrt(1 - v**2)
    elif species.petal_shape == "pointed":
        shape = (1 - v) ** 0.65  # cusp at the tip
    elif species.petal_shape == "notched":
        shape = np.sqrt(1 - v**2) - 0.28 * np.exp(-((v / 0.16) ** 2))
    elif species.petal_shape == "thin":
        shape = (1 - v**2) ** 0.3  # parallel sides, blunt tip
    else:
        raise AssertionError(f"unknown petal shape {species.petal_shape}")
    return np.where(inside, base + (1 - base) * shape, 0.0)


def _box_downsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks. [H*f, W*f, ...] -> [H, W, ...]."""
    h, w = x.shape[0] // factor, x.shape[1] // factor
    return x.reshape(h, factor, w, factor, *x.shape[2:]).mean(axis=(1, 3))


def render_flower_layer(config: SyntheticFlowersConfig, spec: ExampleSpec) -> tuple[np.ndarray, np.ndarray]:
    """Render the flower (petals + centre) of ``spec`` on nothing.

    Only the flower's bounding box is drawn at ``SUPERSAMPLE`` x resolution; petal and
    centre colours are constant up to a scalar shading, so shading and coverage are
    box-filtered as scalar fields and coloured afterwards.

    Args:
        config: dataset parameters.
        spec: the example's specification.

    Returns:
        ``(flower, mask)``: flower colours float32 [S, S, 3] in [0, 1] (black outside
        ``mask``), and the binary flower mask bool [S, S] (coverage >= 50 %).
    """
    species = SPECIES[spec.label]
    k = SUPERSAMPLE
    size = config.image_size
    rng = np.random.default_rng(spec.flower_seed)
    cy, cx = spec.centre_yx
    y0, y1 = max(int(cy - spec.radius) - 1, 0), min(int(cy + spec.radius) + 2, size)
    x0, x1 = max(int(cx - spec.radius) - 1, 0), min(int(cx + spec.radius) + 2, size)
    # Sub-pixel centres of the bounding box, in output-pixel units.
    ys = (np.arange(y0 * k, y1 * k, dtype=np.float32) + 0.5) / k - np.float32(cy)
    xs = (np.arange(x0 * k, x1 * k, dtype=np.float32) + 0.5) / k - np.float32(cx)
    dy, dx = ys[:, None], xs[None, :]
    r = np.sqrt(dy**2 + dx**2) / np.float32(spec.radius)  # [h*k, w*k]; 1 = full petal length
    theta = np.mod(np.arctan2(dy, dx) - np.float32(spec.rotation), np.float32(2 * np.pi))

    n = species.num_petals
    sector = 2 * np.pi / n
    petal_index = np.floor(np.mod(theta + sector / 2, 2 * np.pi) / sector).astype(np.int64) % n
    u = _sector_coordinate(theta, n)
    length = np.asarray(spec.petal_lengths, dtype=np.float32)[petal_index]
    petal_edge = _petal_profile(species, u).astype(np.float32) * length
    centre_r = species.centre_fraction
    in_centre = r <= centre_r
    in_petal = (r <= petal_edge) & ~in_centre

    # Petal shading: darker at the base, a faint darker midline vein, per-petal shade.
    along = np.clip(r / np.maximum(petal_edge, 1e-6), 0, 1)
    vein = 1 - 0.2 * np.exp(-((u / (0.12 * species.petal_width)) ** 2))
    petal_shade = (0.62 + 0.38 * along) * vein * np.asarray(spec.petal_shades, dtype=np.float32)[petal_index]
    # Centre: speckled disk with a darker rim.
    rim = np.where(r > 0.8 * centre_r, np.float32(0.7), np.float32(1.0))
    centre_shade = rng.uniform(0.7, 1.1, size=r.shape).astype(np.float32) * rim

    coverage = _box_downsample((in_petal | in_centre).astype(np.float32), k)  # [h, w]
    petal_sum = _box_downsample(np.where(in_petal, petal_shade, np.float32(0)), k)  # [h, w]
    centre_sum = _box_downsample(np.where(in_centre, centre_shade, np.float32(0)), k)  # [h, w]
    petal_rgb = np.asarray(colorsys.hsv_to_rgb((spec.hue_deg % 360.0) / 360.0, spec.saturation, spec.value),
                           dtype=np.float32)
    centre_rgb = np.asarray(species.centre_rgb, dtype=np.float32)
    # Average colour of the covered sub-pixels only (no blending with the empty outside).
    colour = (petal_sum[..., None] * petal_rgb + centre_sum[..., None] * centre_rgb) / np.maximum(
        coverage, 1e-6
    )[..., None]  # [h, w, 3]

    flower = np.zeros((size, size, 3), dtype=np.float32)
    mask = np.zeros((size, size), dtype=bool)
    box_mask = coverage >= 0.5
    flower[y0:y1, x0:x1] = np.where(box_mask[..., None], np.clip(colour, 0, 1), 0)
    mask[y0:y1, x0:x1] = box_mask
    return flower, mask


# --------------------------------------------------------------------------------------
# Background layer: one texture generator per family.
# --------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random ``cells x cells`` grid upsampled bicubically.

    Returns:
        float32 [size, size].
    """
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(img), 0, 1)


def _jitter_rgb(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> np.ndarray:
    """``rgb`` plus uniform noise of +-``amount`` per channel, clipped to [0, 1]. Returns [3]."""
    return np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, 3), 0, 1).astype(np.float32)


def _bg_grass(rng: np.random.Generator, s: int) -> np.ndarray:
    """Green blades: slanted stripes with a wobble and patchy light. Returns [s, s, 3]."""
    base = _jitter_rgb(rng, (0.25, 0.5, 0.15), 0.08)
    x = np.arange(s, dtype=np.float32)[None, :]
    y = np.arange(s, dtype=np.float32)[:, None]
    freq = rng.uniform(0.6, 1.4)
    wobble = _smooth_noise(rng, s, 4) * rng.uniform(4, 10)
    blades = 0.5 + 0.5 * np.sin(freq * (x + wobble + 0.15 * y) + rng.uniform(0, 6.3))
    light = 0.7 + 0.3 * _smooth_noise(rng, s, 5)
    return base * ((0.65 + 0.45 * blades) * light)[..., None]


def _bg_leaves(rng: np.random.Generator, s: int) -> np.ndarray:
    """Overlapping green ellipses on dark foliage, drawn at 2x. Returns [s, s, 3]."""
    big = 2 * s
    canvas = Image.new("RGB", (big, big), tuple(int(255 * c) for c in _jitter_rgb(rng, (0.08, 0.22, 0.08), 0.04)))
    draw = ImageDraw.Draw(canvas)
    scale = rng.uniform(0.6, 1.4)
    for _ in range(int(rng.integers(25, 45))):
        cx, cy = rng.uniform(0, big, 2)
        w, h = rng.uniform(0.06, 0.16, 2) * big * scale
        rgb = _jitter_rgb(rng, (0.18, 0.42, 0.14), 0.1)
        draw.ellipse([cx - w, cy - h, cx + w, cy + h], fill=tuple(int(255 * c) for c in rgb))
    small = canvas.resize((s, s), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _bg_sky(rng: np.random.Generator, s: int) -> np.ndarray:
    """Blue vertical gradient with soft white clouds. Returns [s, s, 3]."""
    top = _jitter_rgb(rng, (0.30, 0.50, 0.85), 0.08)
    bottom = _jitter_rgb(rng, (0.70, 0.82, 0.95), 0.05)
    t = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    sky = (1 - t) * top + t * bottom
    sky = np.broadcast_to(sky, (s, s, 3))
    clouds = _smooth_noise(rng, s, int(rng.integers(3, 7)))
    cover = np.clip((clouds - rng.uniform(0.45, 0.65)) * 4, 0, 1)[..., None]
    return (1 - cover) * sky + cover * 0.96


def _bg_soil(rng: np.random.Generator, s: int) -> np.ndarray:
    """Brown earth: coarse patches times fine speckle. Returns [s, s, 3]."""
    base = _jitter_rgb(rng, (0.42, 0.30, 0.18), 0.07)
    coarse = _smooth_noise(rng, s, int(rng.integers(5, 10)))
    speckle = rng.uniform(0.75, 1.15, (s, s)).astype(np.float32)
    return base * ((0.7 + 0.4 * coarse) * speckle)[..., None]


def _bg_brick(rng: np.random.Generator, s: int) -> np.ndarray:
    """Running-bond brick wall with mortar lines. Returns [s, s, 3]."""
    brick = _jitter_rgb(rng, (0.62, 0.28, 0.20), 0.1)
    mortar = _jitter_rgb(rng, (0.78, 0.76, 0.70), 0.05)
    bh = rng.uniform(0.09, 0.16) * s
    bw = bh * rng.uniform(1.8, 2.6)
    y = np.arange(s, dtype=np.float32)[:, None] + rng.uniform(0, bh)
    x = np.arange(s, dtype=np.float32)[None, :] + rng.uniform(0, bw)
    row = np.floor(y / bh)
    x_shift = x + (row % 2) * bw / 2
    is_mortar = (np.mod(y, bh) < 1.2) | (np.mod(x_shift, bw) < 1.2)
    per_brick = 0.85 + 0.3 * _smooth_noise(rng, s, 6)
    out = np.where(is_mortar[..., None], mortar, brick * per_brick[..., None])
    return out * rng.uniform(0.9, 1.05, (s, s, 1)).astype(np.float32)


def _bg_water(rng: np.random.Generator, s: int) -> np.ndarray:
    """Teal water with warped horizontal ripples. Returns [s, s, 3]."""
    deep = _jitter_rgb(rng, (0.05, 0.30, 0.40), 0.06)
    light = _jitter_rgb(rng, (0.35, 0.65, 0.72), 0.06)
    y = np.arange(s, dtype=np.float32)[:, None]
    x = np.arange(s, dtype=np.float32)[None, :]
    warp = _smooth_noise(rng, s, 4) * rng.uniform(6, 14)
    ripples = 0.5 + 0.5 * np.sin(rng.uniform(0.5, 1.0) * (y + warp) + 0.2 * np.sin(0.15 * x))
    t = (ripples**2)[..., None]
    return (1 - t) * deep + t * light


_BACKGROUND_RENDERERS = {
    "grass": _bg_grass,
    "leaves": _bg_leaves,
    "sky": _bg_sky,
    "soil": _bg_soil,
    "brick": _bg_brick,
    "water": _bg_water,
}


def render_background(family: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render one background texture of a family from ``rng`` (also used by other synthetic sets).

    Args:
        family: one of BACKGROUND_FAMILIES.
        rng: source of every random draw of the texture.
        size: side of the square image in pixels.

    Returns:
        float32 [size, size, 3] in [0, 1].
    """
    if family not in _BACKGROUND_RENDERERS:
        raise UserError(f"family must be one of {BACKGROUND_FAMILIES}, got {family!r}.")
    return np.clip(_BACKGROUND_RENDERERS[family](rng, size), 0, 1).astype(np.float32)


def render_background_layer(config: SyntheticFlowersConfig, spec: ExampleSpec) -> np.ndarray:
    """Render the background texture of ``spec`` (the whole image, no flower).

    Args:
        config: dataset parameters.
        spec: the example's specification.

    Returns:
        float32 [S, S, 3] in [0, 1].
    """
    rng = np.random.default_rng(spec.background_seed)
    return render_background(BACKGROUND_FAMILIES[spec.background_family], rng, config.image_size)


# --------------------------------------------------------------------------------------
# Public rendering API.
# --------------------------------------------------------------------------------------

# The background-study variants (Xiao et al. 2020); analysis.studies.background composites them for other datasets.
VARIANTS = ("original", "only_fg", "no_fg", "only_bg_t", "mixed_same", "mixed_rand")
MIXED_VARIANTS = ("mixed_same", "mixed_rand")


def to_images(image: np.ndarray, mask: np.ndarray) -> tuple[Image.Image, Image.Image]:
    """``[S, S, 3]`` floats in [0, 1] and a boolean ``[S, S]`` mask -> an RGB image and an "L" mask (255 = object)."""
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB"), Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def render_example(config: SyntheticFlowersConfig, split: str, index: int) -> tuple[Image.Image, Image.Image, int]:
    """Render example ``index`` of ``split``.

    Args:
        config: dataset parameters.
        split: "train", "validation" or "test".
        index: example index within the split.

    Returns:
        ``(image, mask, label)``: RGB image, "L" mask (255 = flower), class index.
    """
    spec = sample_spec(config, split, index)
    flower, mask = render_flower_layer(config, spec)  # [S, S, 3], [S, S]
    background = render_background_layer(config, spec)  # [S, S, 3]
    image = np.where(mask[..., None], flower, background)
    return *to_images(image, mask), spec.label


def render_variant(
    config: SyntheticFlowersConfig,
    split: str,
    index: int,
    variant: str,
    partner_index: Optional[int] = None,
) -> tuple[Image.Image, Image.Image]:
    """Render a background-study variant of example ``index`` (exact, no compositing artefacts).

    Variants (Xiao et al., "Noise or Signal: The Role of Image Backgrounds", 2020):
    "original"; "only_fg" (flower on black); "no_fg" (flower region black);
    "only_bg_t" (the example's own background texture everywhere);
    "mixed_same" / "mixed_rand" (flower of ``index`` on the background of example
    ``partner_index`` of the same split; the caller picks a partner of the same /
    another class).

    Args:
        config: dataset parameters.
        split: "train", "validation" or "test".
        index: example whose flower (and mask) is used.
        variant: one of VARIANTS.
        partner_index: background donor, required for the mixed variants only.

    Returns:
        ``(image, mask)``: RGB image and the flower mask of ``index`` ("L", 255 = flower).
    """
    if variant not in VARIANTS:
        raise UserError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    is_mixed = variant in MIXED_VARIANTS
    if is_mixed and partner_index is None:
        raise UserError(f"variant {variant!r} needs partner_index (the background donor).")
    if not is_mixed and partner_index is not None:
        raise UserError(f"partner_index is only used by the mixed variants, not {variant!r}.")

    spec = sample_spec(config, split, index)
    flower, mask = render_flower_layer(config, spec)  # [S, S, 3], [S, S]
    black = np.zeros_like(flower)
    if variant == "only_fg":
        image = np.where(mask[..., None], flower, black)
    elif variant == "no_fg":
        image = np.where(mask[..., None], black, render_background_layer(config, spec))
    elif variant == "only_bg_t":
        image = render_background_layer(config, spec)
    elif is_mixed:
        partner = sample_spec(config, split, partner_index)
        image = np.where(mask[..., None], flower, render_background_layer(config, partner))
    else:  # original
        image = np.where(mask[..., None], flower, render_background_layer(config, spec))
    return to_images(image, mask)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # speed over size: the set is small
    return buffer.getvalue()


# --------------------------------------------------------------------------------------
# datasets builder.
# --------------------------------------------------------------------------------------


class SyntheticBuilder(datasets.GeneratorBasedBuilder):
    """A ``datasets`` builder of procedurally rendered images with masks, from a config (used directly).

    Subclasses name their config class, version, description, class names and renderer
    (``render(config, split, index) -> (image, mask, label)``); example ``i`` of a split is a pure
    function of ``(config, split, i)``, so the splits are rendered in shards, in parallel with
    ``download_and_prepare(num_proc=...)``.
    """

    DESCRIPTION = ""

    def __init__(self, config=None, cache_dir: Optional[str] = None, **kwargs) -> None:
        """Create the builder.

        Args:
            config: dataset parameters (default: ``BUILDER_CONFIG_CLASS()``).
            cache_dir: datasets cache folder (default: the datasets cache).
            **kwargs: passed to datasets.GeneratorBasedBuilder.
        """
        config = config if config is not None else self.BUILDER_CONFIG_CLASS()
        super().__init__(
            cache_dir=cache_dir,
            config_id=config.cache_id(),
            name=config.name,
            version=self.VERSION,
            **config.params(),
            **kwargs,
        )

    @staticmethod
    def class_names(num_classes: int) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def render(config, split: str, index: int) -> tuple[Image.Image, Image.Image, int]:
        raise NotImplementedError

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=self.DESCRIPTION,
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "label": datasets.ClassLabel(names=self.class_names(self.config.num_classes)),
                    "mask": datasets.Image(),
                }
            ),
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        generators = []
        for split in SPLITS:
            n = self.config.num_examples(split)
            if n == 0:
                continue
            # Lists in gen_kwargs are what ``download_and_prepare(num_proc=...)`` shards.
            bounds = np.linspace(0, n, min(_NUM_SHARDS, n) + 1).astype(int)
            index_ranges = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
            generators.append(
                datasets.SplitGenerator(name=split, gen_kwargs={"split": split, "index_ranges": index_ranges})
            )
        return generators

    def _generate_examples(self, split: str, index_ranges: list[range]):
        for index_range in index_ranges:
            for index in index_range:
                image, mask, label = self.render(self.config, split, index)
                yield index, {
                    "image": {"bytes": png_bytes(image), "path": None},
                    "label": label,
                    "mask": {"bytes": png_bytes(mask), "path": None},
                }


class SyntheticFlowers(SyntheticBuilder):
    """``datasets`` builder of the synthetic flowers; use it directly (see module doc)."""

    BUILDER_CONFIG_CLASS = SyntheticFlowersConfig
    VERSION = datasets.Version(RENDERER_VERSION)
    DESCRIPTION = "Procedural flowers with exact masks (flower-vit-lens synthetic set)."
    class_names = staticmethod(class_names)
    render = staticmethod(render_example)
