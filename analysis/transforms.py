"""Image (and mask) transforms, all derived from timm's data config of the model."""
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import timm.data
import torch
from PIL import Image
from torchvision import transforms as T

from data_scripts import to_rgb


def model_data_config(vit: torch.nn.Module) -> Dict:
    """timm's data config of a model: input_size, interpolation, mean, std, crop_pct, crop_mode."""
    return timm.data.resolve_model_data_config(vit)


def train_transform(data_config: Dict, min_crop_scale: float = 0.08) -> Callable:
    """timm's training augmentation (random resized crop, flips, colour jitter) for the model."""
    return timm.data.create_transform(**data_config, is_training=True, scale=(min_crop_scale, 1.0))


def eval_transform(data_config: Dict) -> Callable:
    """timm's evaluation transform (resize, centre crop, normalise) for the model."""
    return timm.data.create_transform(**data_config, is_training=False)


def eval_geometry(data_config: Dict) -> Callable:
    """Only the geometric steps of `eval_transform` (resize, crop), PIL in, PIL out.

    Applied to a mask or to the image itself, it gives the pixels the model sees, so a flower
    mask lines up with the patch grid and example images can be shown un-normalised.
    """
    steps = [t for t in eval_transform(data_config).transforms
             if not isinstance(t, (T.ToTensor, T.Normalize, timm.data.transforms.MaybeToTensor))]
    return T.Compose(steps)


def mask_to_tensor(mask: Image.Image, geometry: Callable) -> torch.Tensor:
    """A flower mask (mode L, 255 = flower) through the eval geometry, as ``[H, W]`` in ``[0, 1]``."""
    cropped = geometry(mask.convert('L'))
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)


def image_to_uint8(image: Image.Image, geometry: Callable) -> torch.Tensor:
    """The model-input crop of an image, un-normalised, ``[H, W, 3]`` uint8."""
    return torch.from_numpy(np.array(geometry(to_rgb(image)), dtype=np.uint8))


def batch_transform(image_transform: Callable, mask_geometry: Optional[Callable] = None) -> Callable:
    """A `datasets` ``set_transform`` function: images -> ``pixel_values``, label -> ``labels``,
    and, with ``mask_geometry``, masks -> ``fg_mask`` ``[H, W]``."""
    def apply(batch: Dict) -> Dict:
        out = {
            'pixel_values': [image_transform(to_rgb(img)) for img in batch['image']],
            'labels': batch['label'],
        }
        if mask_geometry is not None:
            out['fg_mask'] = [mask_to_tensor(m, mask_geometry) for m in batch['mask']]
        return out
    return apply


def collate(examples) -> Dict[str, torch.Tensor]:
    """Stacks transformed examples into a batch (``pixel_values`` ``[B, 3, H, W]``, ``labels`` ``[B]``)."""
    batch = {
        'pixel_values': torch.stack([e['pixel_values'] for e in examples]),
        'labels': torch.tensor([e['labels'] for e in examples], dtype=torch.long),
    }
    if 'fg_mask' in examples[0]:
        batch['fg_mask'] = torch.stack([e['fg_mask'] for e in examples])
    return batch
