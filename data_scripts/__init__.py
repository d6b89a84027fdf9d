"""The base layer: flower datasets in one standard form (image / label / mask), their hygiene
checks, and the few utilities every other layer uses (atomic files, Hub access, one-line errors).
Nothing here imports `analysis` or `train_hf`."""

from .args import DataArguments
from .hygiene import check_images, open_image, to_rgb
from .loading import load_flower_dataset
from .synthetic_flowers import SyntheticFlowers, SyntheticFlowersConfig, render_example, render_variant
from .synthetic_shapes import SyntheticShapes, SyntheticShapesConfig

__all__ = [
    "DataArguments",
    "SyntheticFlowers",
    "SyntheticFlowersConfig",
    "SyntheticShapes",
    "SyntheticShapesConfig",
    "check_images",
    "load_flower_dataset",
    "open_image",
    "render_example",
    "render_variant",
    "to_rgb",
]
