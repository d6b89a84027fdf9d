"""Image hygiene: decode everything to RGB, and find unusable files before training.

``check_images`` opens every image (and mask) once, fully, before training starts, so a
corrupt file shows up as one line in ``data_report.json`` instead of a crash in the middle
of an epoch. Usable-but-unusual images (grayscale, palette, alpha, CMYK, 16-bit) are fine:
``to_rgb`` turns each of them into 8-bit RGB.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import datasets
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

logger = logging.getLogger(__name__)

# Transparent pixels become white: the usual convention of image viewers and of product /
# specimen photos with a cut-out background.
ALPHA_BACKGROUND = (255, 255, 255)

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _high_bit_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a single-channel I;16*, I or F image to uint8 without clipping.

    16-bit integer data (I;16* modes, and I-mode data inside [0, 65535], which is how
    Pillow may open 16-bit PNGs) is divided by 257 so that 65535 -> 255. Float data
    inside [0, 1] is multiplied by 255; float data inside [0, 255] is kept.

    Returns:
        uint8 [H, W].

    Raises:
        ValueError: values outside those ranges (no silent clipping or stretching).
    """
    mode = img.mode
    if mode.startswith("I;16"):
        values = np.asarray(img).astype(np.float64)  # uint16, either byte order
        scale = 1.0 / 257.0
    elif mode == "I":
        values = np.asarray(img, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UserError(
                f"32-bit integer image with values in [{values.min():.0f}, {values.max():.0f}]: only 16-bit "
                "ranges [0, 65535] are supported; convert it to 8- or 16-bit first."
            )
        scale = 1.0 / 257.0
    else:  # "F"
        values = np.asarray(img, dtype=np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            scale = 255.0
        elif low >= 0 and high <= 255:
            scale = 1.0
        else:
            raise UserError(
                f"float image with values in [{low:g}, {high:g}]: expected [0, 1] or [0, 255]; "
                "rescale it and save it as 8-bit."
            )
    return np.round(values * scale).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    - RGB: returned as is. L, 1, CMYK, YCbCr, LAB, HSV, P without transparency: ``convert``.
    - Anything with alpha (LA, La, RGBA, RGBa, PA, P/L/RGB with a transparency entry):
      composited on white (ALPHA_BACKGROUND).
    - I;16 / I;16B / I;16L / I (16-bit values) / F: scaled to 8 bit, not clipped (white
      stays white), see ``_high_bit_depth_to_uint8``.

    Args:
        img: a decoded PIL image.

    Returns:
        An "RGB" image of the same size.

    Raises:
        ValueError: high-bit-depth data outside the supported value ranges.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        gray = _high_bit_depth_to_uint8(img)  # [H, W]
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = img.mode in ("LA", "La", "RGBA", "RGBa", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB, upright.

    The EXIF orientation tag is applied (``ImageOps.exif_transpose``), as the ``datasets`` Image
    feature does, so a phone photo stored sideways is seen the way its viewer shows it.

    Raises:
        ValueError: the file cannot be read as an image (the message names it).
    """
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright if upright is not None else img.copy())
    except (OSError, UnidentifiedImageError, SyntaxError, EOFError) as err:
        raise UserError(f"{path} is not a readable image ({err}).") from err


def _open(entry: dict) -> Image.Image:
    """Open an Image(decode=False) entry ({"bytes", "path"}) without decoding pixels."""
    if entry.get("bytes") is not None:
        if len(entry["bytes"]) == 0:
            raise OSError("empty file (0 bytes)")
        return Image.open(io.BytesIO(entry["bytes"]))
    path = entry.get("path")
    if not path:
        raise OSError("no image data (neither bytes nor path)")
    if not os.path.exists(path):
        raise OSError(f"file not found: {path}")
    if os.path.getsize(path) == 0:
        raise OSError("empty file (0 bytes)")
    return Image.open(path)


def _check_one(image_entry: Optional[dict], mask_entry: Optional[dict], has_masks: bool) -> Optional[str]:
    """Fully decode one image (and its mask).

    Returns:
        None if usable, else the reason it is not.
    """
    if image_entry is None:
        return "no image"
    try:
        with _open(image_entry) as img:
            size = img.size
            if img.format == "JPEG":
                # Decoding at 1/8 scale is ~2x faster and still reads every byte, so
                # truncation is still detected.
                img.draft("RGB", (max(size[0] // 8, 1), max(size[1] // 8, 1)))
                img.load()
            else:
                img.load()
                to_rgb(img)  # high-bit-depth value ranges are only known after decoding
    except _DECODE_ERRORS as err:
        return f"cannot decode image: {type(err).__name__}: {err}"
    if not has_masks:
        return None
    if mask_entry is None:
        return "no mask (the dataset has masks for other images)"
    try:
        with _open(mask_entry) as mask:
            mask.load()
            mask_size = mask.size
    except _DECODE_ERRORS as err:
        return f"cannot decode mask: {type(err).__name__}: {err}"
    if mask_size != size:
        return f"mask size {mask_size[0]}x{mask_size[1]} != image size {size[0]}x{size[1]}"
    return None


def _entry_path(entry: Optional[dict]) -> Optional[str]:
    return entry.get("path") if entry else None


def check_images(
    ds: datasets.DatasetDict,
    strict: bool = False,
    num_workers: Optional[int] = None,
    batch_size: int = 256,
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Find and drop images that cannot be used, before training.

    Each image is opened and fully decoded once (JPEGs at reduced scale, which still
    detects truncation); zero-byte, non-image, truncated and corrupt files, missing masks
    (in a dataset with a "mask" column) and masks whose size differs from the image are
    problems.

    Args:
        ds: splits with an "image" column (datasets.Image) and "label" (ClassLabel), and
            optionally "mask" (datasets.Image).
        strict: raise instead of dropping.
        num_workers: decoding threads (default: CPU count; PIL decodes without the GIL).
        batch_size: rows read from the dataset at a time.

    Returns:
        ``(clean, report)``: the datasets without the bad rows, and
        ``{"num_checked": {split: n}, "num_skipped": n,
        "skipped": [{"split", "index", "path", "reason"}]}`` (index = row before dropping).

    Raises:
        ValueError: ``strict`` and some file is bad (every one is listed), or after
            dropping some class has no training image left.
    """
    workers = num_workers or os.cpu_count() or 1
    report: dict[str, Any] = {"num_checked": {}, "num_skipped": 0, "skipped": []}
    clean = datasets.DatasetDict()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for split, dataset in ds.items():
            has_masks = "mask" in dataset.column_names
            columns = ["image", "mask"] if has_masks else ["image"]
            raw = dataset.select_columns(columns).cast_column("image", datasets.Image(decode=False))
            if has_masks:
                raw = raw.cast_column("mask", datasets.Image(decode=False))
            bad: list[int] = []
            offset = 0
            for batch in raw.iter(batch_size=batch_size):
                images = batch["image"]
                masks = batch["mask"] if has_masks else [None] * len(images)
                reasons = pool.map(lambda pair: _check_one(pair[0], pair[1], has_masks), zip(images, masks))
                for i, reason in enumerate(reasons):
                    if reason is not None:
                        bad.append(offset + i)
                        report["skipped"].append(
                            {"split": split, "index": offset + i, "path": _entry_path(images[i]), "reason": reason}
                        )
                offset += len(images)
            report["num_checked"][split] = offset
            if bad:
                bad_set = set(bad)
                dataset = dataset.select([i for i in range(len(dataset)) if i not in bad_set])
            clean[split] = dataset
    report["num_skipped"] = len(report["skipped"])

    if report["skipped"] and strict:
        raise UserError(unusable_message(report))
    if report["skipped"]:
        total = sum(report["num_checked"].values())
        logger.warning(
            "Skipped %d of %d images that cannot be used (listed in data_report.json); first: %s",
            report["num_skipped"],
            total,
            report["skipped"][0]["reason"],
        )
    else:
        logger.info("Checked %d images: all usable.", sum(report["num_checked"].values()))

    if "train" in clean and len(clean["train"]) < len(ds["train"]):
        _require_classes_kept(ds["train"], clean["train"])
    return clean, report


def _class_counts(train: datasets.Dataset) -> np.ndarray:
    names = train.features["label"].names
    return np.bincount(np.asarray(train["label"], dtype=np.int64), minlength=len(names))


def _require_classes_kept(before: datasets.Dataset, after: datasets.Dataset) -> None:
    """Raise if dropping bad files removed every training image of some class."""
    names = before.features["label"].names
    lost = (_class_counts(before) > 0) & (_class_counts(after) == 0)
    empty = [names[c] for c in np.flatnonzero(lost)]
    if empty:
        raise UserError(
            f"No usable training image left for class(es) {empty}: all of their training images failed the "
            "image check (see the warnings / data_report.json). Fix those files or remove the class."
        )


def unusable_message(report: dict[str, Any], report_path: Optional[str] = None, shown: int = 3) -> str:
    """One line naming the unusable files of a `check_images` report and what to do about them.

    Args:
        report: as returned by `check_images`.
        report_path: where the full list was written, if it was.
        shown: how many files to name.
    """
    skipped = report["skipped"]
    named = "; ".join(f"{s['split']}[{s['index']}] {s['path'] or '(embedded)'}: {s['reason']}" for s in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    listed = f" (all listed in {report_path})" if report_path else ""
    return (f"{len(skipped)} unusable image(s){listed}: {named}{more}. Fix or remove these files, or drop "
            "--strict_images to skip them.")
