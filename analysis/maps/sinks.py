"""High-norm tokens and attention sinks: which patch tokens are outliers, and how much CLS attention they draw.

Darcet et al. 2024 ("Vision Transformers Need Registers") found that large ViTs turn a few
low-information background patches into global scratch space: from the middle layers on, those
tokens have about 10x the norm of the others and draw much of the CLS token's attention, so an
attention map "looks at the background" without the model reading the background there.

Per image and per layer (pure functions on tensors):

* the L2 norm of every token at the block's output (`analysis.modeling.timm_internals.capture_token_norms`);
* **flagged** patch tokens: norm above ``median + K * MAD`` of that image's patch tokens at that layer
  (`norm_threshold`). ``K = 3.5 / 0.6745``: the modified z-score of Iglewicz & Hoaglin (1993) above
  3.5, the usual robust outlier rule. Median and MAD ignore a few outliers, so the rule adapts to each
  layer's own scale (norms grow with depth) and to each model, and flags about 0.02 % of the tokens
  of a normal distribution; the outliers of Darcet et al. sit at ~10x the median, far above it.
  Prefix tokens (CLS, registers) are never flagged: they are reported on their own.
* **sink share**: the part of the CLS token's attention (its whole row, which sums to 1) on the flagged
  tokens, per head (`share_on`); the **register share** likewise on the register tokens.
* fg_ratio without the flagged tokens (the CLS row renormalised over the others) and the flower's
  area over the others, so that uniform attention still gives fg_lift 1 (`without_flagged`).

`SinkAccumulator` keeps these per image over a split (a few numbers per image and layer, never maps)
and `SinkAccumulator.compute` reduces them to the per-layer table of ``sinks.json``.
"""
import math
from typing import Dict, Optional, Tuple

import torch

from analysis.core.stats import mean_se, ratio_of_means_se
from analysis.maps.attention_metrics import fg_ratio, flower_area
from analysis.modeling.tokens import TokenLayout

MODIFIED_Z = 3.5  # Iglewicz & Hoaglin (1993): |0.6745 (x - median) / MAD| > 3.5 is an outlier
MAD_PER_SD = 0.6745  # MAD of a normal distribution, in standard deviations (its 75th percentile)
K = MODIFIED_Z / MAD_PER_SD  # ~5.19: a token is flagged above median + K * MAD
# A layer has attention sinks when its flagged tokens draw more of the CLS attention than SINK_MIN_SHARE and than
# SINK_MIN_DRAW times their own share of the tokens (`sink_margin`, tested beyond 2 SE where it is used).
SINK_MIN_SHARE = 0.10
SINK_MIN_DRAW = 2.0
# Darcet et al. 2024 find the high-norm tokens of large ViTs at about 10x the median norm; below this ratio the
# sentences say that the flagged tokens are not of that kind.
HIGH_NORM_RATIO = 3.0
# The norm histogram of the figure: norm / the image's median patch norm, log-spaced bins.
HISTOGRAM_EDGES = torch.logspace(math.log10(1 / 8), math.log10(64), 37)


def sink_margin(layer: Dict) -> Tuple[float, Optional[float]]:
    """How far a layer's sink share lies above the sink floor (`SINK_MIN_SHARE`, `SINK_MIN_DRAW` x the share of
    tokens flagged), and its standard error: ``(margin, se)`` of a layer entry of `SinkAccumulator.compute`."""
    share = layer['sink_share']
    floor = max(SINK_MIN_SHARE, SINK_MIN_DRAW * layer['flagged_share']['mean'])
    return share['mean'] - floor, share['se']


def norm_threshold(patch_norms: torch.Tensor) -> torch.Tensor:
    """``median + K * MAD`` over the last dim: ``[..., P]`` -> ``[...]``."""
    norms = patch_norms.float()
    median = norms.quantile(0.5, dim=-1, keepdim=True)  # [..., 1]
    mad = (norms - median).abs().quantile(0.5, dim=-1, keepdim=True)
    return (median + K * mad)[..., 0]


def flag_high_norm(patch_norms: torch.Tensor) -> torch.Tensor:
    """Patch tokens whose norm lies above `norm_threshold` of their own row: ``[..., P]`` -> bool ``[..., P]``."""
    return patch_norms.float() > norm_threshold(patch_norms)[..., None]


def share_on(cls_attention: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The CLS attention that lands on the given patch tokens.

    Args:
        cls_attention: ``[B, L, H, P]`` CLS-to-patch rows (`TokenLayout.cls_to_patches` of the full rows).
        tokens: bool ``[B, L, P]``, per image and layer.

    Returns:
        ``[B, L, H]``: the share of the CLS row (which sums to 1 over all tokens) on those tokens.
    """
    return (cls_attention.float() * tokens[:, :, None].float()).sum(dim=-1)


def without_flagged(cls_attention: torch.Tensor, flags: torch.Tensor, fg_fraction: torch.Tensor):
    """fg_ratio and flower area with the flagged tokens left out (the CLS row renormalised over the others).

    Args:
        cls_attention: ``[B, L, P]`` (a head-averaged map per layer).
        flags: bool ``[B, L, P]``.
        fg_fraction: ``[B, P]``.

    Returns:
        ``(ratio [B, L], area [B, L])``: the flower's share of the attention on the unflagged tokens, and
        the flower's share of the unflagged tokens' area (uniform attention over them gives ratio = area).
    """
    keep = (~flags).float()  # [B, L, P]
    ratio = fg_ratio(cls_attention.float() * keep, fg_fraction)  # fg_ratio divides by the mass kept
    area = (fg_fraction.float()[:, None] * keep).sum(-1) / keep.sum(-1).clamp_min(1)
    return ratio, area


def mean_substitute(tokens: torch.Tensor, replace: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Every token in ``replace`` becomes the mean of the tokens in ``pool`` of the same image.

    Mean substitution rather than zeros: a zeroed token is far off the distribution the next blocks
    read, and overstates its role.

    Args:
        tokens: ``[B, N, D]``.
        replace / pool: bool ``[B, N]``.

    Returns:
        ``[B, N, D]``, a new tensor.
    """
    weights = pool.to(tokens.dtype)[..., None]  # [B, N, 1]
    mean = (tokens * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)  # [B, 1, D]
    return torch.where(replace[..., None], mean.expand_as(tokens), tokens)


class SinkAccumulator:
    """Per image and layer: the flagged tokens, their norm, the sink and register shares, fg with and without.

    Memory: a few numbers per image and layer (and head), never a map.

    Args:
        layout: token layout of the model (which tokens are prefix, which are patches).
        num_layers / num_heads: ``L``, ``H``.
    """

    def __init__(self, layout: TokenLayout, num_layers: int, num_heads: int):
        self.layout, self.num_layers, self.num_heads = layout, num_layers, num_heads
        self.rows: Dict[str, list] = {}
        self.histogram = torch.zeros(num_layers, len(HISTOGRAM_EDGES) + 1, dtype=torch.float64)
        self.has_masks: Optional[bool] = None

    def _add(self, **rows: torch.Tensor) -> None:
        for name, value in rows.items():
            self.rows.setdefault(name, []).append(value.double().cpu())

    @torch.no_grad()
    def update(self, token_norms: torch.Tensor, cls_attention: torch.Tensor, prefix_attention: torch.Tensor,
               fg_fraction: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Adds a batch of images.

        Args:
            token_norms: ``[B, L, N]`` norms of all tokens at each block's output.
            cls_attention: ``[B, L, H, P]`` the CLS row on the patches.
            prefix_attention: ``[B, L, H, prefix]`` the CLS row on the prefix tokens (CLS itself, registers).
            fg_fraction: ``[B, P]`` or None without masks.

        Returns:
            the flags of the batch, bool ``[B, L, P]``.
        """
        layout, p = self.layout, self.layout.num_prefix_tokens
        assert token_norms.shape[1:] == (self.num_layers, layout.num_tokens), f'token norms {tuple(token_norms.shape)}'
        assert prefix_attention.shape[-1] == p, f'prefix attention {tuple(prefix_attention.shape)}, {p} prefix tokens'
        if self.has_masks is None:
            self.has_masks = fg_fraction is not None
        assert self.has_masks == (fg_fraction is not None), 'masks for some batches only'
        norms = token_norms.float()
        patch_norms = layout.patch_tokens(norms)  # [B, L, P]
        median = patch_norms.quantile(0.5, dim=-1)  # [B, L]
        flags = flag_high_norm(patch_norms)  # [B, L, P]
        count = flags.sum(-1)  # [B, L]
        flagged_norm = (patch_norms * flags).sum(-1) / count.clamp_min(1)
        relative = (patch_norms / median[..., None].clamp_min(1e-12)).log10()  # [B, L, P]
        for layer in range(self.num_layers):
            bins = torch.bucketize(relative[:, layer].flatten(), HISTOGRAM_EDGES.log10())
            self.histogram[layer] += torch.bincount(bins, minlength=self.histogram.shape[1]).double()
        sink = share_on(cls_attention, flags)  # [B, L, H]
        self._add(flagged_count=count, sink_share=sink, cls_self_share=prefix_attention[..., 0].float(),
                  norm_ratio=torch.where(count > 0, flagged_norm / median.clamp_min(1e-12), torch.nan))
        if p > 1:  # registers
            self._add(register_share=prefix_attention[..., 1:].float().sum(-1),
                      register_norm_ratio=norms[..., 1:p].mean(-1) / median.clamp_min(1e-12))
        if fg_fraction is not None:
            fg = fg_fraction.float()
            mean_map = cls_attention.float().mean(dim=2)  # [B, L, P]
            ratio_without, area_without = without_flagged(mean_map, flags, fg)
            self._add(fg_ratio=fg_ratio(mean_map, fg), area=flower_area(fg), fg_ratio_without=ratio_without,
                      area_without=area_without, flagged_background=((1 - fg)[:, None] * flags).sum(-1))
        return flags

    def compute(self) -> Dict:
        """The per-layer table (0-based layers): means and SEs over the images.

        Returns:
            ``{"num_images", "has_masks", "layers": [{...} per layer], "histogram": {"edges", "counts"}}``; a
            layer's entries: ``flagged_share``, ``images_with_flagged``, ``norm_ratio`` (flagged / median patch
            norm, over the images that have flagged tokens), ``sink_share`` and ``sink_share_heads``,
            ``sink_draw`` (sink share / flagged share: 1 = no more attention than their number),
            ``cls_self_share``, with registers ``register_share`` (+ heads) and ``register_norm_ratio``;
            with masks ``background_area``, ``flagged_on_background`` (share of the flagged tokens' area
            on the background), ``fg_lift`` and ``fg_lift_without`` (ratio of means, with SEs).
        """
        assert self.rows, 'no images were added'
        rows = {k: torch.cat(v) for k, v in self.rows.items()}  # [M, L(, H)]
        rows['flagged_share'] = rows['flagged_count'] / self.layout.num_patches
        registers = self.layout.num_prefix_tokens > 1
        layers = []
        for layer in range(self.num_layers):
            def stat(name, head=None):
                values = rows[name][:, layer] if head is None else rows[name][:, layer, head]
                return mean_se(values if values.dim() == 1 else values.mean(-1))
            entry = {
                'flagged_share': stat('flagged_share'),
                'images_with_flagged': float((rows['flagged_count'][:, layer] > 0).double().mean()),
                'norm_ratio': mean_se(rows['norm_ratio'][:, layer]),
                'sink_share': stat('sink_share'),
                'sink_share_heads': [stat('sink_share', h)['mean'] for h in range(self.num_heads)],
                'cls_self_share': stat('cls_self_share'),
            }
            flagged = entry['flagged_share']['mean']
            entry['sink_draw'] = entry['sink_share']['mean'] / flagged if flagged else None
            if registers:
                entry['register_share'] = stat('register_share')
                entry['register_share_heads'] = [stat('register_share', h)['mean'] for h in range(self.num_heads)]
                entry['register_norm_ratio'] = mean_se(rows['register_norm_ratio'][:, layer])
            if self.has_masks:
                area = rows['area']  # [M]
                count = rows['flagged_count'][:, layer].sum()
                lift, lift_se = ratio_of_means_se(rows['fg_ratio'][:, layer], area)
                without, without_se = ratio_of_means_se(rows['fg_ratio_without'][:, layer], rows['area_without'][:, layer])
                entry.update({
                    'background_area': float(1 - area.mean()),
                    'flagged_on_background': float(rows['flagged_background'][:, layer].sum() / count) if count else None,
                    'fg_lift': {'mean': float(lift), 'se': float(lift_se)},
                    'fg_lift_without': {'mean': float(without), 'se': float(without_se)},
                })
            layers.append(entry)
        return {'num_images': int(rows['flagged_share'].shape[0]), 'has_masks': bool(self.has_masks),
                'num_prefix_tokens': self.layout.num_prefix_tokens, 'num_registers': self.layout.num_prefix_tokens - 1,
                'layers': layers,
                'histogram': {'edges': HISTOGRAM_EDGES.tolist(), 'counts': self.histogram.tolist(),
                              'what': 'patch-token norm / the image\'s median patch norm, per layer; counts per bin, '
                                      'the first and last bins open-ended'}}
