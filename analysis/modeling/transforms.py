"""Image (and mask) transforms, all derived from timm's data config of the model."""
import random
from typing import Callable, Dict, Optional

import numpy as np
import timm.data
import torch
from PIL import Image
from torchvision import transforms as T

from data_scripts import to_rgb


def model_data_config(vit: torch.nn.Module) -> Dict:
    """timm's data config of a model: input_size, interpolation, mean, std, crop_pct, crop_mode."""
    return timm.data.resolve_model_data_config(vit)


def train_transform(data_config: Dict, min_crop_scale: float = 0.08, color_jitter: float = 0.4) -> Callable:
    """timm's training augmentation (random resized crop, flips, colour jitter) for the model."""
    return timm.data.create_transform(**data_config, is_training=True, scale=(min_crop_scale, 1.0),
                                      color_jitter=color_jitter)


def eval_transform(data_config: Dict) -> Callable:
    """timm's evaluation transform (resize, centre crop, normalise) for the model."""
    return timm.data.create_transform(**data_config, is_training=False)


def eval_geometry(data_config: Dict) -> Callable:
    """Only the geometric steps of `eval_transform` (resize, crop), PIL in, PIL out.

    Applied to a flower mask, it gives the pixels the model sees, so the mask lines up with the
    patch grid.
    """
    steps = [t for t in eval_transform(data_config).transforms
             if not isinstance(t, (T.ToTensor, T.Normalize, timm.data.transforms.MaybeToTensor))]
    return T.Compose(steps)


def mask_to_tensor(mask: Image.Image, geometry: Callable) -> torch.Tensor:
    """A flower mask through the eval geometry, as ``[H, W]`` in ``[0, 1]``.

    Masks are 0 / 255 (mode L); label-style masks stored as 0 / 1 (also palette) are scaled up
    first, or they would read as almost no flower.
    """
    mask = mask.convert('L') if mask.mode != 'P' else Image.fromarray(np.asarray(mask))
    values = np.asarray(mask)
    if values.max() == 1:
        mask = Image.fromarray((values * 255).astype(np.uint8))
    cropped = geometry(mask)
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)


class SeededAugmentation:
    """A random training transform whose draws depend only on (seed, epoch, sample index).

    Trainer saves the RNG state with each checkpoint, but accelerate's data loader has already
    fetched (and augmented) the next batch by then, and a resumed run fetches its first batch
    before it restores the RNG; augmentations drawn from the global RNG therefore differ after a
    resume. Seeding each sample's draws from its own index and the epoch makes a resumed run
    see exactly the images of an uninterrupted one. Only the CPU generators (Python ``random``,
    used by timm's crop, and torch's default CPU generator) are touched, and both are restored.

    Args:
        transform: timm's training transform.
        seed: the run's seed.
    """

    def __init__(self, transform: Callable, seed: int):
        self.transform = transform
        self.seed = seed
        self.epoch = 0  # set by the training loop (analysis.train.job.AugmentationEpoch)

    def __call__(self, image: Image.Image, index: int):
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        python_state, torch_state = random.getstate(), torch.random.default_generator.get_state()
        try:
            random.seed(sample_seed)
            torch.random.default_generator.manual_seed(sample_seed)
            return self.transform(image)
        finally:
            random.setstate(python_state)
            torch.random.default_generator.set_state(torch_state)


def batch_transform(image_transform: Callable, mask_geometry: Optional[Callable] = None) -> Callable:
    """A `datasets` ``set_transform`` function: images -> ``pixel_values``, label -> ``labels``,
    and, with ``mask_geometry``, masks -> ``fg_mask`` ``[H, W]``. A `SeededAugmentation` also
    needs the ``sample_index`` column."""
    def apply(batch: Dict) -> Dict:
        if isinstance(image_transform, SeededAugmentation):
            pixels = [image_transform(to_rgb(img), i) for img, i in zip(batch['image'], batch['sample_index'])]
        else:
            pixels = [image_transform(to_rgb(img)) for img in batch['image']]
        out = {'pixel_values': pixels, 'labels': batch['label']}
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
