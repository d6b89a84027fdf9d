"""The token layout of a ViT: the one place that knows where the CLS token and the patches are.

A timm ViT turns an image of ``H x W`` pixels into a sequence of ``N = num_prefix_tokens + P``
tokens: the prefix tokens (CLS, then register / distillation tokens) come first, then the
``P = grid_h * grid_w`` patch tokens in row-major order. Everything else in this project asks
this module for that layout instead of hard-coding ``14 x 14`` or ``attn[:, :, 0, 1:]``.
"""
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import torch

from data_scripts.errors import UserError


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a ViT sit.

    Args:
        num_prefix_tokens: tokens before the patches (1 for CLS; more with registers / dist token).
        grid_size: patches per column and per row, ``(grid_h, grid_w)``.
        patch_size: pixels per patch, ``(patch_h, patch_w)``.
    """
    num_prefix_tokens: int
    grid_size: Tuple[int, int]
    patch_size: Tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def image_size(self) -> Tuple[int, int]:
        """Pixels covered by the patch grid, ``(H, W)``."""
        return self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1]

    @classmethod
    def from_timm(cls, model: torch.nn.Module) -> 'TokenLayout':
        """Reads the layout of a timm ``VisionTransformer`` (or anything with ``patch_embed``)."""
        patch_embed = getattr(model, 'patch_embed', None)
        if patch_embed is None or not hasattr(patch_embed, 'grid_size'):
            raise UserError(
                f'{type(model).__name__} has no ViT patch embedding (patch_embed.grid_size); '
                'attention analysis needs a timm ViT such as vit_* or deit_*.')
        if getattr(model, 'cls_token', None) is None or int(getattr(model, 'num_prefix_tokens', 0)) < 1:
            raise UserError(
                f'{type(model).__name__} has no CLS token (class_token=False); the CLS attention maps need one. '
                'Use a ViT with a class token (vit_*, deit_*).')
        return cls(
            num_prefix_tokens=int(getattr(model, 'num_prefix_tokens', 1)),
            grid_size=tuple(int(g) for g in patch_embed.grid_size),
            patch_size=tuple(int(p) for p in patch_embed.patch_size),
        )

    def to_dict(self) -> Dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Dict) -> 'TokenLayout':
        return cls(int(d['num_prefix_tokens']), tuple(d['grid_size']), tuple(d['patch_size']))

    def cls_query(self, attn: torch.Tensor) -> torch.Tensor:
        """The CLS query's row as a one-row map, ``attn[..., :1, :]`` ``[..., 1, N]``: `cls_to_patches` and
        `cls_to_prefix` read it as they read the whole map."""
        assert attn.shape[-1] == self.num_tokens, f'expected {self.num_tokens} tokens, got {attn.shape[-1]}'
        return attn[..., :1, :]

    def cls_to_patches(self, attn: torch.Tensor) -> torch.Tensor:
        """CLS-to-patch attention: ``attn[..., 0, prefix:]``.

        Args:
            attn: attention maps ``[..., N, N]`` (rows are queries, columns keys).

        Returns:
            ``[..., P]``, the row of the CLS query restricted to the patch keys.
        """
        assert attn.shape[-1] == self.num_tokens, f'expected {self.num_tokens} tokens, got {attn.shape[-1]}'
        return attn[..., 0, self.num_prefix_tokens:]

    def cls_to_prefix(self, attn: torch.Tensor) -> torch.Tensor:
        """The CLS row on the prefix tokens, ``attn[..., 0, :prefix]``: CLS itself, then registers / dist token."""
        assert attn.shape[-1] == self.num_tokens, f'expected {self.num_tokens} tokens, got {attn.shape[-1]}'
        return attn[..., 0, :self.num_prefix_tokens]

    def patches_to_patches(self, attn: torch.Tensor) -> torch.Tensor:
        """Patch-to-patch block ``attn[..., prefix:, prefix:]``, ``[..., P, P]``."""
        assert attn.shape[-1] == self.num_tokens, f'expected {self.num_tokens} tokens, got {attn.shape[-1]}'
        p = self.num_prefix_tokens
        return attn[..., p:, p:]

    def patch_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """The patch entries of per-token values, ``values[..., prefix:]``: ``[..., N]`` -> ``[..., P]``."""
        assert values.shape[-1] == self.num_tokens, f'expected {self.num_tokens} tokens, got {values.shape[-1]}'
        return values[..., self.num_prefix_tokens:]

    def to_grid(self, patch_values: torch.Tensor) -> torch.Tensor:
        """``[..., P]`` -> ``[..., grid_h, grid_w]`` (patches are row-major)."""
        assert patch_values.shape[-1] == self.num_patches, \
            f'expected {self.num_patches} patch values, got {patch_values.shape[-1]}'
        return patch_values.reshape(*patch_values.shape[:-1], *self.grid_size)

    def patch_centers(self) -> torch.Tensor:
        """Pixel coordinates ``(y, x)`` of every patch centre, ``[P, 2]``, row-major."""
        gh, gw = self.grid_size
        ph, pw = self.patch_size
        ys = (torch.arange(gh, dtype=torch.float32) + 0.5) * ph
        xs = (torch.arange(gw, dtype=torch.float32) + 0.5) * pw
        yy, xx = torch.meshgrid(ys, xs, indexing='ij')
        return torch.stack([yy.flatten(), xx.flatten()], dim=-1)

    def patch_fraction(self, mask: torch.Tensor) -> torch.Tensor:
        """Fraction of each patch covered by a foreground mask.

        Args:
            mask: ``[B, H, W]`` (or ``[H, W]``) in ``[0, 1]``, the size of ``image_size``.

        Returns:
            ``[B, P]`` (or ``[P]``): mean of the mask over each patch.
        """
        squeeze = mask.dim() == 2
        if squeeze:
            mask = mask[None]
        assert tuple(mask.shape[-2:]) == self.image_size, \
            f'mask is {tuple(mask.shape[-2:])}, the patch grid covers {self.image_size}'
        frac = torch.nn.functional.avg_pool2d(mask[:, None].float(), self.patch_size)  # [B, 1, gh, gw]
        frac = frac.flatten(1)
        return frac[0] if squeeze else frac
