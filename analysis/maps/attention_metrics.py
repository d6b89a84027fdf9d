"""Where does the CLS token look? Metrics of attention against a flower mask, per layer and head.

Per image (pure functions on tensors):

* ``fg_ratio``: share of the CLS attention mass that lands on the flower,
  ``sum_p a_p f_p / sum_p a_p`` with ``f_p`` the fraction of patch ``p`` covered by the flower
  (the energy-based pointing game of Score-CAM, Wang et al. 2020).
* ``fg_lift``: ``fg_ratio`` divided by the flower's share of the image; 1 means no preference
  (uniform attention gives exactly 1), above 1 means the flower is favoured.
* ``pointing_game``: the most-attended patch lies on the flower (Zhang et al. 2016).
* ``attention_entropy``: entropy of the CLS row over the patches divided by ``log P``;
  0 = one patch, 1 = uniform.
* ``mean_attention_distance``: ViT paper Fig. 7 (Dosovitskiy et al. 2021), the
  attention-weighted pixel distance between a query patch and its key patches.

Over a dataset, :class:`AttentionMetricsAccumulator` keeps running sums only (memory
``O(L * H * C)``), so attention maps are reduced batch by batch and never all held at once.
"""
import functools
import logging
import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from analysis.modeling.tokens import TokenLayout
from data_scripts.errors import UserError

_logger = logging.getLogger(__name__)

NO_MASKS = 'the dataset has no flower masks'
NO_FULL_ATTENTION = 'no full attention maps were given (only CLS rows), so patch-to-patch distances are unknown'
NO_ROLLOUT = 'no rollout_cls was given'
MASK_METRICS = ('fg_ratio', 'fg_lift', 'pointing_game')
ROLLOUT_SUMS = ('entropy', 'fg_ratio', 'pointing_game')  # AttentionMetricsAccumulator.rollout_sum


def _per_image(fg_fraction: torch.Tensor, cls_attn: torch.Tensor) -> torch.Tensor:
    """Views ``fg_fraction [B, P]`` as ``[B, 1, ..., 1, P]`` to broadcast against ``cls_attn [B, ..., P]``."""
    if fg_fraction.dim() != 2 or fg_fraction.shape[0] != cls_attn.shape[0] \
            or fg_fraction.shape[1] != cls_attn.shape[-1]:
        raise UserError(
            f'fg_fraction must be [B, P] matching cls_attn [B, ..., P]; got fg_fraction '
            f'{tuple(fg_fraction.shape)} and cls_attn {tuple(cls_attn.shape)}')
    extra = cls_attn.dim() - 2
    return fg_fraction.reshape(fg_fraction.shape[0], *([1] * extra), fg_fraction.shape[1])


def fg_ratio(cls_attn: torch.Tensor, fg_fraction: torch.Tensor) -> torch.Tensor:
    """Share of the CLS attention mass on the flower (energy-based pointing game).

    Args:
        cls_attn: CLS-to-patch attention ``[B, ..., P]`` (e.g. ``[B, L, H, P]``); need not sum to 1.
        fg_fraction: ``[B, P]``, fraction of each patch covered by the flower, broadcast over the
            middle dims of ``cls_attn``.

    Returns:
        ``[B, ...]`` float32 in ``[0, 1]``: ``sum_p a_p f_p / sum_p a_p``. A row with no mass at
        all (e.g. float16 underflow) gives 0.
    """
    cls_attn = cls_attn.float()
    fg = _per_image(fg_fraction.float(), cls_attn)  # [B, 1.., P]
    mass = cls_attn.sum(dim=-1)  # [B, ...]
    return (cls_attn * fg).sum(dim=-1) / mass.clamp_min(1e-12)


def flower_area(fg_fraction: torch.Tensor) -> torch.Tensor:
    """Share of the image covered by the flower.

    Args:
        fg_fraction: ``[B, P]`` fraction of each patch covered by the flower.

    Returns:
        ``[B]`` float32, the mean of ``fg_fraction`` over the patches.
    """
    return fg_fraction.float().mean(dim=-1)


def fg_lift(cls_attn: torch.Tensor, fg_fraction: torch.Tensor) -> torch.Tensor:
    """How much more attention the flower gets than its area: ``fg_ratio / flower_area``.

    1 means no preference (uniform attention gives exactly 1), above 1 favours the flower.
    For a dataset, prefer the ratio of means (what :class:`AttentionMetricsAccumulator`
    reports): the per-image ratio explodes for tiny flowers.

    Args:
        cls_attn: ``[B, ..., P]``.
        fg_fraction: ``[B, P]``.

    Returns:
        ``[B, ...]`` float32; ``inf``/``nan`` for an image with no flower pixels.
    """
    ratio = fg_ratio(cls_attn, fg_fraction)  # [B, ...]
    area = flower_area(fg_fraction)  # [B]
    return ratio / area.reshape(-1, *([1] * (ratio.dim() - 1)))


def pointing_game(cls_attn: torch.Tensor, fg_fraction: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Whether the most-attended patch lies on the flower.

    Args:
        cls_attn: ``[B, ..., P]``.
        fg_fraction: ``[B, P]``.
        threshold: a patch counts as flower when at least this fraction of it is covered.

    Returns:
        ``[B, ...]`` bool.
    """
    fg = _per_image(fg_fraction.float(), cls_attn).expand_as(cls_attn)  # [B, ..., P]
    top = cls_attn.argmax(dim=-1, keepdim=True)  # [B, ..., 1]
    return fg.gather(-1, top)[..., 0] >= threshold


def attention_entropy(cls_attn: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of the CLS attention over the patches.

    Args:
        cls_attn: ``[..., P]`` with ``P >= 2``; renormalised over the patches first.

    Returns:
        ``[...]`` float32 in ``[0, 1]``: 0 = all attention on one patch, 1 = uniform.
    """
    num_patches = cls_attn.shape[-1]
    if num_patches < 2:
        raise UserError(f'attention entropy needs at least 2 patches, got {num_patches}')
    p = cls_attn.float()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # 0 * log 0 = 0
    return entropy / math.log(num_patches)


def mean_attention_distance(attn: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Mean attention distance in pixels (ViT paper, Dosovitskiy et al. 2021, Fig. 7).

    For every patch query: the attention-weighted mean distance between its patch centre and
    the key patch centres, with the patch-to-patch block renormalised over the patch keys; then
    the mean over the query patches. Prefix tokens (CLS) have no position and are left out.

    Args:
        attn: one layer's attention ``[B, H, N, N]``.
        layout: token layout of the model.

    Returns:
        ``[B, H]`` float32, in pixels of the model input.
    """
    if attn.dim() != 4 or attn.shape[-1] != layout.num_tokens or attn.shape[-2] != layout.num_tokens:
        raise UserError(
            f'attn must be [B, H, {layout.num_tokens}, {layout.num_tokens}] for this layout, '
            f'got {tuple(attn.shape)}')
    numerator, denominator = distance_sums(attn, layout)  # [B, H, P] each
    return (numerator / denominator.clamp_min(1e-12)).mean(dim=-1)


@functools.lru_cache(maxsize=8)
def _distance_weights(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """``[N, N, 2]``: for a patch query and a patch key, the pixel distance between their centres, and 1; 0 where
    either is a prefix token. Built once per layout and device, outside inference mode (autograd may use it)."""
    with torch.inference_mode(False):
        N, centers = layout.num_tokens, layout.patch_centers()  # [P, 2]
        distance, patch_key = torch.zeros(N, N), torch.zeros(N, N)
        layout.patches_to_patches(distance)[:] = torch.cdist(centers, centers)
        layout.patches_to_patches(patch_key)[:] = 1.0
        return torch.stack([distance, patch_key], dim=-1).to(device)


def distance_sums(attn: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per patch query: ``sum_k a_qk * d_qk`` and ``sum_k a_qk`` over the patch keys, ``[B, H, P]`` each.

    What `mean_attention_distance` needs of one layer's map ``[B, H, N, N]``, in one pass over it (a
    product batched over the queries; a float32 map is not copied): the extraction reduces every map to
    these as the model computes it (`analysis.maps.reduce`), and `AttentionMetricsAccumulator.batch_sums`
    takes them instead of the maps. The head-averaged map's sums are the head means of these.
    """
    B, H, N, _ = attn.shape
    sums = torch.bmm(attn.float().reshape(B * H, N, N).transpose(0, 1),
                     _distance_weights(layout, attn.device))  # [N, B * H, 2]: query-major
    sums = layout.patch_tokens(sums.permute(1, 2, 0)).reshape(B, H, 2, layout.num_patches)  # the patch queries
    return sums[:, :, 0], sums[:, :, 1]


class AttentionMetricsAccumulator:
    """Streams batches of attention and reduces them to dataset-level metrics.

    Keeps running sums only (memory ``O(L * H * C)``, not ``O(images)``). For every layer it
    reports each head and ``"mean"``: the metric of the HEAD-AVERAGED map (the CLS map that
    heatmaps show; for ``mean_attention_distance`` the head-averaged full map), which is not the
    mean of the per-head values for non-linear metrics.

    Aggregation over images: ``fg_ratio``, ``entropy`` and ``mean_attention_distance`` are means
    over images, ``pointing_game`` is the share of images that score a hit, and ``fg_lift`` is
    ``mean(fg_ratio) / mean(flower_area)`` -- a ratio of means, so that images with tiny flowers
    do not dominate. The same is reported for the rollout CLS row (no heads) and, for the
    mask-based metrics, per class (head-averaged map only).

    Without masks (``fg_fraction=None``) the mask-based metrics are absent from
    :meth:`compute`'s output and ``"omitted"`` says why.

    Args:
        layout: token layout of the model.
        num_layers: ``L``.
        num_heads: ``H``.
        class_names: names of the classes, indexed by label.
        pointing_threshold: covered fraction from which a patch counts as flower in the pointing game.
    """

    def __init__(self, layout: TokenLayout, num_layers: int, num_heads: int, class_names: Sequence[str],
                 pointing_threshold: float = 0.5):
        self.layout = layout
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.class_names = list(class_names)
        self.pointing_threshold = pointing_threshold
        self.num_images = 0
        # Set by the first update; later batches must agree.
        self.has_masks: Optional[bool] = None
        self.has_full_attention: Optional[bool] = None
        self.has_rollout: Optional[bool] = None
        # Running sums over images (see _zero_sums), float64.
        for name, value in self._zero_sums().items():
            setattr(self, name, value)

    def _zero_sums(self) -> Dict[str, torch.Tensor]:
        """The running sums, zero. Per-layer tensors are [L, H + 1]: the heads, then the head-averaged map."""
        L, H, C = self.num_layers, self.num_heads, len(self.class_names)
        f64 = dict(dtype=torch.float64)
        return {
            'entropy_sum': torch.zeros(L, H + 1, **f64),
            'distance_sum': torch.zeros(L, H + 1, **f64),
            'fg_ratio_sum': torch.zeros(L, H + 1, **f64),
            'pointing_sum': torch.zeros(L, H + 1, **f64),
            'area_sum': torch.zeros((), **f64),
            'rollout_sum': torch.zeros(len(ROLLOUT_SUMS), **f64),  # ROLLOUT_SUMS order
            'class_count': torch.zeros(C, **f64),
            'class_area_sum': torch.zeros(C, **f64),
            'class_fg_ratio_sum': torch.zeros(C, L, **f64),  # head-averaged map
            'class_pointing_sum': torch.zeros(C, L, **f64),
        }

    def _agree(self, name: str, given: Optional[bool]) -> None:
        seen = getattr(self, name)
        if seen is None or given is None:
            setattr(self, name, given if seen is None else seen)
        elif seen != given:
            what = name.removeprefix('has_')
            raise UserError(
                f'{what} was {"given" if seen else "missing"} in earlier batches but is '
                f'{"given" if given else "missing"} now; pass it for every batch or for none')

    def _check_shapes(self, attentions, cls_attention, labels, fg_fraction, rollout_cls, distances) -> int:
        L, H, P = self.num_layers, self.num_heads, self.layout.num_patches
        if cls_attention.dim() != 4 or tuple(cls_attention.shape[1:]) != (L, H, P):
            raise UserError(f'cls_attention must be [B, {L}, {H}, {P}], got {tuple(cls_attention.shape)}')
        B = cls_attention.shape[0]
        if labels.shape != (B,):
            raise UserError(f'labels must be [{B}], got {tuple(labels.shape)}')
        if B and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise UserError(
                f'labels must be in [0, {len(self.class_names)}) to index class_names, '
                f'got {labels.min().item()}..{labels.max().item()}')
        if fg_fraction is not None and tuple(fg_fraction.shape) != (B, P):
            raise UserError(f'fg_fraction must be [{B}, {P}], got {tuple(fg_fraction.shape)}')
        if rollout_cls is not None and tuple(rollout_cls.shape) != (B, P):
            raise UserError(f'rollout_cls must be [{B}, {P}], got {tuple(rollout_cls.shape)}')
        if attentions is not None:
            N = self.layout.num_tokens
            if len(attentions) != L:
                raise UserError(f'expected {L} attention maps (one per layer), got {len(attentions)}')
            for i, a in enumerate(attentions):
                if tuple(a.shape) != (B, H, N, N):
                    raise UserError(f'attentions[{i}] must be [{B}, {H}, {N}, {N}], got {tuple(a.shape)}')
        if distances is not None:
            if attentions is not None:
                raise UserError('pass the attention maps or their distance sums, not both')
            if len(distances) != 2 or any(tuple(d.shape) != (B, L, H, P) for d in distances):
                raise UserError(f'distances must be (numerator, denominator), [{B}, {L}, {H}, {P}] each, got '
                                f'{[tuple(d.shape) for d in distances]}')
        return B

    @torch.no_grad()
    def update(
            self,
            attentions: Optional[Sequence[torch.Tensor]],
            cls_attention: torch.Tensor,
            labels: torch.Tensor,
            fg_fraction: Optional[torch.Tensor] = None,
            rollout_cls: Optional[torch.Tensor] = None,
            *,
            distances: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> None:
        """Adds one batch: ``merge(batch_sums(...))``.

        Args:
            attentions: ``L`` maps ``[B, H, N, N]`` (for the mean attention distance), or None
                when only CLS rows are at hand (e.g. read back from an attention summary); then
                ``mean_attention_distance`` is omitted, unless ``distances`` gives what it needs.
            cls_attention: ``[B, L, H, P]`` CLS-to-patch attention (``layout.cls_to_patches``).
            labels: ``[B]`` int class indices into ``class_names``.
            fg_fraction: ``[B, P]`` fraction of each patch covered by the flower, or None when
                the dataset has no masks.
            rollout_cls: ``[B, P]`` CLS row of the attention rollout, or None.
            distances: in place of ``attentions``, what the mean attention distance needs of them: the
                `distance_sums` of every layer, ``(numerator, denominator)``, ``[B, L, H, P]`` each.
        """
        self.merge(self.batch_sums(attentions, cls_attention, labels, fg_fraction, rollout_cls, distances=distances))

    @torch.no_grad()
    def batch_sums(
            self,
            attentions: Optional[Sequence[torch.Tensor]],
            cls_attention: torch.Tensor,
            labels: torch.Tensor,
            fg_fraction: Optional[torch.Tensor] = None,
            rollout_cls: Optional[torch.Tensor] = None,
            *,
            distances: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """One batch's contribution to the running sums (arguments as `update`); nothing is added yet.

        Returns:
            ``{sum name: float64 tensor}`` plus ``num_images`` and ``flags`` (int8 ``[3]``: has_masks,
            has_full_attention, has_rollout), on the CPU. `merge` adds it. Adding the batches' sums in
            the same order gives bit-identical metrics however the batches were spread over processes.
        """
        B = self._check_shapes(attentions, cls_attention, labels, fg_fraction, rollout_cls, distances)
        if attentions is not None:
            distances = tuple(torch.stack(d, dim=1) for d in zip(*(distance_sums(a, self.layout) for a in attentions)))
        sums = self._zero_sums()
        sums['num_images'] = torch.tensor(B, dtype=torch.int64)
        sums['flags'] = torch.tensor([fg_fraction is not None, distances is not None, rollout_cls is not None],
                                     dtype=torch.int8)
        if B == 0:
            return sums
        labels = labels.long().cpu()

        cls_attention = cls_attention.float()  # [B, L, H, P]
        # Heads then the head-averaged map, the one heatmaps show.
        maps = torch.cat([cls_attention, cls_attention.mean(dim=2, keepdim=True)], dim=2)  # [B, L, H+1, P]
        sums['entropy_sum'] += attention_entropy(maps).sum(dim=0).double().cpu()

        if distances is not None:
            numerator, denominator = (d.float() for d in distances)  # [B, L, H, P] each
            # the head-averaged map's sums are the head means of the per-head sums
            numerator = torch.cat([numerator, numerator.mean(dim=2, keepdim=True)], dim=2)  # [B, L, H+1, P]
            denominator = torch.cat([denominator, denominator.mean(dim=2, keepdim=True)], dim=2)
            distance = (numerator / denominator.clamp_min(1e-12)).mean(dim=-1)  # [B, L, H+1]
            sums['distance_sum'] += distance.sum(dim=0).double().cpu()

        if fg_fraction is not None:
            fg_fraction = fg_fraction.float()
            ratio = fg_ratio(maps, fg_fraction).double().cpu()  # [B, L, H+1]
            hit = pointing_game(maps, fg_fraction, self.pointing_threshold).double().cpu()  # [B, L, H+1]
            area = flower_area(fg_fraction).double().cpu()  # [B]
            sums['fg_ratio_sum'] += ratio.sum(dim=0)
            sums['pointing_sum'] += hit.sum(dim=0)
            sums['area_sum'] += area.sum()
            sums['class_area_sum'].index_add_(0, labels, area)
            sums['class_fg_ratio_sum'].index_add_(0, labels, ratio[:, :, -1])
            sums['class_pointing_sum'].index_add_(0, labels, hit[:, :, -1])
        sums['class_count'].index_add_(0, labels, torch.ones(B, dtype=torch.float64))

        if rollout_cls is not None:
            rollout_cls = rollout_cls.float()
            rollout = sums['rollout_sum']
            rollout[ROLLOUT_SUMS.index('entropy')] += attention_entropy(rollout_cls).sum().double().cpu()
            if fg_fraction is not None:
                rollout[ROLLOUT_SUMS.index('fg_ratio')] += fg_ratio(rollout_cls, fg_fraction).sum().double().cpu()
                rollout[ROLLOUT_SUMS.index('pointing_game')] += \
                    pointing_game(rollout_cls, fg_fraction, self.pointing_threshold).sum().double().cpu()
        return sums

    def merge(self, sums: Dict[str, torch.Tensor]) -> None:
        """Adds a `batch_sums` result (or another accumulator's `state`) to the running sums."""
        given = [None if int(f) < 0 else bool(f) for f in sums['flags'].tolist()]
        for name, flag in zip(('has_masks', 'has_full_attention', 'has_rollout'), given):
            self._agree(name, flag)
        self.num_images += int(sums['num_images'])
        for name in self._zero_sums():
            getattr(self, name).add_(sums[name])

    def state(self) -> Dict[str, torch.Tensor]:
        """The running sums as tensors, in the form `batch_sums` returns (for `merge` elsewhere)."""
        flags = [-1 if f is None else int(f) for f in (self.has_masks, self.has_full_attention, self.has_rollout)]
        return {'num_images': torch.tensor(self.num_images, dtype=torch.int64),
                'flags': torch.tensor(flags, dtype=torch.int8),
                **{name: getattr(self, name).clone() for name in self._zero_sums()}}

    @staticmethod
    def _lift(ratio_mean: float, area_mean: float, what: str) -> Optional[float]:
        if area_mean <= 0:
            _logger.warning('fg_lift of %s is undefined: its masks cover no flower pixels; reporting None', what)
            return None
        return ratio_mean / area_mean

    def compute(self) -> Dict:
        """Dataset-level metrics, JSON-serialisable (the ``attention_metrics.json`` schema).

        Returns:
            ``{"num_images", "num_layers", "num_heads", "has_masks", "flower_area" (masks only),
            "layers": {metric: {"mean": [L], "per_head": [[H] * L]}}, "rollout": {metric: float},
            "per_class": {class name: {"num_images", "fg_ratio": [L], "fg_lift": [L],
            "pointing_game": [L]}} (masks only; classes without images are left out),
            "omitted": {metric: reason}}``. ``fg_lift`` is None where the masks hold no flower.
        """
        if self.num_images == 0:
            raise UserError('no images were added; call update() with at least one batch first')
        n = self.num_images

        def layer_entry(sums: torch.Tensor) -> Dict:
            means = sums / n  # [L, H+1]
            return {'mean': means[:, -1].tolist(), 'per_head': means[:, :-1].tolist()}

        out: Dict = {
            'num_images': n,
            'num_layers': self.num_layers,
            'num_heads': self.num_heads,
            'has_masks': bool(self.has_masks),
        }
        layers: Dict = {}
        omitted: Dict[str, str] = {}
        rollout: Dict = {}
        if self.has_masks:
            area = self.area_sum.item() / n
            out['flower_area'] = area
            layers['fg_ratio'] = layer_entry(self.fg_ratio_sum)
            ratio = self.fg_ratio_sum / n  # [L, H+1]
            layers['fg_lift'] = {
                'mean': [self._lift(r, area, 'the dataset') for r in ratio[:, -1].tolist()],
                'per_head': [[self._lift(r, area, 'the dataset') for r in row] for row in ratio[:, :-1].tolist()],
            }
            layers['pointing_game'] = layer_entry(self.pointing_sum)
        else:
            for name in MASK_METRICS + ('flower_area', 'per_class'):
                omitted[name] = NO_MASKS
        layers['entropy'] = layer_entry(self.entropy_sum)
        if self.has_full_attention:
            layers['mean_attention_distance'] = layer_entry(self.distance_sum)
        else:
            omitted['mean_attention_distance'] = NO_FULL_ATTENTION
        out['layers'] = layers

        if self.has_rollout:
            rollout_sums = dict(zip(ROLLOUT_SUMS, self.rollout_sum.tolist()))
            rollout['entropy'] = rollout_sums['entropy'] / n
            if self.has_masks:
                rollout['fg_ratio'] = rollout_sums['fg_ratio'] / n
                rollout['fg_lift'] = self._lift(rollout['fg_ratio'], out['flower_area'], 'the rollout')
                rollout['pointing_game'] = rollout_sums['pointing_game'] / n
            out['rollout'] = rollout
        else:
            omitted['rollout'] = NO_ROLLOUT

        if self.has_masks:
            per_class: Dict = {}
            for c, name in enumerate(self.class_names):
                count = int(self.class_count[c].item())
                if count == 0:
                    continue
                ratio = (self.class_fg_ratio_sum[c] / count).tolist()  # [L]
                area = self.class_area_sum[c].item() / count
                per_class[name] = {
                    'num_images': count,
                    'fg_ratio': ratio,
                    'fg_lift': [self._lift(r, area, f'class {name!r}') for r in ratio],
                    'pointing_game': (self.class_pointing_sum[c] / count).tolist(),
                }
            out['per_class'] = per_class
        out['omitted'] = omitted
        return out


def class_mean_cls_maps(cls_attention: torch.Tensor, labels: torch.Tensor,
                        num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Head-averaged CLS maps averaged over the images of each class (arguments of `class_cls_map_sums`).

    Returns:
        ``(maps [C, L, P], counts [C])``; classes without images have all-zero maps and count 0.
    """
    sums, counts = class_cls_map_sums(cls_attention, labels, num_classes)
    return (sums / counts.clamp(min=1)[:, None, None]).float(), counts


def class_cls_map_sums(cls_attention: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sums of the head-averaged CLS maps over the images of each class (add them up chunk by chunk).

    Args:
        cls_attention: ``[M, L, H, P]`` CLS-to-patch attention.
        labels: ``[M]`` class indices.
        num_classes: ``C``.

    Returns:
        ``(sums [C, L, P] float64, counts [C] int64)``.
    """
    maps = cls_attention.float().mean(dim=2).double()  # [M, L, P]
    labels = labels.long()
    sums = torch.zeros(num_classes, *maps.shape[1:], dtype=torch.float64).index_add_(0, labels, maps)  # [C, L, P]
    return sums, torch.bincount(labels, minlength=num_classes)  # [C]
