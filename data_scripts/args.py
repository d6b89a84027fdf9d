"""Command-line arguments of the data layer (parsed by transformers.HfArgumentParser)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from .errors import MissingFileError, UserError
from .synthetic_flowers import MAX_CLASSES, SyntheticFlowersConfig
from .synthetic_shapes import MAX_CLASSES as SHAPES_MAX_CLASSES
from .synthetic_shapes import SyntheticShapesConfig

SYNTHETIC_FLAGS = ("synthetic_num_classes", "synthetic_image_size", "synthetic_train_per_class",
                   "synthetic_validation_per_class", "synthetic_test_per_class", "synthetic_background",
                   "synthetic_bg_correlation", "synthetic_seed")


@dataclass
class DataArguments:
    """Which flower images to train and evaluate on (names follow transformers'
    run_image_classification.py example)."""

    dataset_name: str = field(
        default="synthetic",
        metadata={
            "aliases": ["--dataset"],
            "help": (
                "'synthetic' (procedural flowers with masks, offline), 'synthetic_shapes' (procedural shapes "
                "and textures with masks, offline: a pretraining set without flowers), 'oxford102' (official "
                "Oxford Flowers-102 files in --data_dir), or a Hub dataset id / local folder in "
                "Hub layout (parquet or imagefolder) loaded with datasets.load_dataset."
            ),
        },
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Configuration name of the Hub dataset, if it has several."}
    )
    data_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Folder with Oxford-102's official files (102flowers.tgz, imagelabels.mat, setid.mat, "
            "optionally 102segmentations.tgz); also passed to load_dataset for Hub datasets."
        },
    )
    train_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Image folder with one sub-folder per class; when given it wins over --dataset_name."},
    )
    validation_dir: Optional[str] = field(
        default=None, metadata={"help": "Validation image folder (same class sub-folders as --train_dir)."}
    )
    test_dir: Optional[str] = field(
        default=None, metadata={"help": "Test image folder (same class sub-folders as --train_dir)."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the class labels."})
    mask_column_name: str = field(
        default="mask",
        metadata={
            "help": "Column holding flower masks (255 = flower), if the dataset has them; a non-default "
            "name must exist."
        },
    )
    train_val_split: Optional[float] = field(
        default=0.15,
        metadata={"help": "Fraction of train split off (stratified, seeded) as validation when there is none."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep at most this many training images (for quick runs)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep at most this many validation and test images each."}
    )
    strict_images: bool = field(
        default=False,
        metadata={"help": "Fail on unreadable images instead of skipping them (and listing them in data_report.json)."},
    )
    synthetic_num_classes: Optional[int] = field(
        default=None,
        metadata={
            "help": f"Synthetic set: number of classes; flowers 2..{MAX_CLASSES} (default 5), "
            f"synthetic_shapes 2..{SHAPES_MAX_CLASSES} (default {SHAPES_MAX_CLASSES})."
        },
    )
    synthetic_image_size: int = field(default=64, metadata={"help": "Synthetic set: image side in pixels."})
    synthetic_train_per_class: int = field(default=300, metadata={"help": "Synthetic set: training images per class."})
    synthetic_validation_per_class: int = field(
        default=40, metadata={"help": "Synthetic set: validation images per class (0: split from train)."}
    )
    synthetic_test_per_class: int = field(
        default=100, metadata={"help": "Synthetic set: test images per class (0: no test split)."}
    )
    synthetic_background: str = field(
        default="random",
        metadata={
            "help": "Synthetic set: 'random' (background independent of class) or 'correlated' (class c "
            "mostly on background family c: a spurious cue)."
        },
    )
    synthetic_bg_correlation: float = field(
        default=0.9,
        metadata={"help": "Synthetic set, 'correlated' mode: share of images on their class's background family."},
    )
    synthetic_seed: int = field(default=0, metadata={"help": "Synthetic set: seed of every random draw."})
    preprocessing_num_workers: Optional[int] = field(
        default=None,
        metadata={"help": "Synthetic set: processes that render it (default: one per CPU core, at most 8)."},
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "datasets cache folder."})

    def __post_init__(self) -> None:
        if self.train_dir is None and not self.dataset_name:
            raise UserError("--dataset_name is empty: give 'synthetic', 'oxford102', a Hub id, or --train_dir.")
        if self.train_dir is None and (self.validation_dir is not None or self.test_dir is not None):
            raise UserError("--validation_dir / --test_dir need --train_dir as well.")
        if self.train_dir is None and self.dataset_name == "oxford102" and self.data_dir is None:
            raise UserError(
                "--dataset_name oxford102 needs --data_dir: a folder with 102flowers.tgz, imagelabels.mat and "
                "setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/."
            )
        for flag in ("train_dir", "validation_dir", "test_dir"):
            folder = getattr(self, flag)
            if folder is not None and not os.path.isdir(os.path.expanduser(folder)):
                raise MissingFileError(f"--{flag} {folder} is not a folder; give a folder with one sub-folder per class.")
        if self.train_dir is None and self.dataset_name == "oxford102" and not os.path.isdir(
            os.path.expanduser(self.data_dir)
        ):
            raise MissingFileError(
                f"--data_dir {self.data_dir} is not a folder; download the Oxford-102 files into it first "
                "(see the README)."
            )
        for flag in ("image_column_name", "label_column_name", "mask_column_name"):
            if not getattr(self, flag):
                raise UserError(f"--{flag} must not be empty.")
        if len({self.image_column_name, self.label_column_name, self.mask_column_name}) < 3:
            raise UserError("--image_column_name, --label_column_name and --mask_column_name must differ.")
        if self.train_val_split is not None and not 0.0 < self.train_val_split < 1.0:
            raise UserError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")
        for flag in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise UserError(f"--{flag} must be >= 1 (or unset), got {value}.")
        try:  # the synthetic set's own checks, once; its field names are the flags without "synthetic_"
            self.synthetic_config()
        except ValueError as e:
            raise UserError(f"--synthetic_{e}") from e

    def synthetic_num_proc(self) -> Optional[int]:
        """Processes that render a synthetic set (``download_and_prepare(num_proc=...)``; None: this one)."""
        workers = self.preprocessing_num_workers or min(len(os.sched_getaffinity(0)), 8)
        return workers if workers > 1 else None

    def synthetic_config(self) -> SyntheticFlowersConfig | SyntheticShapesConfig:
        """The config of the synthetic set ``--dataset_name`` names (flowers unless synthetic_shapes).

        The config's field names are the ``--synthetic_*`` flags without the prefix; unset flags
        keep the config's default. The shapes set draws its backgrounds at random: the flowers'
        background flags are refused for it rather than ignored.
        """
        values = {name.removeprefix("synthetic_"): getattr(self, name) for name in SYNTHETIC_FLAGS}
        values = {name: value for name, value in values.items() if value is not None}
        if self.dataset_name != "synthetic_shapes":
            return SyntheticFlowersConfig(**values)
        for name in ("background", "bg_correlation"):
            if values.pop(name) != getattr(SyntheticFlowersConfig, name):  # the flowers' default
                raise UserError(f"{name} is a flower-set flag; synthetic_shapes draws its backgrounds at random.")
        return SyntheticShapesConfig(**values)
