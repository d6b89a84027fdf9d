"""Which attention map explains the decision: deletion and insertion tests of every map.

A relevance map ranks the patches of an image. If it explains the prediction, removing its most
relevant patches first makes the probability of the predicted class fall fast (low **deletion**
AUC), and adding them back first to a fully removed image makes it rise fast (high **insertion**
AUC) (Petsiuk, Das & Saenko 2018, "RISE"; the perturbation tests of Chefer, Gur & Wolf 2021).
Maps scored, each ``[P]`` per image, named as in ``faithfulness.json``:

* ``layer_1`` ... ``layer_L``: the head-mean CLS-to-patch attention of each block (1-based, as the
  report numbers layers).
* ``rollout``: attention rollout (`analysis.maps.rollout`), class-agnostic.
* ``gradient_rollout``: gradient-weighted rollout for the predicted class (Chefer, Gur & Wolf 2021,
  "Generic Attention-model Explainability"): ``R = I``; for every layer
  ``R <- R + mean_heads(clamp(dA * A, min=0)) @ R``; the CLS row over the patches. ``A`` are the
  attention probabilities captured by `capture_attentions` (eager path), ``dA`` the gradient of the
  class's logit with respect to them.
* baselines: ``random`` (seeded per image), ``centre`` (nearer the image centre = more relevant)
  and, where the split has flower masks, ``mask`` (the flower's share of each patch: the "model uses
  exactly the flower" reference).

Perturbation: in ``K`` steps, step ``k`` removes the ``n_k ~ k P / K`` most relevant patches
(deletion), or shows only them on a fully removed image (insertion). A removed patch takes the
pixels of a baseline image: ``mean`` (default; the per-channel mean of the images scored),
``black``, or ``blur`` (the image blurred by a Gaussian with sigma = one patch). Ties in a map are
broken by a seeded random order. The curve is the softmax probability of the class predicted on
the intact image; its AUC is the trapezoid over the fraction of patches removed (deletion) or shown
(insertion), in ``[0, 1]``.

Cost: the perturbed copies of a batch of images (every map, every step, both tests) share the
forward passes of the fused (SDPA) model, and the two ends of every curve (the intact and the
fully removed image) are computed once per image: ``2 M (K - 1) + 2`` forwards per image for M
maps, plus one eager forward and backward per image for the maps themselves.
"""
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

from analysis.core.run_files import FAITHFULNESS_FILE
from analysis.core.stats import mean_se
from analysis.maps.attention_metrics import NO_MASKS, fg_ratio
from analysis.maps.extract import check_input_size, eval_loader
from analysis.maps.rollout import rollout_cls
from analysis.modeling.timm_internals import capture_attentions
from analysis.modeling.tokens import TokenLayout
from analysis.modeling.transforms import model_data_config
from analysis.studies.background import sample_rows
from data_scripts.errors import UserError
from data_scripts.files import write_json

_logger = logging.getLogger(__name__)

BASELINES = ('mean', 'black', 'blur')
DEFAULT_STEPS = 8
DEFAULT_MAX_IMAGES = 500
# The training job's bounded call: on the demo model (12 blocks, 64 patches, 17 maps) it costs
# 32 x (2 x 17 x 5 + 2) = 5,504 perturbation forwards plus 32 eager forward + backward passes, about
# the time of 5,600 plain-inference images (about 23 s at the demo's 245 images/s on 2 idle CPU cores;
# bench/faithfulness_throughput.py measures it). Every image or step more costs ~1 / 32 or ~1 / 5 more.
JOB_MAX_IMAGES = 32
JOB_STEPS = 6
MIN_IMAGES = 2  # a standard error needs two images
# background_share: relevance mass of the top quarter of the patches (by the map's own order).
TOP_FRACTION = 0.25
# Maps computed from the model (the candidates for "most faithful"); the others are references.
EXPLANATION_KINDS = ('layer', 'rollout', 'gradient_rollout')
METHOD_LABELS = {'rollout': 'attention rollout', 'gradient_rollout': 'gradient-weighted rollout',
                 'random': 'random map', 'centre': 'centre prior', 'mask': 'flower mask'}


def layer_method(layer: int) -> str:
    """The name of a 0-based layer's map: ``layer_{layer + 1}``."""
    return f'layer_{layer + 1}'


def method_kind(name: str) -> str:
    """``layer``, ``rollout``, ``gradient_rollout``, ``random``, ``centre`` or ``mask``."""
    return 'layer' if name.startswith('layer_') else name


def method_label(name: str) -> str:
    """How a map is named in sentences, tables and figures (``layer 3``, ``attention rollout``, ...)."""
    return name.replace('_', ' ') if method_kind(name) == 'layer' else METHOD_LABELS.get(name, name)


def method_names(num_layers: int, has_masks: bool) -> List[str]:
    """The maps scored, in the order of the ``M`` axis of every tensor here."""
    names = [layer_method(layer) for layer in range(num_layers)] + ['rollout', 'gradient_rollout', 'random', 'centre']
    return names + (['mask'] if has_masks else [])


def check_options(*, steps: int, baseline: str, max_images: Optional[int] = None,
                  top_fraction: float = TOP_FRACTION) -> None:
    """Raises ValueError for an option that cannot give a faithfulness score."""
    if steps < 2:
        raise UserError(f'--steps must be at least 2 (a curve needs a point between the intact and the fully '
                         f'removed image), got {steps}.')
    if baseline not in BASELINES:
        raise UserError(f'--baseline must be one of {", ".join(BASELINES)}, got {baseline!r}.')
    if max_images is not None and max_images < MIN_IMAGES:
        raise UserError(f'--max_images must be at least {MIN_IMAGES} (a standard error over images needs two), '
                         f'got {max_images}.')
    if not 0.0 < top_fraction <= 1.0:
        raise UserError(f'top_fraction must be in (0, 1], got {top_fraction}.')


# ----------------------------------------------------------------------------------------------
# The maps


def layer_maps(attentions: Sequence[torch.Tensor], layout: TokenLayout) -> torch.Tensor:
    """Head-mean CLS-to-patch attention of every layer.

    Args:
        attentions: one ``[B, H, N, N]`` map per layer.
        layout: the model's token layout.

    Returns:
        ``[B, L, P]`` float32.
    """
    return torch.stack([layout.cls_to_patches(a.float()).mean(dim=1) for a in attentions], dim=1)


def gradient_rollout(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor],
                     layout: TokenLayout) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf 2021, Eq. 5-6 without the LRP term).

    ``R = I``; for every layer, first to last, ``R <- R + mean_heads(clamp(grad * A, min=0)) @ R``.

    Args:
        attentions: one ``[B, H, N, N]`` attention map ``A`` per layer, first layer first.
        gradients: ``d score / d A`` of the same shapes.
        layout: the model's token layout.

    Returns:
        ``[B, P]`` float32: the CLS row of ``R`` over the patches (non-negative).
    """
    if len(attentions) == 0 or len(attentions) != len(gradients):
        raise UserError(f'need one gradient per attention map and at least one layer; got {len(attentions)} maps '
                         f'and {len(gradients)} gradients')
    for i, (attn, grad) in enumerate(zip(attentions, gradients)):
        if attn.dim() != 4 or attn.shape != grad.shape or attn.shape != attentions[0].shape:
            raise UserError(f'layer {i}: attention {tuple(attn.shape)} and gradient {tuple(grad.shape)} must both '
                             f'be [B, H, N, N] like layer 0 {tuple(attentions[0].shape)}')
    batch_size, _, num_tokens, _ = attentions[0].shape
    eye = torch.eye(num_tokens, dtype=torch.float32, device=attentions[0].device)  # [N, N]
    relevance = eye.expand(batch_size, num_tokens, num_tokens)  # [B, N, N]
    for attn, grad in zip(attentions, gradients):
        cam = (grad.float() * attn.float()).clamp(min=0).mean(dim=1)  # [B, N, N]
        relevance = relevance + cam @ relevance
    return layout.cls_to_patches(relevance)  # [B, P]


def attention_gradients(vit: torch.nn.Module, pixel_values: torch.Tensor, target: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """One eager forward and backward: every layer's attention and its gradient for a target class.

    The maps recorded by `capture_attentions` are the softmax outputs inside the autograd graph, so
    the gradient of the target logit reaches them directly. The logits of the images of a batch are
    summed before the backward pass; images do not interact in a ViT, so each gets its own gradient.

    Args:
        vit: the timm ViT (eval mode).
        pixel_values: ``[B, 3, H, W]`` on the model's device.
        target: ``[B]`` class per image; default the predicted class.

    Returns:
        ``(logits [B, C], attentions L x [B, H, N, N], gradients L x [B, H, N, N], target [B])``, detached.
    """
    x = pixel_values.detach().requires_grad_(True)  # a graph even where the weights are frozen
    with torch.enable_grad(), capture_attentions(vit) as attentions:
        logits = vit(x)  # [B, C]
    if len(attentions) != len(vit.blocks):
        raise RuntimeError(f'captured {len(attentions)} attention maps from {len(vit.blocks)} blocks')
    if target is None:
        target = logits.argmax(dim=-1)
    score = logits.gather(1, target.to(logits.device)[:, None]).sum()
    gradients = torch.autograd.grad(score, attentions)
    return logits.detach(), [a.detach() for a in attentions], [g.detach() for g in gradients], target


def seeded_uniform(image_ids: Sequence[int], num_values: int, seed: int, stream: int = 0) -> torch.Tensor:
    """``[B, num_values]`` uniform numbers that depend only on (seed, image id, stream), not on the batch."""
    rows = []
    for image_id in image_ids:
        state = int(np.random.SeedSequence([seed, int(image_id), stream]).generate_state(1)[0])
        rows.append(torch.rand(num_values, generator=torch.Generator().manual_seed(state)))
    return torch.stack(rows)


def centre_prior(layout: TokenLayout) -> torch.Tensor:
    """``[P]``: ``1 - d / max d``, d the distance of a patch centre to the image centre."""
    centre = torch.tensor(layout.image_size, dtype=torch.float32) / 2
    distance = (layout.patch_centers() - centre).norm(dim=-1)  # [P]
    return 1.0 - distance / distance.max().clamp_min(1e-12)


def relevance_maps(vit: torch.nn.Module, pixel_values: torch.Tensor, layout: TokenLayout, *,
                   image_ids: Sequence[int], seed: int, fg_fraction: Optional[torch.Tensor] = None,
                   target: Optional[torch.Tensor] = None) -> Tuple[List[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every map of `method_names` for a batch of images.

    Args:
        vit: the timm ViT (eval mode).
        pixel_values: ``[B, 3, H, W]`` on the model's device.
        layout: the model's token layout.
        image_ids: ``[B]`` row of each image in its split (seeds the random map).
        seed: seed of the random map.
        fg_fraction: ``[B, P]`` flower share of each patch; None without masks (no ``mask`` map).
        target: ``[B]`` class whose gradient weights the rollout; default the predicted class.

    Returns:
        ``(names [M], relevance [B, M, P] float32, logits [B, C], target [B])``.
    """
    logits, attentions, gradients, target = attention_gradients(vit, pixel_values, target)
    batch_size, num_patches = pixel_values.shape[0], layout.num_patches
    device = logits.device
    maps = [
        layer_maps(attentions, layout),  # [B, L, P]
        rollout_cls(attentions, layout=layout)[:, None],
        gradient_rollout(attentions, gradients, layout)[:, None],
        seeded_uniform(image_ids, num_patches, seed).to(device)[:, None],
        centre_prior(layout).to(device).expand(batch_size, num_patches)[:, None],
    ]
    if fg_fraction is not None:
        maps.append(fg_fraction.float().to(device)[:, None])
    return method_names(len(attentions), fg_fraction is not None), torch.cat(maps, dim=1), logits, target


# ----------------------------------------------------------------------------------------------
# Perturbation


def perturbation_order(relevance: torch.Tensor, tiebreak: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The patches of every map, most relevant first.

    Args:
        relevance: ``[B, M, P]``.
        tiebreak: ``[B, P]`` random numbers; equal relevance is ordered by them (default: by patch index).

    Returns:
        ``[B, M, P]`` int64 patch indices.
    """
    if tiebreak is None:
        return relevance.argsort(dim=-1, descending=True, stable=True)
    shuffle = tiebreak.argsort(dim=-1)[:, None, :].expand_as(relevance).to(relevance.device)  # [B, M, P]
    shuffled = relevance.gather(-1, shuffle)
    return shuffle.gather(-1, shuffled.argsort(dim=-1, descending=True, stable=True))


def removal_counts(num_patches: int, steps: int) -> torch.Tensor:
    """``[K + 1]`` patches removed (deletion) or shown (insertion) at step ``k``: 0, ..., P.

    ``n_k = floor(k P / K)`` for the first half and ``P - n_{K-k}`` for the second, so that the
    counts are symmetric (``n_{K-k} = P - n_k``; only the middle step of an even K over an odd P
    cannot be): deletion step ``k`` of an order and insertion step ``K - k`` of the reversed order
    show the same image, and a random order scores the same deletion and insertion AUC on average.
    """
    if steps < 2:
        raise UserError(f'--steps must be at least 2, got {steps}.')
    if steps > num_patches:
        raise UserError(f'--steps {steps} is more than the {num_patches} patches of an image; use at most '
                         f'{num_patches}.')
    k = torch.arange(steps + 1)
    low = (k * num_patches) // steps
    high = num_patches - ((steps - k) * num_patches) // steps
    return torch.where(2 * k <= steps, low, high)


def patches_to_pixels(patch_values: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``[n, P]`` -> ``[n, 1, H, W]``, each patch's value over its own pixels."""
    grid = layout.to_grid(patch_values)  # [n, gh, gw]
    ph, pw = layout.patch_size
    return grid.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)[:, None]


def baseline_images(pixel_values: torch.Tensor, baseline: str, layout: TokenLayout, *,
                    data_config: Mapping, dataset_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What a removed patch shows, per image.

    Args:
        pixel_values: ``[B, 3, H, W]`` normalised model inputs.
        baseline: ``mean`` (``dataset_mean``), ``black`` (RGB 0), or ``blur`` (Gaussian, sigma = one patch).
        layout: the model's token layout.
        data_config: timm data config (its mean / std normalise black).
        dataset_mean: ``[3]`` the per-channel mean of the images, normalised (for ``mean``).

    Returns:
        ``[B, 3, H, W]`` normalised.
    """
    if baseline == 'mean':
        if dataset_mean is None:
            raise UserError('the mean baseline needs the dataset mean')
        return dataset_mean.to(pixel_values)[None, :, None, None].expand_as(pixel_values)
    if baseline == 'black':
        mean = torch.tensor(data_config['mean'], dtype=torch.float32)
        std = torch.tensor(data_config['std'], dtype=torch.float32)
        return (-mean / std).to(pixel_values)[None, :, None, None].expand_as(pixel_values)
    if baseline == 'blur':
        sigma = float(max(layout.patch_size))
        kernel = 2 * math.ceil(2 * sigma) + 1
        kernel = min(kernel, 2 * min(pixel_values.shape[-2:]) - 1)  # odd; reflect padding must fit the image
        # Normalisation is affine per channel and the kernel sums to 1: blurring normalised pixels is the same.
        return gaussian_blur(pixel_values, [kernel, kernel], [sigma, sigma])
    raise UserError(f'--baseline must be one of {", ".join(BASELINES)}, got {baseline!r}.')


@torch.inference_mode()
def perturbation_curves(
        classify: Callable[[torch.Tensor], torch.Tensor],
        pixel_values: torch.Tensor,
        baseline: torch.Tensor,
        order: torch.Tensor,
        target: torch.Tensor,
        layout: TokenLayout,
        steps: int,
        batch_size: int = 128,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves of every map, all perturbed copies batched together.

    Args:
        classify: ``[n, 3, H, W]`` -> logits ``[n, C]`` (the fused model).
        pixel_values: ``[B, 3, H, W]`` intact images.
        baseline: ``[B, 3, H, W]`` what removed patches show (`baseline_images`).
        order: ``[B, M, P]`` patches of each map, most relevant first (`perturbation_order`).
        target: ``[B]`` the class whose probability is recorded.
        layout: the model's token layout.
        steps: ``K``.
        batch_size: images per forward pass (copies of different images and maps share a pass).

    Returns:
        ``(deletion, insertion)``, each ``[B, M, K + 1]`` float32 on the CPU: the softmax probability of
        ``target`` after step ``k``. ``deletion[..., 0]`` and ``insertion[..., K]`` are the intact image,
        ``deletion[..., K]`` and ``insertion[..., 0]`` the fully removed one.
    """
    B, M, P = order.shape
    assert P == layout.num_patches, f'{P} patches in the order, {layout.num_patches} in the layout'
    counts = removal_counts(P, steps).to(order.device)  # [K + 1]
    rank = order.argsort(dim=-1)  # [B, M, P]: the place of each patch in the order (0 = most relevant)
    deleted = rank[:, :, None, :] < counts[1:-1][None, None, :, None]  # [B, M, K-1, P] removed at inner step k
    # insertion at step k shows exactly the patches deletion removes at step k: the complement
    removed = torch.stack([deleted, ~deleted], dim=2).reshape(-1, P)  # [B*M*2*(K-1), P]
    ends = torch.zeros(B, 2, P, dtype=torch.bool, device=order.device)
    ends[:, 1] = True  # [B, (intact, fully removed), P]
    removed = torch.cat([ends.reshape(-1, P), removed])  # [2B + B*M*2*(K-1), P]
    image = torch.cat([torch.arange(B).repeat_interleave(2), torch.arange(B).repeat_interleave(M * 2 * (steps - 1))])
    image = image.to(pixel_values.device)
    target = target.to(pixel_values.device)

    probs = torch.empty(len(removed), dtype=torch.float32)
    for start in range(0, len(removed), batch_size):
        rows = slice(start, start + batch_size)
        which = image[rows]
        mask = patches_to_pixels(removed[rows].to(pixel_values.device), layout)  # [n, 1, H, W]
        x = torch.where(mask, baseline[which], pixel_values[which])  # [n, 3, H, W]
        p = classify(x).float().softmax(dim=-1)  # [n, C]
        probs[rows] = p.gather(1, target[which][:, None])[:, 0].cpu()

    intact, empty = probs[:2 * B].view(B, 2).unbind(dim=1)  # [B] each
    inner = probs[2 * B:].view(B, M, 2, steps - 1)
    intact, empty = intact[:, None, None].expand(B, M, 1), empty[:, None, None].expand(B, M, 1)
    deletion = torch.cat([intact, inner[:, :, 0], empty], dim=-1)
    insertion = torch.cat([empty, inner[:, :, 1], intact], dim=-1)
    return deletion, insertion


def background_share(relevance: torch.Tensor, order: torch.Tensor, fg_fraction: torch.Tensor,
                     top_fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Share of a map's top relevance mass that lies on background pixels.

    Args:
        relevance: ``[B, M, P]`` non-negative maps.
        order: ``[B, M, P]`` their `perturbation_order`.
        fg_fraction: ``[B, P]`` flower share of each patch.
        top_fraction: the top ``round(top_fraction * P)`` patches of each map count (at least one).

    Returns:
        ``[B, M]``: ``sum_top r_p (1 - f_p) / sum_top r_p``; NaN where the top patches hold no mass.
    """
    k = max(1, round(top_fraction * relevance.shape[-1]))
    top = order[..., :k]  # [B, M, k]
    mass = relevance.gather(-1, top).clamp(min=0)  # [B, M, k]
    background = 1.0 - fg_fraction.float()[:, None, :].expand_as(relevance).gather(-1, top)  # [B, M, k]
    total = mass.sum(dim=-1)
    share = (mass * background).sum(dim=-1) / total.clamp_min(1e-12)
    return torch.where(total > 0, share, torch.full_like(share, float('nan')))


# ----------------------------------------------------------------------------------------------
# Statistics


def method_scores(deletion: np.ndarray, insertion: np.ndarray, fractions: np.ndarray) -> Dict:
    """AUCs (mean and standard error over images) and mean curves of one map.

    Args:
        deletion / insertion: ``[n, K + 1]`` curves of one map on ``n`` images.
        fractions: ``[K + 1]``.
    """
    deletion_auc = np.trapezoid(deletion, fractions, axis=-1)
    insertion_auc = np.trapezoid(insertion, fractions, axis=-1)
    return {'deletion_auc': mean_se(deletion_auc), 'insertion_auc': mean_se(insertion_auc),
            'difference': mean_se(insertion_auc - deletion_auc),
            'deletion_curve': deletion.mean(axis=0).tolist() if len(deletion) else None,
            'insertion_curve': insertion.mean(axis=0).tolist() if len(insertion) else None}


def rank_methods(names: Sequence[str], deletion: np.ndarray, insertion: np.ndarray, fractions: np.ndarray,
                 correct: Optional[np.ndarray] = None, background: Optional[np.ndarray] = None) -> Dict:
    """Per map: AUCs, their difference and mean curves; split by correct / wrong; background share.

    Args:
        names: ``[M]`` map names.
        deletion / insertion: ``[n, M, K + 1]`` curves.
        fractions: ``[K + 1]`` fraction of patches removed (deletion) or shown (insertion).
        correct: ``[n]`` bool, whether each image was classified correctly (None: not known).
        background: ``[n, M]`` `background_share` (None without masks).

    Returns:
        The ``methods`` and ``ranking`` entries of ``faithfulness.json`` plus ``most_faithful``.
    """
    methods = {}
    for m, name in enumerate(names):
        entry = {'kind': method_kind(name), **method_scores(deletion[:, m], insertion[:, m], fractions)}
        if method_kind(name) == 'layer':
            entry['layer'] = int(name.split('_')[1]) - 1
        if correct is not None:
            entry['by_outcome'] = {outcome: method_scores(deletion[keep, m], insertion[keep, m], fractions)
                                   for outcome, keep in (('correct', correct), ('wrong', ~correct))}
        if background is not None:
            entry['background_share'] = mean_se(background[:, m])
        methods[name] = entry
    difference = np.trapezoid(insertion, fractions, axis=-1) - np.trapezoid(deletion, fractions, axis=-1)  # [n, M]
    ranking = sorted(names, key=lambda n: -methods[n]['difference']['mean'])
    best = most_faithful(list(names), difference)
    if background is not None and 'random' in names:
        # paired per image: does the best map put more of its top relevance on the background than chance?
        best['background_vs_random'] = mean_se(background[:, names.index(best['method'])]
                                               - background[:, names.index('random')])
    return {'methods': methods, 'ranking': ranking, 'most_faithful': best}


def most_faithful(names: List[str], difference: np.ndarray) -> Dict:
    """The model-derived map with the highest mean insertion - deletion AUC, and how sure that is.

    Args:
        names: ``[M]``.
        difference: ``[n, M]`` insertion - deletion AUC per image.

    Returns:
        ``{"method", "runner_up", "margin": paired mean_se of the difference to the runner-up,
        "vs_random": paired mean_se of the difference to the random map, "best_layer", "layer_ranking"}``
        (`rank_methods` adds ``background_vs_random``: the paired difference of `background_share`).
    """
    mean = difference.mean(axis=0)
    candidates = sorted((i for i, n in enumerate(names) if method_kind(n) in EXPLANATION_KINDS), key=lambda i: -mean[i])
    layers = [i for i in candidates if method_kind(names[i]) == 'layer']
    best = candidates[0]
    out = {'method': names[best], 'runner_up': None, 'margin': None, 'vs_random': None,
           'best_layer': names[layers[0]] if layers else None, 'layer_ranking': [names[i] for i in layers]}
    if len(candidates) > 1:
        out['runner_up'] = names[candidates[1]]
        out['margin'] = mean_se(difference[:, best] - difference[:, candidates[1]])
    if 'random' in names:
        out['vs_random'] = mean_se(difference[:, best] - difference[:, names.index('random')])
    return out


# ----------------------------------------------------------------------------------------------
# Over a dataset split


def channel_mean(loader: DataLoader) -> torch.Tensor:
    """``[3]`` per-channel mean of the (normalised) images of a loader."""
    total, count = torch.zeros(3, dtype=torch.float64), 0
    for batch in loader:
        pixels = batch['pixel_values']
        total += pixels.double().sum(dim=(0, 2, 3))
        count += pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
    return (total / count).float()


@dataclass
class _Curves:
    """What the pass over the images collects, batch after batch (on the CPU)."""
    names: List[str] = field(default_factory=list)  # [M] the maps scored (`method_names`)
    deletion: List[torch.Tensor] = field(default_factory=list)  # [B, M, K + 1] per batch
    insertion: List[torch.Tensor] = field(default_factory=list)  # [B, M, K + 1] per batch
    correct: List[torch.Tensor] = field(default_factory=list)  # [B] bool per batch: predicted class == label
    background: List[torch.Tensor] = field(default_factory=list)  # [B, M] `background_share` per batch (masks)
    ratio_sum: Optional[torch.Tensor] = None  # [L] every layer map's fg_ratio, summed over the images (masks)
    area_sum: Optional[torch.Tensor] = None  # [] the flower's share of the image, summed over the images (masks)
    labelled: bool = True  # no label is -1


def _study_rows(num_rows: int, num_patches: int, steps: int, max_images: Optional[int], seed: int) -> np.ndarray:
    """The rows scored (`sample_rows`); refuses more steps than patches, or too few images, before any work."""
    removal_counts(num_patches, steps)
    rows = sample_rows(num_rows, max_images, seed)
    if len(rows) < MIN_IMAGES:
        raise UserError(f'the faithfulness scores need at least {MIN_IMAGES} images for a standard error; the '
                         f'split has {len(rows)}. Use a larger split.')
    return rows


def _score_images(model, loader: DataLoader, rows: np.ndarray, *, steps: int, baseline: str, batch_size: int,
                  seed: int, top_fraction: float, data_config: Dict, dataset_mean: Optional[torch.Tensor],
                  has_masks: bool, progress: bool) -> _Curves:
    """Every map of every image of ``loader`` (split rows ``rows``), and its deletion and insertion curves."""
    vit, layout = model.timm_model, model.token_layout
    curves = _Curves()
    start = 0
    for batch in tqdm(loader, disable=not progress, desc='faithfulness'):
        pixel_values = batch['pixel_values'].to(model.device, model.dtype)
        check_input_size(pixel_values, layout)
        ids = rows[start:start + len(pixel_values)].tolist()
        start += len(pixel_values)
        fg = layout.patch_fraction(batch['fg_mask'].to(model.device)) if has_masks else None  # [B, P]
        curves.names, relevance, _, target = relevance_maps(vit, pixel_values, layout, image_ids=ids, seed=seed,
                                                            fg_fraction=fg)
        order = perturbation_order(relevance, seeded_uniform(ids, layout.num_patches, seed, stream=1))
        base = baseline_images(pixel_values, baseline, layout, data_config=data_config, dataset_mean=dataset_mean)
        d, i = perturbation_curves(vit, pixel_values, base, order, target, layout, steps, batch_size)
        curves.deletion.append(d)
        curves.insertion.append(i)
        curves.correct.append(target.cpu() == batch['labels'])
        curves.labelled = curves.labelled and bool((batch['labels'] >= 0).all())
        if has_masks:
            curves.background.append(background_share(relevance, order, fg, top_fraction).cpu())
            ratio = fg_ratio(relevance[:, :len(vit.blocks)], fg).sum(dim=0).cpu()  # [L]
            area = fg.float().mean(dim=-1).sum().cpu()
            curves.ratio_sum = ratio if curves.ratio_sum is None else curves.ratio_sum + ratio
            curves.area_sum = area if curves.area_sum is None else curves.area_sum + area
    return curves


def _omitted(has_masks: bool, labelled: bool, scored: bool, class_names: Sequence[str]) -> Dict[str, str]:
    """What the result leaves out, and why (its ``omitted`` entry)."""
    omitted = {}
    if not has_masks:
        omitted['mask'] = f'{NO_MASKS}: no flower-mask map, no background share, no fg_lift'
    if not labelled:
        omitted['by_outcome'] = 'the split is unlabeled (label -1): correct and wrong images cannot be told apart'
    elif not scored:
        omitted['by_outcome'] = (f'the model predicts its own classes, not the dataset\'s {class_names}: '
                                 'correct and wrong images cannot be told apart')
    return omitted


def _flower_entries(curves: _Curves, num_images: int) -> Dict:
    """``flower_area``, ``background_area``, ``fg_lift`` (``[L]``) and ``highest_fg_lift_layer`` (with masks)."""
    flower = float(curves.area_sum) / num_images
    lift = (curves.ratio_sum / num_images / flower).tolist() if flower > 0 else None
    return {'flower_area': flower, 'background_area': 1.0 - flower, 'fg_lift': lift,
            'highest_fg_lift_layer': int(np.argmax(lift)) if lift else None}


def faithfulness_study(
        model,
        dataset_split: datasets.Dataset,
        *,
        max_images: Optional[int] = DEFAULT_MAX_IMAGES,
        steps: int = DEFAULT_STEPS,
        baseline: str = 'mean',
        batch_size: int = 128,
        seed: int = 0,
        split: str = 'test',
        model_id: str = '',
        top_fraction: float = TOP_FRACTION,
        progress: bool = True,
) -> Dict:
    """Deletion and insertion AUC of every layer's map, rollout, gradient-weighted rollout and the baselines.

    Args:
        model: `TimmViTForImageClassification`.
        dataset_split: split with ``image`` and ``label`` columns, and ``mask`` for the mask map and
            the background share.
        max_images: score this many images drawn by seed (None: all).
        steps: ``K``, perturbation steps per curve (2 .. P).
        baseline: what a removed patch shows: ``mean``, ``black`` or ``blur``.
        batch_size: images per gradient pass and per perturbation forward pass.
        seed: seed of the image sample, the random map and the tie-breaking.
        split / model_id: recorded in the result.
        top_fraction: share of the patches whose relevance mass `background_share` looks at.
        progress: show a tqdm bar.

    Returns:
        The content of ``faithfulness.json``: ``{"methods": {name: {"kind", "deletion_auc",
        "insertion_auc", "difference" (each {"mean", "se", "num_images"}), "deletion_curve",
        "insertion_curve" ([K + 1] means), "by_outcome": {"correct"|"wrong": {...}},
        "background_share"}}, "ranking", "most_faithful", "fractions", "steps", "baseline", "fg_lift",
        "highest_fg_lift_layer", "num_images", ..., "omitted": {what: why}}``.
    """
    check_options(steps=steps, baseline=baseline, max_images=max_images, top_fraction=top_fraction)
    if batch_size < 1:
        raise UserError(f'--batch_size must be at least 1, got {batch_size}.')
    start_time = time.monotonic()
    model.timm_model.eval()
    layout = model.token_layout
    rows = _study_rows(len(dataset_split), layout.num_patches, steps, max_images, seed)
    data_config = model_data_config(model.timm_model)
    has_masks = 'mask' in dataset_split.column_names
    class_names = dataset_split.features['label'].names
    loader = eval_loader(dataset_split, rows.tolist(), data_config, has_masks, batch_size)
    dataset_mean = channel_mean(loader) if baseline == 'mean' else None
    curves = _score_images(model, loader, rows, steps=steps, baseline=baseline, batch_size=batch_size, seed=seed,
                           top_fraction=top_fraction, data_config=data_config, dataset_mean=dataset_mean,
                           has_masks=has_masks, progress=progress)

    num_images = int(len(rows))
    fractions = (removal_counts(layout.num_patches, steps).double() / layout.num_patches).numpy()
    correct = torch.cat(curves.correct).numpy()
    scored = list(model.class_names) == list(class_names) and curves.labelled
    result = rank_methods(curves.names, torch.cat(curves.deletion).double().numpy(),
                          torch.cat(curves.insertion).double().numpy(), fractions,
                          correct=correct if scored else None,
                          background=torch.cat(curves.background).double().numpy() if has_masks else None)
    result.update({
        'fractions': fractions.tolist(), 'steps': steps, 'num_patches': layout.num_patches, 'baseline': baseline,
        'num_images': num_images, 'num_correct': int(correct.sum()) if scored else None,
        'top_fraction': top_fraction, 'seed': seed, 'split': split, 'model_id': model_id,
        'forwards_per_image': 2 * len(curves.names) * (steps - 1) + 2, 'has_masks': has_masks,
        'omitted': _omitted(has_masks, curves.labelled, scored, class_names),
    })
    if dataset_mean is not None:
        mean, std = torch.tensor(data_config['mean']), torch.tensor(data_config['std'])
        result['baseline_rgb'] = (dataset_mean * std + mean).tolist()  # in [0, 1], for the record
    if has_masks:
        result.update(_flower_entries(curves, num_images))
    result['seconds'] = time.monotonic() - start_time
    _logger.info('faithfulness of %d maps on %d images (%d steps, %s baseline): most faithful %s, %.0f s',
                 len(curves.names), num_images, steps, baseline, result['most_faithful']['method'], result['seconds'])
    return result


def faithfulness_to_dir(
        model,
        dataset_split: datasets.Dataset,
        output_dir: Union[str, Path],
        *,
        max_images: Optional[int] = JOB_MAX_IMAGES,
        steps: int = JOB_STEPS,
        batch_size: int = 128,
        baseline: str = 'mean',
        seed: int = 0,
        split: str = 'test',
        model_id: str = '',
        progress: bool = True,
) -> Path:
    """`faithfulness_study` into ``output_dir/faithfulness.json``; `analysis.render.report.write_report` draws its figure.

    The defaults are the training job's bounded sample (``JOB_MAX_IMAGES`` images, ``JOB_STEPS``
    steps); the command line scores ``DEFAULT_MAX_IMAGES``. Arguments as in `faithfulness_study`.

    Returns:
        The path of the JSON file written.
    """
    path = Path(output_dir) / FAITHFULNESS_FILE
    write_json(path, faithfulness_study(model, dataset_split, max_images=max_images, steps=steps,
                                        batch_size=batch_size, baseline=baseline, seed=seed, split=split,
                                        model_id=model_id, progress=progress))
    _logger.info('faithfulness scores -> %s', path)
    return path


def faithfulness_summary(faithfulness: Mapping) -> Dict:
    """The numbers of one model that the background study compares (see `analysis.study`).

    Returns:
        ``{"most_faithful", "difference", "background_share" (of its top relevance mass),
        "background_share_random", "background_area"}``; the shares are None without masks.
    """
    methods = faithfulness['methods']
    best = faithfulness['most_faithful']['method']

    def share(name):
        return (methods.get(name, {}).get('background_share') or {}).get('mean')

    return {'most_faithful': best, 'difference': methods[best]['difference']['mean'],
            'background_share': share(best), 'background_share_random': share('random'),
            'background_area': faithfulness.get('background_area')}
