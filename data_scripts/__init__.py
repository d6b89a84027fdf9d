"""Flower datasets in one standard form (image / label / mask) and their hygiene checks."""

from .args import DataArguments
from .hygiene import check_images, to_rgb, write_data_report
from .loading import load_flower_dataset
from .synthetic_flowers import SyntheticFlowers, SyntheticFlowersConfig, render_example, render_variant

__all__ = [
    "DataArguments",
    "SyntheticFlowers",
    "SyntheticFlowersConfig",
    "check_images",
    "load_flower_dataset",
    "render_example",
    "render_variant",
    "to_rgb",
    "write_data_report",
]
