"""What training changed in the attention: the same images' maps from the starting weights and after training.

Two attention summaries of the same images (`analysis.maps.summary`) — one of the weights training started
from (``attentions_start.safetensors``: the pretrained backbone as loaded, or the initialisation),
one after training (``attentions.safetensors``) — and their metrics are compared layer by layer:

* the dataset metrics before and after (head-mean map: fg_lift, pointing game, entropy, mean
  attention distance);
* how far each image's CLS map moved: the Jensen-Shannon divergence (base 2, in [0, 1]) between the
  image's head-averaged CLS-to-patch map at the start and at the end, renormalised over the patches;
  its mean, standard deviation, standard error and median over the images;
* with masks, the per-image change of ``fg_ratio`` (end - start, paired by image), mean and standard
  error: negative means training moved attention off the flower.

Rows are read in chunks (``safe_open`` slices), so memory does not grow with the number of images.
"""
import math
from pathlib import Path
from typing import Dict, Iterator, Mapping, Tuple, Union

import torch
from safetensors import safe_open

from analysis.core.stats import mean_sd_se_from_sums
from analysis.maps.attention_metrics import fg_ratio
from analysis.maps.summary import read_summary_meta
from data_scripts.errors import UserError

CHUNK = 256  # images per read
COMPARED_METRICS = ('fg_lift', 'pointing_game', 'entropy', 'mean_attention_distance')


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits between distributions over the last dimension.

    Args:
        p, q: ``[..., P]`` non-negative; each is renormalised to sum to 1.

    Returns:
        ``[...]`` float32 in ``[0, 1]``: 0 for equal maps, 1 for maps on disjoint patches.
    """
    p = p.float() / p.float().sum(dim=-1, keepdim=True).clamp_min(1e-12)
    q = q.float() / q.float().sum(dim=-1, keepdim=True).clamp_min(1e-12)
    m = 0.5 * (p + q)
    kl = lambda a, b: (torch.special.xlogy(a, a) - torch.special.xlogy(a, b.clamp_min(1e-30))).sum(dim=-1)  # noqa: E731
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)) / math.log(2)


def _chunks(path: Path, names: Tuple[str, ...], num_images: int) -> Iterator[Dict[str, torch.Tensor]]:
    with safe_open(str(path), framework='pt') as f:
        available = set(f.keys())
        for start in range(0, num_images, CHUNK):
            yield {n: f.get_slice(n)[start:start + CHUNK] for n in names if n in available}


def check_same_images(start_meta: Mapping, end_meta: Mapping) -> None:
    """Raises unless two summaries describe the same images with the same token layout."""
    for key in ('num_images', 'num_layers', 'num_heads', 'layout', 'dataset', 'split'):
        if start_meta.get(key) != end_meta.get(key):
            raise UserError(f'the start and end attention summaries differ in {key} ({start_meta.get(key)!r} vs '
                             f'{end_meta.get(key)!r}); extract both from the same images.')


def attention_change(start_summary: Union[str, Path], end_summary: Union[str, Path],
                     start_metrics: Mapping, end_metrics: Mapping) -> Dict:
    """Layer by layer, how the attention of the same images changed between two summaries.

    Args:
        start_summary / end_summary: ``attentions_start.safetensors`` / ``attentions.safetensors``.
        start_metrics / end_metrics: their ``attention_metrics`` dicts.

    Returns:
        ``{"num_images", "num_layers", "metrics": {name: {"start": [L], "end": [L]}}, "rollout":
        {name: {"start", "end"}}, "js_divergence": {"mean", "std", "se", "median": [L]},
        "fg_ratio_change": {"mean", "se": [L]} (with masks), "has_masks"}``; layers 0-based.
    """
    start_meta, end_meta = read_summary_meta(start_summary), read_summary_meta(end_summary)
    check_same_images(start_meta, end_meta)
    n, num_layers = int(start_meta['num_images']), int(start_meta['num_layers'])
    has_masks = bool(start_meta['has_masks'] and end_meta['has_masks'])
    if n < 2:
        raise UserError('comparing attention needs at least 2 images (a standard error needs two).')

    js_sum, js_sq = torch.zeros(num_layers, dtype=torch.float64), torch.zeros(num_layers, dtype=torch.float64)
    js_all = []  # [M, L] float32 for the median: 4 bytes per image and layer
    fg_sum, fg_sq = torch.zeros(num_layers, dtype=torch.float64), torch.zeros(num_layers, dtype=torch.float64)
    names = ('labels', 'cls_attention', 'fg_fraction')
    for start, end in zip(_chunks(Path(start_summary), names, n), _chunks(Path(end_summary), names, n)):
        if not torch.equal(start['labels'], end['labels']):
            raise UserError('the two attention summaries hold different images (labels differ); extract both '
                             'from the same split in the same order.')
        before = start['cls_attention'].float().mean(dim=2)  # [B, L, P], head-averaged map
        after = end['cls_attention'].float().mean(dim=2)
        js = js_divergence(before, after).double()  # [B, L]
        js_sum += js.sum(0)
        js_sq += (js ** 2).sum(0)
        js_all.append(js.float())
        if has_masks:
            change = (fg_ratio(after, start['fg_fraction']) - fg_ratio(before, start['fg_fraction'])).double()
            fg_sum += change.sum(0)
            fg_sq += (change ** 2).sum(0)

    mean, std, se = mean_sd_se_from_sums(js_sum, js_sq, n)
    result = {
        'num_images': n, 'num_layers': num_layers, 'has_masks': has_masks,
        'start_model': start_meta.get('model_id'), 'end_model': end_meta.get('model_id'),
        'js_divergence': {'mean': mean, 'std': std, 'se': se,
                          'median': torch.cat(js_all).median(dim=0).values.tolist()},
        'metrics': {}, 'rollout': {},
    }
    for name in COMPARED_METRICS:
        before = start_metrics.get('layers', {}).get(name)
        after = end_metrics.get('layers', {}).get(name)
        if before is not None and after is not None:
            result['metrics'][name] = {'start': before['mean'], 'end': after['mean']}
        rollout_before = (start_metrics.get('rollout') or {}).get(name)
        rollout_after = (end_metrics.get('rollout') or {}).get(name)
        if rollout_before is not None and rollout_after is not None:
            result['rollout'][name] = {'start': rollout_before, 'end': rollout_after}
    if has_masks:
        fg_mean, _, fg_se = mean_sd_se_from_sums(fg_sum, fg_sq, n)
        result['fg_ratio_change'] = {'mean': fg_mean, 'se': fg_se}
    return result


def compare_runs(change_a: Mapping, change_b: Mapping) -> Dict:
    """Per layer, whether run a's training moved attention off the flower more than run b's.

    ``difference = fg_ratio_change(a) - fg_ratio_change(b)``, with ``se = sqrt(se_a^2 + se_b^2)`` (the runs'
    images are independent); ``verdict`` is ``"a moved off the flower more"`` when the difference is below
    -2 SE, ``"b moved off the flower more"`` above +2 SE, else ``"within noise"``.
    """
    if 'fg_ratio_change' not in change_a or 'fg_ratio_change' not in change_b:
        raise UserError('both runs need flower masks to compare how far training moved attention off the flower.')
    a, b = change_a['fg_ratio_change'], change_b['fg_ratio_change']
    layers = []
    for layer in range(len(a['mean'])):
        difference = a['mean'][layer] - b['mean'][layer]
        se = math.sqrt(a['se'][layer] ** 2 + b['se'][layer] ** 2)
        verdict = ('a moved off the flower more' if difference < -2 * se else
                   'b moved off the flower more' if difference > 2 * se else 'within noise')
        layers.append({'a': a['mean'][layer], 'b': b['mean'][layer], 'difference': difference, 'se': se,
                       'verdict': verdict})
    return {'layers': layers}
