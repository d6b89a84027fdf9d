"""The seeded training augmentation: a pure function of (seed, epoch, sample index) that leaves the global RNGs alone."""
import random

import numpy as np
import torch
from PIL import Image

from analysis.modeling.transforms import SeededAugmentation, train_transform

DATA_CONFIG = {'input_size': (3, 32, 32), 'interpolation': 'bilinear', 'mean': (0.5, 0.5, 0.5),
               'std': (0.5, 0.5, 0.5), 'crop_pct': 1.0, 'crop_mode': 'center'}


def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))


def augmented(seed, epoch, index):
    augmentation = SeededAugmentation(train_transform(DATA_CONFIG, min_crop_scale=0.2), seed)
    augmentation.epoch = epoch
    return augmentation(image(), index)


def test_same_seed_epoch_and_index_give_the_same_crop():
    torch.testing.assert_close(augmented(3, 1, 7), augmented(3, 1, 7), rtol=0, atol=0)


def test_the_epoch_the_index_and_the_seed_each_change_the_crop():
    base = augmented(3, 1, 7)
    for other in (augmented(3, 2, 7), augmented(3, 1, 8), augmented(4, 1, 7)):
        assert not torch.equal(base, other)


def test_global_random_generators_are_restored():
    random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), torch.rand(3))
    random.seed(11)
    torch.manual_seed(11)
    augmented(3, 0, 0)
    assert random.random() == expected[0]
    torch.testing.assert_close(torch.rand(3), expected[1], rtol=0, atol=0)
