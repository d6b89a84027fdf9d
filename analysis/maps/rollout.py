"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Rollout follows the attention back through the layers: every layer's head-fused map gets the
identity added for the residual connection, ``A' = 0.5 * A + 0.5 * I``, its rows renormalised,
and the layers are multiplied from the first one up, ``R = A'_L @ ... @ A'_1``. Row ``i`` of
``R`` says how much each input token contributed to output token ``i``; the CLS row restricted
to the patches is the usual rollout heatmap.

Pure tensor math: no model, no I/O, no plotting.
"""
from typing import Optional, Sequence

import torch

from analysis.modeling.tokens import TokenLayout
from data_scripts.errors import UserError

HEAD_FUSIONS = ('mean', 'max', 'min')


def fuse_heads(attn: torch.Tensor, head_fusion: str = 'mean') -> torch.Tensor:
    """Fuses the heads of one layer's attention.

    Args:
        attn: attention maps ``[B, H, N, N]``.
        head_fusion: ``'mean'``, ``'max'`` or ``'min'`` over the heads.

    Returns:
        ``[B, N, N]``.
    """
    if head_fusion == 'mean':
        return attn.mean(dim=1)
    if head_fusion == 'max':
        return attn.amax(dim=1)
    if head_fusion == 'min':
        return attn.amin(dim=1)
    raise UserError(f'head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}')


def discard_weakest(attn: torch.Tensor, discard_ratio: float, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Zeroes the weakest ``discard_ratio`` fraction of the patch keys in every query row.

    Unlike the common implementation (lowest values of the flattened map per image), the drop is
    per row, so every row keeps its strongest patches; the prefix-token columns (CLS, registers)
    are never dropped.

    Args:
        attn: fused attention ``[B, N, N]`` (rows are queries).
        discard_ratio: fraction in ``[0, 1)`` of the ``P`` patch keys to zero per row
            (``int(P * discard_ratio)`` of them).
        num_prefix_tokens: leading key columns that are kept whatever their value.

    Returns:
        ``[B, N, N]``, a copy with the weakest patch entries set to 0 (rows no longer sum to 1).
    """
    prefix, patches = attn[..., :num_prefix_tokens], attn[..., num_prefix_tokens:]  # [B, N, p], [B, N, P]
    num_drop = int(patches.shape[-1] * discard_ratio)
    if num_drop == 0:
        return attn.clone()
    weakest = patches.topk(num_drop, dim=-1, largest=False).indices  # [B, N, num_drop]
    patches = patches.scatter(-1, weakest, 0.0)
    return torch.cat([prefix, patches], dim=-1)


def _check_attentions(attentions: Sequence[torch.Tensor], layout: Optional[TokenLayout]) -> None:
    if len(attentions) == 0:
        raise UserError('attentions is empty; pass one [B, H, N, N] map per layer')
    first = attentions[0]
    if first.dim() != 4 or first.shape[-1] != first.shape[-2]:
        raise UserError(f'each attention map must be [B, H, N, N], got {tuple(first.shape)} for layer 0')
    for i, a in enumerate(attentions):
        if a.shape != first.shape:
            raise UserError(
                f'all layers must have the same attention shape; layer 0 is {tuple(first.shape)}, '
                f'layer {i} is {tuple(a.shape)}')
    if layout is not None and first.shape[-1] != layout.num_tokens:
        raise UserError(
            f'attention maps have {first.shape[-1]} tokens but the layout has {layout.num_tokens} '
            f'({layout.num_prefix_tokens} prefix + {layout.num_patches} patches); '
            'build the layout from the same model (TokenLayout.from_timm)')


def _check_options(attentions: Sequence[torch.Tensor], head_fusion: str, discard_ratio: float,
                   layout: Optional[TokenLayout]) -> None:
    _check_attentions(attentions, layout)
    if head_fusion not in HEAD_FUSIONS:
        raise UserError(f'head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}')
    if not 0.0 <= discard_ratio < 1.0:
        raise UserError(f'discard_ratio must be in [0, 1), got {discard_ratio}')


def _fused(attn: torch.Tensor, head_fusion: str, discard_ratio: float, layout: Optional[TokenLayout]) -> torch.Tensor:
    """One layer's head-fused map, its weakest patch keys dropped: ``[B, H, N, N]`` -> ``[B, N, N]`` float32."""
    fused = fuse_heads(attn.float(), head_fusion)  # [B, N, N]
    if discard_ratio > 0:
        fused = discard_weakest(fused, discard_ratio, layout.num_prefix_tokens if layout is not None else 1)
    return fused


def _layer_factor(attn: torch.Tensor, head_fusion: str, discard_ratio: float, layout: Optional[TokenLayout]
                  ) -> torch.Tensor:
    """One layer's factor of the rollout, ``A' = norm(0.5 fuse(A) + 0.5 I)``: ``[B, H, N, N]`` -> ``[B, N, N]``."""
    fused = _fused(attn, head_fusion, discard_ratio, layout)
    fused = 0.5 * fused + 0.5 * torch.eye(fused.shape[-1], device=fused.device)  # residual connection
    return fused / fused.sum(dim=-1, keepdim=True)  # rows sum to 1 again


def attention_rollout(
        attentions: Sequence[torch.Tensor],
        head_fusion: str = 'mean',
        discard_ratio: float = 0.0,
        layout: Optional[TokenLayout] = None,
) -> torch.Tensor:
    """Attention rollout over all layers.

    Args:
        attentions: one map ``[B, H, N, N]`` per layer, first layer first; rows are queries and
            sum to 1 (softmax output). Any float dtype; the math runs in float32.
        head_fusion: how to fuse the heads of a layer: ``'mean'``, ``'max'`` or ``'min'``.
        discard_ratio: fraction in ``[0, 1)`` of the weakest patch keys to drop per query row
            before adding the residual (see :func:`discard_weakest`); 0 keeps everything.
        layout: token layout; gives the number of prefix-token columns that are never dropped
            and checks ``N``. Without it one prefix token (CLS) is assumed.

    Returns:
        ``[B, N, N]`` float32, ``R = A'_L @ ... @ A'_1``; every row sums to 1.
    """
    _check_options(attentions, head_fusion, discard_ratio, layout)
    batch_size, _, num_tokens, _ = attentions[0].shape
    rollout = torch.eye(num_tokens, device=attentions[0].device).expand(batch_size, num_tokens, num_tokens)  # [B, N, N]
    for attn in attentions:
        rollout = _layer_factor(attn, head_fusion, discard_ratio, layout) @ rollout  # later layers from the left
    return rollout


def rollout_cls(
        attentions: Sequence[torch.Tensor],
        head_fusion: str = 'mean',
        discard_ratio: float = 0.0,
        *,
        layout: TokenLayout,
) -> torch.Tensor:
    """The CLS row of the attention rollout, restricted to the patches.

    Args:
        attentions: one map ``[B, H, N, N]`` per layer (see :func:`attention_rollout`).
        head_fusion: ``'mean'``, ``'max'`` or ``'min'``.
        discard_ratio: fraction in ``[0, 1)`` of weakest patch keys dropped per row.
        layout: token layout of the model (keyword-only, required).

    Returns:
        ``[B, P]`` float32: how much each patch flows into the CLS token (sums to at most 1; the
        rest of the mass sits on the prefix tokens).
    """
    _check_options(attentions, head_fusion, discard_ratio, layout)
    return rollout_cls_of_fused([_fused(attn, head_fusion, discard_ratio, layout) for attn in attentions], layout)


def rollout_cls_of_fused(fused: Sequence[torch.Tensor], layout: TokenLayout) -> torch.Tensor:
    """`rollout_cls` from every layer's head-fused map ``[B, N, N]`` (float32, first layer first).

    The CLS row of ``A'_L @ ... @ A'_1`` is ``e_0 @ A'_L @ ... @ A'_1``: a row vector carried through the
    layers from the last one, ``N^2`` per layer instead of the ``N^3`` of the whole product. The factor
    ``A' = D^-1 (0.5 F + 0.5 I)`` (``D``: its row sums) is never built: ``r A' = 0.5 (r D^-1) F + 0.5 r D^-1``.
    """
    batch_size, num_tokens = fused[0].shape[0], fused[0].shape[-1]
    row = torch.zeros(batch_size, 1, num_tokens, device=fused[0].device)  # [B, 1, N]: e_0, the CLS token
    row[:, :, 0] = 1.0
    for layer in reversed(fused):
        row = row / (0.5 * layer.sum(dim=-1) + 0.5).unsqueeze(1)  # r D^-1: the factor's row sums
        row = 0.5 * (row @ layer) + 0.5 * row  # [B, 1, N]
    return layout.cls_to_patches(row)  # [B, P]
