"""Background bias: how much a model's predictions depend on the background behind the flower.

The variants of Xiao et al. 2020 ("Noise or Signal: The Role of Image Backgrounds in Object
Recognition", ImageNet-9), built from an image and its flower mask:

* ``original``: the image as it is.
* ``only_fg``: the flower on black.
* ``no_fg``: the flower blacked out, the background kept.
* ``only_bg_t``: the flower region filled with the image's own background texture.
* ``mixed_same``: the flower pasted on the background of another image of the same class.
* ``mixed_rand``: the flower pasted on the background of an image of a random other class.

``bg_gap = acc(mixed_same) - acc(mixed_rand)`` measures how much the background's class
(rather than the flower) drives the prediction. For the synthetic flowers every variant is
rendered exactly from the two layers the generator draws (`data_scripts.synthetic_flowers.
render_variant`); for any other dataset with masks the variants are composited from pixels
(`make_variant`).

Every variant keeps the mask of the flower it shows (for ``no_fg`` / ``only_bg_t``: where the
flower was), so the attention metrics (fg_lift) measure attention on the flower's place.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
from PIL import Image
from scipy import ndimage

from analysis.core.metrics import classification_metrics
from analysis.maps.extract import extract_metrics
from analysis.modeling.transforms import model_data_config
from data_scripts.errors import UserError
from data_scripts.synthetic_flowers import MIXED_VARIANTS, VARIANTS, render_variant

_logger = logging.getLogger(__name__)



def check_variant(variant: str) -> None:
    """Raises ValueError for a name that is not one of `VARIANTS`."""
    if variant not in VARIANTS:
        raise UserError(f'unknown background variant {variant!r}; choose one of {", ".join(VARIANTS)}.')


def _as_bool_mask(mask: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """A flower mask (bool, or float / uint8 where > half the maximum is flower) as bool ``[H, W]``."""
    mask = np.asarray(mask)
    if mask.shape != tuple(image_shape[:2]):
        raise UserError(f'the mask is {mask.shape} but the image is {tuple(image_shape[:2])}; '
                         'a flower mask must have the image\'s height and width.')
    if mask.dtype == bool:
        return mask
    top = 255.0 if mask.dtype == np.uint8 else 1.0
    return mask.astype(np.float32) > 0.5 * top


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Mirror indices that fall outside ``[0, size)`` back into it (``... 2 1 | 0 1 2 ... | n-2 ...``)."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def fill_background(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with its flower region filled with its own background texture (``only_bg_t``).

    The hole is filled with copies of the image shifted by multiples of the flower's bounding-box
    size (mirror padding at the borders), taking each pixel from the first shift whose source pixel
    is background. This copies the texture from right beside the flower, the way ImageNet-9 tiles
    background into the object's box. Pixels that no shift reaches take the value of the nearest
    background pixel. Deterministic: no random numbers.

    Args:
        image: ``[H, W, 3]`` uint8.
        mask: ``[H, W]`` bool, True = flower.

    Returns:
        ``[H, W, 3]`` uint8 equal to ``image`` outside the mask.

    Raises:
        ValueError: the mask covers the whole image (no background to copy).
    """
    background = ~mask
    if not background.any():
        raise UserError('the flower mask covers the whole image: there is no background texture to fill '
                         'the flower region with (only_bg_t / mixed variants need some background).')
    out = image.copy()
    hole = mask.copy()
    if not hole.any():
        return out
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    box_h = int(rows.max() - rows.min() + 1)
    box_w = int(cols.max() - cols.min() + 1)
    yy, xx = np.mgrid[0:h, 0:w]
    # Nearest shifts first: beside the flower (left/right, up/down, diagonals), then twice as far.
    shifts = []
    for k in (1, 2, 3):
        shifts += [(0, k * box_w), (0, -k * box_w), (k * box_h, 0), (-k * box_h, 0),
                   (k * box_h, k * box_w), (k * box_h, -k * box_w), (-k * box_h, k * box_w), (-k * box_h, -k * box_w)]
    for dy, dx in shifts:
        sy, sx = _reflect(yy + dy, h), _reflect(xx + dx, w)  # [H, W] source pixel of every pixel
        take = hole & background[sy, sx]
        out[take] = image[sy[take], sx[take]]
        hole &= ~take
        if not hole.any():
            return out
    # Leftovers: copy the nearest background pixel (distance transform over the flower region).
    _, (ny, nx) = ndimage.distance_transform_edt(mask, return_indices=True)
    out[hole] = image[ny[hole], nx[hole]]
    return out


def make_variant(
        image: np.ndarray,
        mask: np.ndarray,
        variant: str,
        partner_image: Optional[np.ndarray] = None,
        partner_mask: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Composites one background variant from an image and its flower mask.

    Args:
        image: ``[H, W, 3]`` uint8.
        mask: ``[H, W]`` flower mask, bool or float / uint8 (more than half the maximum = flower).
        variant: one of `VARIANTS`.
        partner_image: ``[H', W', 3]`` uint8, the background donor (mixed variants only); resized
            (bilinear) to ``H x W`` when its size differs.
        partner_mask: ``[H', W']`` flower mask of the donor; its flower is first replaced by its own
            background texture (`fill_background`).

    Returns:
        ``[H, W, 3]`` uint8 image of the variant.
    """
    check_variant(variant)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError(f'image must be [H, W, 3] uint8, got {image.shape} {image.dtype}.')
    fg = _as_bool_mask(mask, image.shape)  # [H, W]
    is_mixed = variant in MIXED_VARIANTS
    if is_mixed and (partner_image is None or partner_mask is None):
        raise UserError(f'variant {variant!r} needs partner_image and partner_mask (the background donor).')
    if not is_mixed and (partner_image is not None or partner_mask is not None):
        raise UserError(f'partner_image / partner_mask are only used by {MIXED_VARIANTS}, not {variant!r}.')

    if variant == 'original':
        return image.copy()
    if variant == 'only_fg':
        return np.where(fg[..., None], image, 0).astype(np.uint8)
    if variant == 'no_fg':
        return np.where(fg[..., None], 0, image).astype(np.uint8)
    if variant == 'only_bg_t':
        return fill_background(image, fg)
    partner_image = np.asarray(partner_image)
    partner_bg = fill_background(partner_image, _as_bool_mask(partner_mask, partner_image.shape))
    if partner_bg.shape != image.shape:
        h, w = image.shape[:2]
        partner_bg = np.asarray(Image.fromarray(partner_bg).resize((w, h), Image.BILINEAR))
    return np.where(fg[..., None], image, partner_bg).astype(np.uint8)


def choose_partners(labels: Sequence[int], variant: str, seed: int) -> np.ndarray:
    """The background donor of every image, deterministic by seed.

    Args:
        labels: class index of every image ``[M]``.
        variant: ``mixed_same`` (a different image of the same class) or ``mixed_rand`` (an image of
            another class, drawn uniformly among all images of other classes).
        seed: random seed; the draws also depend on the variant.

    Returns:
        ``[M]`` int64 row index of each image's donor.

    Raises:
        ValueError: a class has a single image (mixed_same) or only one class is present (mixed_rand).
    """
    if variant not in MIXED_VARIANTS:
        raise UserError(f'partners are only chosen for {MIXED_VARIANTS}, not {variant!r}.')
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, VARIANTS.index(variant)])
    partners = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        if variant == 'mixed_same':
            pool = np.flatnonzero((labels == label) & (np.arange(len(labels)) != i))
            if len(pool) == 0:
                raise UserError(f'class {int(label)} has a single image, so mixed_same has no other image of '
                                 'the same class to take a background from; use more images (--max_images).')
        else:
            pool = np.flatnonzero(labels != label)
            if len(pool) == 0:
                raise UserError('all images belong to one class, so mixed_rand has no other class to take a '
                                 'background from; use a split with several classes.')
        partners[i] = pool[rng.integers(len(pool))]
    return partners


def _check_has_masks(dataset: datasets.Dataset) -> None:
    if 'mask' not in dataset.column_names:
        raise UserError(
            'the background study needs flower masks (a "mask" column): use the synthetic flowers '
            '(--dataset_name synthetic) or a dataset with segmentations such as Oxford 102 with its '
            'trimaps; this dataset has only ' + ', '.join(dataset.column_names) + '.')


class VariantRenderer:
    """One background variant of the rows of a split, rendered batch by batch (the extraction's ``prepare`` step).

    ``renderer(batch, positions)`` turns raw rows (``image``, ``label``, ``mask``; ``positions`` index
    ``subset``) into the variant's ``image``, ``label`` and ``mask`` (the flower mask of the flower
    shown, or of where it was for ``no_fg`` / ``only_bg_t``). Memory holds one batch of variants.

    Args:
        subset: the rows to use (position ``j`` is row ``rows[j]`` of the split); donors are drawn among them.
        variant: one of `VARIANTS`.
        rows: the split's row index of every position (synthetic rendering needs it).
        seed: seed of the donor choice of the mixed variants.
        synthetic_config: `SyntheticFlowersConfig` the split was generated with; then every variant is
            rendered exactly (row ``i`` of the split is example ``i``) instead of composited.
        split: the split's name (``train`` / ``validation`` / ``test``); required with synthetic_config.
    """

    def __init__(self, subset: datasets.Dataset, variant: str, rows: np.ndarray, seed: int = 0,
                 synthetic_config=None, split: Optional[str] = None):
        check_variant(variant)
        _check_has_masks(subset)
        if len(rows) == 0:
            raise UserError('no images to build the background variants from.')
        self.subset, self.variant, self.rows = subset.with_format(None), variant, np.asarray(rows, dtype=np.int64)
        self.synthetic_config, self.split = synthetic_config, split
        labels = np.asarray(self.subset['label'])
        self.partners = choose_partners(labels, variant, seed) if variant in MIXED_VARIANTS else None  # positions
        if synthetic_config is not None:
            if split is None:
                raise UserError('give the split name (train / validation / test) with synthetic_config.')
            _check_synthetic_matches(self.subset[0], synthetic_config, split, int(self.rows[0]), render_variant)
            expected = self.rows % synthetic_config.num_classes
            wrong = np.flatnonzero(labels != expected)
            if len(wrong):
                row = int(self.rows[wrong[0]])
                raise UserError(f'row {row} of the {split} split has label {labels[wrong[0]]}, the synthetic '
                                 f'generator gives {expected[wrong[0]]}: the split is not the unshuffled synthetic '
                                 'split the config describes; pass the split as load_flower_dataset returns it.')

    def __call__(self, batch: Dict[str, list], positions: Sequence[int]) -> Dict[str, list]:
        images: List[Image.Image] = []
        masks: List[Image.Image] = []
        for k, j in enumerate(positions):
            partner = int(self.partners[j]) if self.partners is not None else None
            if self.synthetic_config is not None:
                row = int(self.rows[partner]) if partner is not None else None
                image, mask = render_variant(self.synthetic_config, self.split, int(self.rows[j]), self.variant,
                                             partner_index=row)
            else:
                mask = batch['mask'][k].convert('L')
                partner_image = partner_mask = None
                if partner is not None:
                    donor = self.subset[partner]
                    partner_image = np.asarray(donor['image'].convert('RGB'), dtype=np.uint8)
                    partner_mask = np.asarray(donor['mask'].convert('L'))
                image = Image.fromarray(make_variant(np.asarray(batch['image'][k].convert('RGB'), dtype=np.uint8),
                                                     np.asarray(mask), self.variant, partner_image, partner_mask))
            images.append(image)
            masks.append(mask)
        return {'image': images, 'label': list(batch['label']), 'mask': masks}


def _rows_of(dataset: datasets.Dataset, indices: Optional[Sequence[int]]) -> Tuple[datasets.Dataset, np.ndarray]:
    """The subset of ``dataset`` at ``indices`` (all rows by default) and those row indices."""
    if indices is None:
        return dataset, np.arange(len(dataset))
    rows = np.asarray(indices, dtype=np.int64)
    return dataset.select(rows.tolist()), rows


def _check_synthetic_matches(example: Dict, config, split: str, index: int, render_variant) -> None:
    """Raises if the dataset's image differs from what the synthetic config renders for it."""
    rendered, _ = render_variant(config, split, index, 'original')
    if not np.array_equal(np.asarray(rendered), np.asarray(example['image'].convert('RGB'))):
        raise UserError(f'image {index} of the {split} split differs from what the synthetic config renders: '
                         'pass the SyntheticFlowersConfig the dataset was generated with (same seed, size, '
                         'background mode), or omit synthetic_config to composite the variants.')


def sample_rows(num_rows: int, max_images: Optional[int], seed: int) -> np.ndarray:
    """All rows, or ``max_images`` of them drawn without replacement by seed (sorted)."""
    if max_images is None or max_images >= num_rows:
        return np.arange(num_rows)
    if max_images < 1:
        raise UserError(f'max_images must be >= 1, got {max_images}.')
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(num_rows, size=max_images, replace=False))


def background_study(
        model,
        dataset_split: datasets.Dataset,
        *,
        seed: int = 0,
        batch_size: int = 128,
        synthetic_config=None,
        split: str = 'test',
        max_images: Optional[int] = None,
        model_id: str = '',
        variants: Sequence[str] = VARIANTS,
) -> Dict:
    """Accuracy, macro F1 and per-layer fg_lift of a model on every background variant.

    Args:
        model: `TimmViTForImageClassification` trained on the dataset's classes.
        dataset_split: split with ``image``, ``label`` and ``mask`` columns.
        seed: seed of the image subset (max_images) and of the donor choice.
        batch_size: images per forward pass.
        synthetic_config: the `SyntheticFlowersConfig` of the split, to render the variants exactly.
        split: name of the split (recorded; needed to render synthetic variants).
        max_images: use this many images drawn by seed (default: all).
        model_id: recorded in the result.
        variants: which variants to measure (default: all six; bg_gap needs both mixed ones).

    Returns:
        ``{"variants": {name: {"accuracy", "macro_f1", "f1_per_class", "fg_lift": [L]}}, "bg_gap",
        "num_images", "seed", "split", "model_id", "method": "rendered" | "composited"}``; fg_lift is
        the head-averaged CLS fg_lift of every layer (layer 0 first) and absent when the attention
        metrics could not compute it; bg_gap is absent unless both mixed variants were measured.
    """
    _check_has_masks(dataset_split)
    for variant in variants:
        check_variant(variant)
    rows = sample_rows(len(dataset_split), max_images, seed)
    data_config = model_data_config(model.timm_model)
    class_names = model.class_names
    result: Dict = {'variants': {}}
    subset, rows = _rows_of(dataset_split.with_format(None), None if len(rows) == len(dataset_split) else rows)
    for variant in variants:
        renderer = VariantRenderer(subset, variant, rows, seed, synthetic_config=synthetic_config, split=split)
        extraction = extract_metrics(model, subset, prepare=renderer, data_config=data_config, batch_size=batch_size,
                                     progress=False, split=split, model_id=model_id)
        metrics = extraction.metrics
        scores = classification_metrics(extraction.labels.numpy(), extraction.predictions.numpy(), class_names)
        entry = {'accuracy': scores['accuracy'], 'macro_f1': scores['macro_f1'],
                 'f1_per_class': scores['f1_per_class']}
        fg_lift = metrics.get('layers', {}).get('fg_lift', {}).get('mean')
        if fg_lift is not None:
            entry['fg_lift'] = [float(v) for v in fg_lift]
        result['variants'][variant] = entry
        _logger.info(f'background variant {variant}: accuracy {entry["accuracy"]:.3f}')
    if all(v in result['variants'] for v in MIXED_VARIANTS):
        result['bg_gap'] = result['variants']['mixed_same']['accuracy'] - result['variants']['mixed_rand']['accuracy']
    result.update({'num_images': int(len(rows)), 'seed': seed, 'split': split, 'model_id': model_id,
                   'method': 'rendered' if synthetic_config is not None else 'composited'})
    return result
