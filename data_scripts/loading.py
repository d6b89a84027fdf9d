"""One entry point for every flower dataset: ``load_flower_dataset(DataArguments)``.

Whatever the source, the result is a ``datasets.DatasetDict`` with splits "train",
"validation" and, when the source has one, "test"; columns "image" (datasets.Image),
"label" (ClassLabel with class names, the same in every split) and, when known, "mask"
(datasets.Image, "L", 255 = flower). Images are not decoded or checked here; run
``hygiene.check_images`` on the result before training.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import datasets
import numpy as np

from .args import DataArguments
from .errors import MissingFileError, UserError
from .oxford102 import Oxford102
from .synthetic_flowers import SyntheticFlowers
from .synthetic_shapes import SyntheticShapes

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


def load_flower_dataset(args: DataArguments, seed: int = 0) -> datasets.DatasetDict:
    """Load the dataset the arguments name, in the project's standard form.

    Sources, in order: ``--train_dir`` (image folders), "synthetic", "synthetic_shapes", "oxford102", else
    ``datasets.load_dataset(dataset_name, dataset_config_name)`` (Hub id or local folder
    in Hub layout). Then: columns renamed to image / label / mask, labels encoded as one
    ClassLabel shared by all splits, validation split off train when missing, and the
    ``max_*_samples`` limits applied.

    Args:
        args: data arguments.
        seed: seed of the train/validation split and of the ``max_*_samples`` subsets.
            Kept apart from the training seed on purpose, so runs with different training
            seeds see the same validation images.

    Returns:
        The dataset splits.

    Raises:
        ValueError / FileNotFoundError: with a message naming the flag or file to fix.
    """
    if args.train_dir is not None:
        ds = _load_image_folders(args.train_dir, args.validation_dir, args.test_dir)
    elif args.dataset_name in ("synthetic", "synthetic_shapes"):
        builder_class = SyntheticShapes if args.dataset_name == "synthetic_shapes" else SyntheticFlowers
        builder = builder_class(config=args.synthetic_config(), cache_dir=args.cache_dir)
        builder.download_and_prepare(num_proc=args.synthetic_num_proc())
        ds = builder.as_dataset()
    elif args.dataset_name == "oxford102":
        builder = Oxford102(data_dir=args.data_dir, cache_dir=args.cache_dir)
        builder.download_and_prepare()
        ds = builder.as_dataset()
    else:
        ds = datasets.load_dataset(
            args.dataset_name, args.dataset_config_name, data_dir=args.data_dir, cache_dir=args.cache_dir
        )
    ds = _standardise_splits(ds, args.dataset_name)

    ds = _standardise_columns(ds, args)
    ds = _encode_labels(ds)
    if "validation" not in ds:
        ds = _split_validation(ds, args.train_val_split, seed)
    ds = _limit_samples(ds, args.max_train_samples, args.max_eval_samples, seed)
    require_training_images_for_every_class(ds["train"])
    logger.info(
        "Loaded %s: %s; %d classes; masks: %s",
        args.train_dir or args.dataset_name,
        {split: len(d) for split, d in ds.items()},
        ds["train"].features["label"].num_classes,
        "mask" in ds["train"].column_names,
    )
    return ds


# --------------------------------------------------------------------------------------
# Image folders.
# --------------------------------------------------------------------------------------


def _list_image_folder(root: str, flag: str) -> tuple[list[str], list[str], list[int]]:
    """List ``root/<class>/<image>``.

    Returns:
        ``(class_names, paths, labels)`` with class names sorted.
    """
    if not os.path.isdir(root):
        raise MissingFileError(f"--{flag} {root} is not a folder.")
    class_names = sorted(
        d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )
    if not class_names:
        raise UserError(f"--{flag} {root} has no class sub-folders; expected {root}/<class name>/<image files>.")
    paths, labels, ignored = [], [], 0
    for label, name in enumerate(class_names):
        class_dir = os.path.join(root, name)
        for file_name in sorted(os.listdir(class_dir)):
            path = os.path.join(class_dir, file_name)
            if file_name.startswith(".") or not os.path.isfile(path):
                continue
            if os.path.splitext(file_name)[1].lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            paths.append(os.path.abspath(path))
            labels.append(label)
    if ignored:
        logger.info("--%s: ignored %d file(s) without an image extension.", flag, ignored)
    return class_names, paths, labels


def _load_image_folders(train_dir: str, validation_dir: Optional[str], test_dir: Optional[str]) -> datasets.DatasetDict:
    """Image folders (one sub-folder per class) as a DatasetDict; no image is decoded."""
    folders = {
        "train": (train_dir, "train_dir"),
        "validation": (validation_dir, "validation_dir"),
        "test": (test_dir, "test_dir"),
    }
    listings = {split: _list_image_folder(path, flag) for split, (path, flag) in folders.items() if path is not None}
    train_names = listings["train"][0]
    for split, (names, _, _) in listings.items():
        if names != train_names:
            _raise_class_mismatch(split, names, train_names, f"--{folders[split][1]}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=train_names)})
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)
            for split, (_, paths, labels) in listings.items()
        }
    )


def _raise_class_mismatch(split: str, names: list[str], train_names: list[str], source: str) -> None:
    only_here = sorted(set(names) - set(train_names))
    only_train = sorted(set(train_names) - set(names))
    raise UserError(
        f"The {split} split ({source}) must have the same classes as train. Only in {split}: {only_here}; "
        f"only in train: {only_train}" + ("" if only_here or only_train else "; same names, different order") + "."
    )


# --------------------------------------------------------------------------------------
# Standard form.
# --------------------------------------------------------------------------------------


def _standardise_splits(ds: datasets.DatasetDict, source: str) -> datasets.DatasetDict:
    """Keep train / validation / test; "val", "valid" and "dev" count as validation."""
    if not isinstance(ds, datasets.DatasetDict) or "train" not in ds:
        raise UserError(f"Dataset {source!r} has no 'train' split (splits: {list(ds)}).")
    out = {}
    for split, dataset in ds.items():
        name = SPLIT_ALIASES.get(split, split)
        if name not in ("train", "validation", "test"):
            logger.info("Ignoring split %r of %s.", split, source)
            continue
        if name in out:
            raise UserError(f"Dataset {source!r} has several validation splits: {list(ds)}.")
        out[name] = dataset
    return datasets.DatasetDict(out)


def _standardise_columns(ds: datasets.DatasetDict, args: DataArguments) -> datasets.DatasetDict:
    """Rename the user's columns to image / label / mask and drop every other column."""
    wanted = [
        ("image", args.image_column_name, "image_column_name"),
        ("label", args.label_column_name, "label_column_name"),
    ]
    out = {}
    for split, dataset in ds.items():
        columns = dataset.column_names
        for _, column, flag in wanted:
            if column not in columns:
                raise UserError(
                    f"Split {split!r} has no column {column!r}; set --{flag} to one of {columns}."
                )
        mapping = {column: standard for standard, column, _ in wanted}
        if args.mask_column_name in columns:
            mapping[args.mask_column_name] = "mask"
        elif args.mask_column_name != "mask":
            raise UserError(
                f"Split {split!r} has no column {args.mask_column_name!r} (--mask_column_name); columns: {columns}. "
                "Leave --mask_column_name at its default for a dataset without masks."
            )
        dropped = [c for c in columns if c not in mapping]
        if dropped:
            logger.info("Split %s: dropping columns %s.", split, dropped)
        dataset = dataset.select_columns(list(mapping))
        renames = {old: new for old, new in mapping.items() if old != new}
        if renames:
            dataset = dataset.rename_columns(renames)
        for column in ("image", "mask"):
            if column in dataset.column_names and not isinstance(dataset.features[column], datasets.Image):
                flag = "image_column_name" if column == "image" else "mask_column_name"
                original = {new: old for old, new in mapping.items()}[column]
                raise UserError(
                    f"Column {original!r} (--{flag}) of split {split!r} is {dataset.features[column]}, "
                    "not an image column."
                )
        out[split] = dataset
    mask_splits = {split for split, d in out.items() if "mask" in d.column_names}
    if mask_splits and mask_splits != set(out):
        raise UserError(f"Only splits {sorted(mask_splits)} have a mask column; every split needs one or none.")
    return datasets.DatasetDict(out)


def _encode_labels(ds: datasets.DatasetDict) -> datasets.DatasetDict:
    """Make "label" one ClassLabel shared by all splits (train's names, in train's order).

    A column that is not a ClassLabel is encoded with the sorted union of its values over
    all splits (``class_encode_column`` per split could number classes differently).
    """
    features = {split: d.features["label"] for split, d in ds.items()}
    if all(isinstance(f, datasets.ClassLabel) for f in features.values()):
        train_names = features["train"].names
        for split, feature in features.items():
            if feature.names != train_names:
                _raise_class_mismatch(split, feature.names, train_names, "label column")
        return ds
    if any(isinstance(f, datasets.ClassLabel) for f in features.values()):
        raise UserError(f"The label column is a ClassLabel in some splits only: {features}.")
    values = sorted({v for d in ds.values() for v in d.unique("label")}, key=lambda v: (str(type(v)), v))
    if any(v is None for v in values):
        raise UserError("The label column has empty (None) labels; fix or remove those rows.")
    names = [str(v) for v in values]
    if len(set(names)) != len(names):
        raise UserError(f"Label values {values} do not have distinct names.")
    index = {v: i for i, v in enumerate(values)}
    class_label = datasets.ClassLabel(names=names)
    out = {}
    for split, dataset in ds.items():
        new_features = dataset.features.copy()
        new_features["label"] = class_label
        out[split] = dataset.map(
            lambda batch: {"label": [index[v] for v in batch["label"]]},
            batched=True,
            features=new_features,
            desc=f"encoding labels ({split})",
        )
    logger.info("Encoded labels as %d classes: %s", len(names), names)
    return datasets.DatasetDict(out)


def _split_validation(ds: datasets.DatasetDict, fraction: Optional[float], seed: int) -> datasets.DatasetDict:
    """Split a validation set off train (stratified by label when every class allows it)."""
    if fraction is None:
        raise UserError("The dataset has no validation split: give --validation_dir or set --train_val_split.")
    train = ds["train"]
    counts = np.bincount(np.asarray(train["label"]), minlength=train.features["label"].num_classes)
    # Stratifying needs >= 2 images per class (one each side) and room for every class.
    n_val = int(np.ceil(fraction * len(train)))
    stratify = counts.min() >= 2 and len(counts) <= n_val <= len(train) - len(counts)
    if not stratify:
        logger.warning(
            "Validation split of %.0f%% is not stratified: some class has < 2 training images or the split is too "
            "small to hold every class.",
            100 * fraction,
        )
    parts = train.train_test_split(
        test_size=fraction, seed=seed, stratify_by_column="label" if stratify else None
    )
    out = dict(ds)
    out["train"], out["validation"] = parts["train"], parts["test"]
    logger.info(
        "Split %d training images into %d train / %d validation.", len(train), len(out["train"]), len(out["validation"])
    )
    return datasets.DatasetDict({k: out[k] for k in ("train", "validation", "test") if k in out})


def _limit_samples(
    ds: datasets.DatasetDict, max_train: Optional[int], max_eval: Optional[int], seed: int
) -> datasets.DatasetDict:
    """Keep the first n images of each split after a seeded shuffle."""
    out = {}
    for split, dataset in ds.items():
        limit = max_train if split == "train" else max_eval
        if limit is not None and limit < len(dataset):
            dataset = dataset.shuffle(seed=seed).select(range(limit)).flatten_indices()
        out[split] = dataset
    return datasets.DatasetDict(out)


def require_training_images_for_every_class(train: datasets.Dataset) -> None:
    """Raise ValueError naming every class without a training image.

    Args:
        train: the training split ("label" is a ClassLabel).
    """
    names = train.features["label"].names
    counts = np.bincount(np.asarray(train["label"], dtype=np.int64), minlength=len(names))
    empty = [names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise UserError(
            f"No training images for class(es) {empty}. Add images for them, remove them from the dataset, "
            "or raise --max_train_samples."
        )
