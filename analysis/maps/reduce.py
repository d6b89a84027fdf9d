"""Every block's attention map reduced as the model computes it, so that a batch never holds its L maps.

What the extraction needs of one layer's map ``[B, H, N, N]`` is small: the CLS query's row (every
head, every key), the two sums of the mean attention distance (`attention_metrics.distance_sums`)
and the head-fused map that the rollout multiplies (`rollout.rollout_cls_of_fused`). Holding all L
maps of a batch until the forward pass ends costs more than computing them: on a small ViT the maps
outweigh the activations (64 patches, 3 heads, width 96: 3.2 MB per layer for a batch of 64, against
1.6 MB of tokens), and memory of that size is handed back to the system after every batch and
faulted in again at the next. So `AttentionReducer.capture` hooks every block
(`capture_attentions(reduce=...)`), reduces each map as it appears and lets it go. What stays is the
head-fused map of every layer (``[L, B, N, N]`` float32: 1/H of the maps), written into one buffer that
the reducer keeps, the same memory for every batch.
"""
import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from analysis.maps.attention_metrics import distance_sums
from analysis.maps.rollout import rollout_cls_of_fused
from analysis.modeling.timm_internals import capture_attentions
from analysis.modeling.tokens import TokenLayout


@dataclass
class ReducedMaps:
    """What one batch's maps leave behind."""
    cls_query: torch.Tensor  # [B, L, H, 1, N]: the CLS query's row of every layer and head (`TokenLayout.cls_query`)
    distances: Tuple[torch.Tensor, torch.Tensor]  # `distance_sums` of every layer: [B, L, H, P] each
    rollout: torch.Tensor  # [B, P] float32: `rollout_cls` (mean head fusion, nothing discarded)


class AttentionReducer:
    """Reduces the attention maps of a model's forward pass to `ReducedMaps`, one layer at a time.

    ``with reducer.capture(vit): model(pixels)``, then ``reducer.result()``.

    Args:
        layout: the model's token layout.
        num_layers: its blocks.
    """

    def __init__(self, layout: TokenLayout, num_layers: int):
        self.layout, self.num_layers = layout, num_layers
        self._fused: Optional[torch.Tensor] = None  # [L, B, N, N] float32, grown once, reused by every batch
        self._layers: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # the pass's reduced layers

    def _reduce(self, attn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's map ``[B, H, N, N]`` -> its CLS query row ``[B, H, 1, N]`` and distance sums ``[B, H, P]``."""
        layer, (B, _, N, _) = len(self._layers), attn.shape
        if layer == self.num_layers:
            raise RuntimeError(f'more attention maps than the {self.num_layers} blocks in one pass')
        if self._fused is None or self._fused.shape[1] < B or self._fused.device != attn.device:
            self._fused = torch.empty(self.num_layers, B, N, N, dtype=torch.float32, device=attn.device)
        torch.mean(attn, dim=1, dtype=torch.float32, out=self._fused[layer, :B])  # the rollout's head fusion
        return (self.layout.cls_query(attn).clone(), *distance_sums(attn, self.layout))

    @contextlib.contextmanager
    def capture(self, vit: nn.Module) -> Iterator[None]:
        """While open, every block's map of the forward pass is reduced as it is computed (`result` after)."""
        with capture_attentions(vit, reduce=self._reduce) as self._layers:
            yield

    def result(self) -> ReducedMaps:
        """The `ReducedMaps` of the last `capture`'s pass."""
        if len(self._layers) != self.num_layers:
            raise RuntimeError(f'reduced {len(self._layers)} attention maps from {self.num_layers} blocks')
        cls_query, numerator, denominator = (torch.stack(parts, dim=1) for parts in zip(*self._layers))
        rollout = rollout_cls_of_fused(list(self._fused[:, :cls_query.shape[0]]), self.layout)
        return ReducedMaps(cls_query, (numerator, denominator), rollout)
