"""Layer and head importance of a ViT classifier: linear probes, layer skipping, head ablation.

* Linear probe: logistic regression (scikit-learn, standardised features) on the CLS token after
  each block, fit on train images, scored on test images. The CLS token is taken after the
  model's final LayerNorm (``forward_intermediates(norm=True)``), which is what the head of a
  model truncated after that block would see; so ``truncate_accuracy[k]`` (last ``k`` blocks
  removed) is the probe accuracy after block ``L - 1 - k`` (0-based).
* Layer skipping: accuracy of the model's own head with block ``l`` replaced by the identity
  (the residual stream passes through unchanged).
* Head ablation: accuracy with one head's output zeroed (its slice of the input of the attention
  output projection ``attn.proj``), for every head; and greedy pruning (Michel et al. 2019,
  "Are Sixteen Heads Really Better than One?"): heads ranked by their single-ablation accuracy,
  least important (highest accuracy when removed) first, removed cumulatively.

All layer and head indices in the results are 0-based.
"""
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from analysis.modeling.timm_internals import ablate_heads, skip_blocks, vit_of
from analysis.modeling.transforms import eval_geometry, eval_transform, model_data_config
from data_scripts import to_rgb
from data_scripts.errors import UserError

_logger = logging.getLogger(__name__)

PRUNING_TOLERANCE = 0.01  # heads count as prunable while accuracy >= baseline - 1 point
PRUNING_STOP_DROP = 0.05  # greedy pruning stops once accuracy is more than 5 points below baseline


def image_tensors(model: nn.Module, dataset: datasets.Dataset, data_config: Optional[Dict] = None,
                  max_images: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model inputs of a split, transformed once and kept in memory (float32: for small splits; see `EvalCrops`).

    Args:
        model: the model (its timm data config gives the eval transform).
        dataset: split with ``image`` and ``label`` columns.
        data_config: timm data config (default: the model's).
        max_images: use only the first this many images.

    Returns:
        ``(pixel_values [M, 3, H, W] float32, labels [M] int64)``.
    """
    data_config = data_config or model_data_config(vit_of(model))
    transform = eval_transform(data_config)
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n == 0:
        raise UserError('the split has no images.')
    subset = dataset.select(range(n)) if n < len(dataset) else dataset
    pixels = torch.stack([transform(to_rgb(img)) for img in subset['image']])  # [M, 3, H, W]
    labels = torch.tensor(subset['label'], dtype=torch.long)  # [M]
    return pixels, labels


class EvalCrops:
    """A split's model inputs, made once and kept on disk: memory holds one batch per pass, not the split.

    Each image goes through timm's eval geometry (resize, centre crop) once; the crop is stored as
    uint8 (``H x W x 3`` bytes, a temporary file) and every pass reads it back batch by batch and
    normalises it as timm's eval transform does (``/ 255``, ``- mean``, ``/ std``, the same float
    operations), so the batches equal `image_tensors`' exactly.

    Args:
        dataset: split with ``image`` and ``label`` columns.
        data_config: timm data config of the model.
        max_images: use only the first this many images.
        directory: where the temporary file goes (default: the system's temporary folder).
    """

    def __init__(self, dataset: datasets.Dataset, data_config: Dict, max_images: Optional[int] = None,
                 directory: Optional[str] = None):
        n = len(dataset) if max_images is None else min(max_images, len(dataset))
        if n == 0:
            raise UserError('the split has no images.')
        subset = dataset.with_format(None).select(range(n))
        self.labels = torch.tensor(subset['label'], dtype=torch.long)  # [M]
        self.num_images = n
        self._mean = torch.as_tensor(data_config['mean'], dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.as_tensor(data_config['std'], dtype=torch.float32).view(-1, 1, 1)
        self._tmp = tempfile.TemporaryDirectory(prefix='flower_vit_lens_crops.', dir=directory)
        self.path = Path(self._tmp.name) / 'crops.u8'
        geometry = eval_geometry(data_config)
        self.crop_shape: Optional[Tuple[int, ...]] = None
        with open(self.path, 'wb') as f:
            for batch in subset.select_columns(['image']).iter(batch_size=64):
                for image in batch['image']:
                    crop = np.asarray(geometry(to_rgb(image)), dtype=np.uint8)  # [H, W, 3]
                    self.crop_shape = self.crop_shape or crop.shape
                    assert crop.shape == self.crop_shape, f'eval crops of {crop.shape} and {self.crop_shape}'
                    f.write(crop.tobytes())

    def __len__(self) -> int:
        return self.num_images

    def __enter__(self) -> 'EvalCrops':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The model inputs ``[B, 3, H, W]`` float32, in order."""
        crop_bytes = int(np.prod(self.crop_shape))
        with open(self.path, 'rb') as f:
            for start in range(0, self.num_images, batch_size):
                n = min(batch_size, self.num_images - start)
                buffer = bytearray(n * crop_bytes)
                f.readinto(buffer)
                crops = torch.frombuffer(buffer, dtype=torch.uint8).view(n, *self.crop_shape)  # [B, H, W, 3]
                # ToTensor + Normalize, step by step as torchvision does them
                yield crops.permute(0, 3, 1, 2).contiguous().float().div(255).sub_(self._mean).div_(self._std)


Images = Union[torch.Tensor, EvalCrops]  # model inputs: [M, 3, H, W] in memory, or EvalCrops on disk


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images.batches(batch_size)


@torch.inference_mode()
def predict(model: nn.Module, pixel_values: Images, batch_size: int = 128) -> torch.Tensor:
    """Predicted class of every image, ``[M]``, from the ViT's own head (one streamed pass)."""
    vit = vit_of(model)
    vit.eval()
    device = next(vit.parameters()).device
    return torch.cat([vit(x.to(device)).argmax(-1).cpu() for x in _batches(pixel_values, batch_size)])


def accuracy(model: nn.Module, pixel_values: Images, labels: torch.Tensor, batch_size: int = 128) -> float:
    """Share of images the model classifies correctly, as an exact fraction (correct / images): the same number
    as the Trainer's accuracy (`analysis.core.metrics.classification_metrics`)."""
    return int((predict(model, pixel_values, batch_size) == labels).sum()) / len(labels)


@torch.inference_mode()
def cls_features(model: nn.Module, pixel_values: Images, batch_size: int = 128,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The CLS token after every block, after the final LayerNorm.

    Args:
        model: the ViT (or its wrapper).
        pixel_values: ``[M, 3, H, W]`` model inputs (`image_tensors`), or `EvalCrops`.
        batch_size: images per forward pass.
        dtype: of the result (the importance study keeps float16: 2 bytes per feature).

    Returns:
        ``[L, M, D]``.
    """
    vit = vit_of(model)
    if getattr(vit, 'cls_token', None) is None:
        raise UserError(f'{type(vit).__name__} has no CLS token (class_token=False); the linear probe reads the '
                         'CLS token after each block.')
    vit.eval()
    device = next(vit.parameters()).device
    feats = torch.empty(len(vit.blocks), len(pixel_values), vit.embed_dim, dtype=dtype)  # [L, M, D]
    start = 0
    for x in _batches(pixel_values, batch_size):
        inter = vit.forward_intermediates(x.to(device), indices=None, return_prefix_tokens=True,
                                          norm=True, output_fmt='NLC', intermediates_only=True)
        # inter: L x (patch tokens [B, P, D], prefix tokens [B, prefix, D]); CLS is prefix token 0
        feats[:, start:start + len(x)] = torch.stack([prefix[:, 0] for _, prefix in inter]).float().cpu()  # [L, B, D]
        start += len(x)
        del inter  # before the next forward
    return feats


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, seed: int = 0, max_iter: int = 2000) -> List[float]:
    """Test accuracy of a logistic-regression probe per layer.

    Args:
        train_feats: ``[L, M, D]`` features of the training images (any float dtype; fit in float32).
        train_labels: ``[M]``.
        test_feats: ``[L, M', D]``.
        test_labels: ``[M']``.
        seed: random_state of the solver.
        max_iter: solver iterations.

    Returns:
        ``[L]`` accuracies in [0, 1].
    """
    assert train_feats.shape[0] == test_feats.shape[0], 'train and test features need the same layers'
    y_train, y_test = np.asarray(train_labels), np.asarray(test_labels)
    if len(np.unique(y_train)) < 2:
        raise UserError('the probe needs training images of at least two classes.')
    accs = []
    for layer in range(train_feats.shape[0]):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
        probe.fit(train_feats[layer].float().numpy(), y_train)  # one layer in float32 at a time
        accs.append(float(probe.score(test_feats[layer].float().numpy(), y_test)))
    return accs


def layer_skip_accuracy(model: nn.Module, pixel_values: Images, labels: torch.Tensor,
                        batch_size: int = 128) -> List[float]:
    """``[L]``: accuracy with block ``l`` replaced by the identity."""
    accs = []
    for layer in range(len(vit_of(model).blocks)):
        with skip_blocks(model, [layer]):
            accs.append(accuracy(model, pixel_values, labels, batch_size))
    return accs


def head_ablation_accuracy(model: nn.Module, pixel_values: Images, labels: torch.Tensor,
                           batch_size: int = 128) -> List[List[float]]:
    """``[L][H]``: accuracy with one head zeroed."""
    vit = vit_of(model)
    return [[_ablated_accuracy(model, [(layer, head)], pixel_values, labels, batch_size)
             for head in range(block.attn.num_heads)] for layer, block in enumerate(vit.blocks)]


def _ablated_accuracy(model, heads, pixel_values, labels, batch_size) -> float:
    with ablate_heads(model, heads):
        return accuracy(model, pixel_values, labels, batch_size)


def greedy_pruning(model: nn.Module, pixel_values: Images, labels: torch.Tensor,
                   head_accuracy: Sequence[Sequence[float]], baseline: float, *, batch_size: int = 128,
                   tolerance: float = PRUNING_TOLERANCE, stop_drop: float = PRUNING_STOP_DROP,
                   max_seconds: Optional[float] = None) -> Dict:
    """Removes heads one by one, least important first, and scores the model after each removal.

    Args:
        model: the ViT.
        pixel_values / labels: test images (``[M, 3, H, W]`` or `EvalCrops`) and labels ``[M]``.
        head_accuracy: ``[L][H]`` single-ablation accuracies (`head_ablation_accuracy`); the head whose
            removal leaves the highest accuracy goes first (ties: lower layer, then lower head).
        baseline: accuracy of the full model.
        tolerance: a prefix of the order is prunable while every accuracy >= baseline - tolerance.
        stop_drop: stop once accuracy is more than this below baseline (later heads cannot count).
        max_seconds: also stop after this much time (the curve is then shorter; recorded).

    Returns:
        ``{"order": [[layer, head], ...] (heads removed, in order), "accuracy": [...] (after each
        removal, same length), "num_prunable": n, "num_heads": L*H, "tolerance": f,
        "stopped": "all heads" | "accuracy" | "time"}``.
    """
    ranked = sorted(((layer, head) for layer in range(len(head_accuracy)) for head in range(len(head_accuracy[layer]))),
                    key=lambda lh: (-float(head_accuracy[lh[0]][lh[1]]), lh[0], lh[1]))
    start = time.monotonic()
    order: List[List[int]] = []
    accs: List[float] = []
    stopped = 'all heads'
    for layer, head in ranked:
        order.append([layer, head])
        accs.append(_ablated_accuracy(model, [tuple(lh) for lh in order], pixel_values, labels, batch_size))
        if accs[-1] < baseline - stop_drop:
            stopped = 'accuracy'
            break
        if max_seconds is not None and time.monotonic() - start > max_seconds and len(order) < len(ranked):
            stopped = 'time'
            break
    num_prunable = 0
    for n, acc in enumerate(accs, start=1):
        if acc < baseline - tolerance:
            break
        num_prunable = n
    return {'order': order, 'accuracy': accs, 'num_prunable': num_prunable, 'num_heads': len(ranked),
            'tolerance': tolerance, 'stopped': stopped}


def importance_study(
        model: nn.Module,
        dataset_dict: datasets.DatasetDict,
        *,
        batch_size: int = 128,
        max_train: Optional[int] = None,
        max_test: Optional[int] = None,
        seed: int = 0,
        test_split: Optional[str] = None,
        pruning_seconds: Optional[float] = 300.0,
        head_ablation: bool = True,
) -> Dict:
    """Linear probes, layer skipping and head ablation of a ViT classifier.

    Args:
        model: `TimmViTForImageClassification` trained on the dataset's classes.
        dataset_dict: with a ``train`` split (probe fit) and a ``test`` split (else ``validation``).
        batch_size: images per forward pass.
        max_train / max_test: use only the first this many images of each split.
        seed: random_state of the probes.
        test_split: the split to score on (default: ``test``, else ``validation``).
        pruning_seconds: time cap of greedy pruning (None: no cap).
        head_ablation: False leaves out head ablation and greedy pruning (``L x H`` and more passes over
            the test split; the scale benchmark measures the other passes).

    Returns:
        ``{"baseline_accuracy", "probe_accuracy": [L], "layer_skip_accuracy": [L],
        "truncate_accuracy": [L] (index k = last k blocks removed), "head_ablation_accuracy": [L][H],
        "greedy_pruning": {...}, "num_train", "num_test", "test_split", "probe_features", "seed"}``,
        layers and heads 0-based. Every pass streams the images from `EvalCrops` (on disk); the probe
        features are kept, in float16, at the CLS token's width.
    """
    if 'train' not in dataset_dict:
        raise UserError(f'the importance study fits its probes on a "train" split; the dataset has '
                         f'{list(dataset_dict)}.')
    if test_split is None:
        test_split = 'test' if 'test' in dataset_dict else 'validation'
    if test_split not in dataset_dict:
        raise UserError(f'no {test_split!r} split to score on; the dataset has {list(dataset_dict)}.')
    class_names = getattr(model, 'class_names', None)
    dataset_classes = dataset_dict['train'].features['label'].names
    if class_names is not None and list(class_names) != list(dataset_classes):
        raise UserError(f'the dataset classes {dataset_classes} differ from the model classes {class_names}; '
                         'analyse a model on the dataset it was trained for.')
    vit = vit_of(model)
    vit.eval()
    data_config = model_data_config(vit)
    with EvalCrops(dataset_dict['train'], data_config, max_train) as train_x:
        train_y = train_x.labels
        train_feats = cls_features(vit, train_x, batch_size, dtype=torch.float16)  # [L, M, D]
    with EvalCrops(dataset_dict[test_split], data_config, max_test) as test_x:
        test_y = test_x.labels
        baseline = accuracy(vit, test_x, test_y, batch_size)
        probe = linear_probe(train_feats, train_y, cls_features(vit, test_x, batch_size, dtype=torch.float16),
                             test_y, seed=seed)
        del train_feats
        _logger.info(f'baseline accuracy {baseline:.3f}, probe accuracy per layer {[round(a, 3) for a in probe]}')
        skip = layer_skip_accuracy(vit, test_x, test_y, batch_size)
        result = {
            'baseline_accuracy': baseline,
            'probe_accuracy': probe,
            'layer_skip_accuracy': skip,
            'truncate_accuracy': probe[::-1],  # k blocks removed -> probe after block L-1-k
        }
        if head_ablation:
            heads = head_ablation_accuracy(vit, test_x, test_y, batch_size)
            result['head_ablation_accuracy'] = heads
            result['greedy_pruning'] = greedy_pruning(vit, test_x, test_y, heads, baseline, batch_size=batch_size,
                                                      max_seconds=pruning_seconds)
    return result | {
        'num_train': int(len(train_y)),
        'num_test': int(len(test_y)),
        'test_split': test_split,
        'probe_features': 'CLS token after each block, after the final LayerNorm (float16)',
        'seed': seed,
    }
