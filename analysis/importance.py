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
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from data_scripts import to_rgb

from .transforms import eval_transform, model_data_config

_logger = logging.getLogger(__name__)

PRUNING_TOLERANCE = 0.01  # heads count as prunable while accuracy >= baseline - 1 point
PRUNING_STOP_DROP = 0.05  # greedy pruning stops once accuracy is more than 5 points below baseline


def _vit(model: nn.Module) -> nn.Module:
    """The timm ViT inside a `TimmViTForImageClassification` (or the ViT itself)."""
    vit = getattr(model, 'timm_model', model)
    if not isinstance(getattr(vit, 'blocks', None), nn.Sequential):
        raise ValueError(f'{type(vit).__name__} has no transformer blocks (model.blocks); the importance study '
                         'needs a timm ViT such as vit_* or deit_*.')
    return vit


def image_tensors(model: nn.Module, dataset: datasets.Dataset, data_config: Optional[Dict] = None,
                  max_images: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model inputs of a split, transformed once and kept in memory.

    Args:
        model: the model (its timm data config gives the eval transform).
        dataset: split with ``image`` and ``label`` columns.
        data_config: timm data config (default: the model's).
        max_images: use only the first this many images.

    Returns:
        ``(pixel_values [M, 3, H, W] float32, labels [M] int64)``.
    """
    data_config = data_config or model_data_config(_vit(model))
    transform = eval_transform(data_config)
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n == 0:
        raise ValueError('the split has no images.')
    subset = dataset.select(range(n)) if n < len(dataset) else dataset
    pixels = torch.stack([transform(to_rgb(img)) for img in subset['image']])  # [M, 3, H, W]
    labels = torch.tensor(subset['label'], dtype=torch.long)  # [M]
    return pixels, labels


@torch.inference_mode()
def predict(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Predicted class of every image, ``[M]``, from the ViT's own head."""
    vit = _vit(model)
    vit.eval()
    device = next(vit.parameters()).device
    preds = [vit(pixel_values[i:i + batch_size].to(device)).argmax(-1).cpu()
             for i in range(0, len(pixel_values), batch_size)]
    return torch.cat(preds)


def accuracy(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> float:
    """Share of images the model classifies correctly."""
    return float((predict(model, pixel_values, batch_size) == labels).float().mean())


@torch.inference_mode()
def cls_features(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The CLS token after every block, after the final LayerNorm.

    Args:
        model: the ViT (or its wrapper).
        pixel_values: ``[M, 3, H, W]`` model inputs (see `image_tensors`).
        batch_size: images per forward pass.

    Returns:
        ``[L, M, D]`` float32.
    """
    vit = _vit(model)
    if getattr(vit, 'cls_token', None) is None:
        raise ValueError(f'{type(vit).__name__} has no CLS token (class_token=False); the linear probe reads the '
                         'CLS token after each block.')
    vit.eval()
    device = next(vit.parameters()).device
    feats = []
    for i in range(0, len(pixel_values), batch_size):
        inter = vit.forward_intermediates(pixel_values[i:i + batch_size].to(device), indices=None, return_prefix_tokens=True,
                                          norm=True, output_fmt='NLC', intermediates_only=True)
        # inter: L x (patch tokens [B, P, D], prefix tokens [B, prefix, D]); CLS is prefix token 0
        feats.append(torch.stack([prefix[:, 0] for _, prefix in inter]).cpu())  # [L, B, D]
    return torch.cat(feats, dim=1).float()


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, seed: int = 0, max_iter: int = 2000) -> List[float]:
    """Test accuracy of a logistic-regression probe per layer.

    Args:
        train_feats: ``[L, M, D]`` features of the training images.
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
        raise ValueError('the probe needs training images of at least two classes.')
    accs = []
    for layer in range(train_feats.shape[0]):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
        probe.fit(np.asarray(train_feats[layer]), y_train)
        accs.append(float(probe.score(np.asarray(test_feats[layer]), y_test)))
    return accs


def _check_layers(vit: nn.Module, layers: Sequence[int]) -> None:
    num = len(vit.blocks)
    for layer in layers:
        if not 0 <= int(layer) < num:
            raise ValueError(f'layer {layer} does not exist; the model has blocks 0..{num - 1}.')


@contextmanager
def skip_blocks(model: nn.Module, indices: Sequence[int]) -> Iterator[None]:
    """Replaces ``blocks[i]`` by the identity for every ``i`` in indices, restoring them on exit."""
    vit = _vit(model)
    _check_layers(vit, indices)
    originals = {int(i): vit.blocks[int(i)] for i in indices}
    try:
        for i in originals:
            vit.blocks[i] = nn.Identity()
        yield
    finally:
        for i, block in originals.items():
            vit.blocks[i] = block


@contextmanager
def ablate_heads(model: nn.Module, heads: Sequence[Tuple[int, int]]) -> Iterator[None]:
    """Zeroes the output of the given ``(layer, head)`` pairs while the context is open.

    A forward pre-hook on ``blocks[layer].attn.proj`` zeroes the slice ``[h*d, (h+1)*d)`` of its input
    ``[B, N, H*d]`` (the concatenated head outputs). The hooks are always removed on exit.
    """
    vit = _vit(model)
    by_layer: Dict[int, List[int]] = {}
    for layer, head in heads:
        _check_layers(vit, [layer])
        num_heads = vit.blocks[int(layer)].attn.num_heads
        if not 0 <= int(head) < num_heads:
            raise ValueError(f'head {head} does not exist; layer {layer} has heads 0..{num_heads - 1}.')
        by_layer.setdefault(int(layer), []).append(int(head))
    handles = []

    def make_hook(head_list: List[int], head_dim: int):
        def zero_heads(module, args):
            x = args[0].clone()  # [B, N, H*d]
            for h in head_list:
                x[..., h * head_dim:(h + 1) * head_dim] = 0
            return (x,) + tuple(args[1:])
        return zero_heads

    try:
        for layer, head_list in by_layer.items():
            attn = vit.blocks[layer].attn
            handles.append(attn.proj.register_forward_pre_hook(make_hook(head_list, attn.head_dim)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_skip_accuracy(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 128) -> List[float]:
    """``[L]``: accuracy with block ``l`` replaced by the identity."""
    accs = []
    for layer in range(len(_vit(model).blocks)):
        with skip_blocks(model, [layer]):
            accs.append(accuracy(model, pixel_values, labels, batch_size))
    return accs


def head_ablation_accuracy(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor,
                           batch_size: int = 128) -> List[List[float]]:
    """``[L][H]``: accuracy with one head zeroed."""
    vit = _vit(model)
    return [[_ablated_accuracy(model, [(layer, head)], pixel_values, labels, batch_size)
             for head in range(block.attn.num_heads)] for layer, block in enumerate(vit.blocks)]


def _ablated_accuracy(model, heads, pixel_values, labels, batch_size) -> float:
    with ablate_heads(model, heads):
        return accuracy(model, pixel_values, labels, batch_size)


def greedy_pruning(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor,
                   head_accuracy: Sequence[Sequence[float]], baseline: float, *, batch_size: int = 128,
                   tolerance: float = PRUNING_TOLERANCE, stop_drop: float = PRUNING_STOP_DROP,
                   max_seconds: Optional[float] = None) -> Dict:
    """Removes heads one by one, least important first, and scores the model after each removal.

    Args:
        model: the ViT.
        pixel_values / labels: test images ``[M, 3, H, W]`` and labels ``[M]``.
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

    Returns:
        ``{"baseline_accuracy", "probe_accuracy": [L], "layer_skip_accuracy": [L],
        "truncate_accuracy": [L] (index k = last k blocks removed), "head_ablation_accuracy": [L][H],
        "greedy_pruning": {...}, "num_train", "num_test", "test_split", "probe_features", "seed"}``,
        layers and heads 0-based.
    """
    if 'train' not in dataset_dict:
        raise ValueError(f'the importance study fits its probes on a "train" split; the dataset has '
                         f'{list(dataset_dict)}.')
    if test_split is None:
        test_split = 'test' if 'test' in dataset_dict else 'validation'
    if test_split not in dataset_dict:
        raise ValueError(f'no {test_split!r} split to score on; the dataset has {list(dataset_dict)}.')
    class_names = getattr(model, 'class_names', None)
    dataset_classes = dataset_dict['train'].features['label'].names
    if class_names is not None and list(class_names) != list(dataset_classes):
        raise ValueError(f'the dataset classes {dataset_classes} differ from the model classes {class_names}; '
                         'analyse a model on the dataset it was trained for.')
    vit = _vit(model)
    vit.eval()
    data_config = model_data_config(vit)
    train_x, train_y = image_tensors(vit, dataset_dict['train'], data_config, max_train)
    test_x, test_y = image_tensors(vit, dataset_dict[test_split], data_config, max_test)

    baseline = accuracy(vit, test_x, test_y, batch_size)
    probe = linear_probe(cls_features(vit, train_x, batch_size), train_y, cls_features(vit, test_x, batch_size),
                         test_y, seed=seed)
    _logger.info(f'baseline accuracy {baseline:.3f}, probe accuracy per layer {[round(a, 3) for a in probe]}')
    skip = layer_skip_accuracy(vit, test_x, test_y, batch_size)
    heads = head_ablation_accuracy(vit, test_x, test_y, batch_size)
    pruning = greedy_pruning(vit, test_x, test_y, heads, baseline, batch_size=batch_size, max_seconds=pruning_seconds)
    return {
        'baseline_accuracy': baseline,
        'probe_accuracy': probe,
        'layer_skip_accuracy': skip,
        'truncate_accuracy': probe[::-1],  # k blocks removed -> probe after block L-1-k
        'head_ablation_accuracy': heads,
        'greedy_pruning': pruning,
        'num_train': int(len(train_y)),
        'num_test': int(len(test_y)),
        'test_split': test_split,
        'probe_features': 'CLS token after each block, after the final LayerNorm',
        'seed': seed,
    }
