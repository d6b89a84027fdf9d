"""Every reach into timm's internals, in one place: the blocks, their attention modules, hooks, the config writer.

timm offers no public switch for these, so this module is the one that touches
``blocks[i].attn.fused_attn`` (the eager path that materialises the attention weights), hooks
``attn.attn_drop`` (capture), ``attn.proj`` (head ablation) and the output of ``blocks[i]`` (token
norms, token substitution), and swaps ``blocks[i]`` for the identity (layer skipping). Each is a context manager that restores the model on exit, whatever
happened inside. ``timm_config`` calls timm's private ``_hub.save_config_for_hf``: its public
``save_for_hf`` writes the config only together with the weights, which the model's own
``save_pretrained`` writes (from the state dict the Trainer passes).
"""
import json
import os
import tempfile
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from timm.layers import Attention
from timm.models._hub import save_config_for_hf
from torch import nn

from analysis.core.run_files import CONFIG_FILE
from data_scripts.errors import UserError


def vit_of(model: nn.Module) -> nn.Module:
    """The timm ViT inside a `TimmViTForImageClassification` (or the ViT itself)."""
    vit = getattr(model, 'timm_model', model)
    if not isinstance(getattr(vit, 'blocks', None), nn.Sequential):
        raise UserError(f'{type(vit).__name__} has no transformer blocks (model.blocks); this needs a timm ViT '
                         'such as vit_* or deit_*.')
    return vit


def vit_attention_modules(vit: torch.nn.Module) -> List[Tuple[str, Attention]]:
    """The attention module of every block of a timm ViT, by exact name (``blocks.{i}.attn``).

    Raises:
        ValueError: the model has no ViT blocks with timm's standard ``Attention``.
    """
    blocks = getattr(vit, 'blocks', None)
    if not isinstance(blocks, torch.nn.Sequential) or len(blocks) == 0:
        raise UserError(
            f'{type(vit).__name__} has no transformer blocks (model.blocks); attention capture '
            'needs a timm ViT such as vit_* or deit_*.')
    modules = []
    for i, block in enumerate(blocks):
        attn = getattr(block, 'attn', None)
        if not isinstance(attn, Attention):
            raise UserError(
                f'blocks.{i}.attn of {type(vit).__name__} is {type(attn).__name__}, not timm '
                'Attention; only standard ViT attention (vit_*, deit_*) can be captured.')
        modules.append((f'blocks.{i}.attn', attn))
    return modules


@contextmanager
def eager_attention(vit: nn.Module) -> Iterator[List[Tuple[str, Attention]]]:
    """timm's eager attention path in every block while open (fused SDPA never materialises the weights, and
    is invisible to the FLOP counter); the fused flags are restored on exit.

    Yields:
        `vit_attention_modules` of the model.
    """
    modules = vit_attention_modules(vit)
    flags = [attn.fused_attn for _, attn in modules]
    try:
        for _, attn in modules:
            attn.fused_attn = False
        yield modules
    finally:
        for (_, attn), fused in zip(modules, flags):
            attn.fused_attn = fused


@contextmanager
def capture_attentions(vit: torch.nn.Module, reduce: Optional[Callable[[torch.Tensor], object]] = None
                       ) -> Iterator[List]:
    """Records the attention probabilities of every block while the context is open.

    Turns each block's eager attention path on (``fused_attn = False``) and hooks the input of
    ``attn_drop``, which is exactly ``softmax(q k^T * scale)`` (before dropout). On exit the hooks
    are removed and the fused flags restored, whatever happened inside.

    Args:
        reduce: called on every block's map as the block computes it; the list keeps what it returns
            instead of the map, so that the maps need not all be held until the forward pass ends.

    Yields:
        a list that fills with one ``[B, H, N, N]`` tensor (or ``reduce`` of it) per block call, in call order.
    """
    maps: List = []
    handles = []

    def record(module, args):
        maps.append(args[0] if reduce is None else reduce(args[0]))  # [B, H, N, N], rows sum to 1

    with eager_attention(vit) as modules:
        try:
            for _, attn in modules:
                handles.append(attn.attn_drop.register_forward_pre_hook(record))
            yield maps
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def capture_token_norms(vit: nn.Module) -> Iterator[List[torch.Tensor]]:
    """Records the L2 norm of every token at the output of every block while the context is open.

    The output of block ``i`` is the residual stream after it (what block ``i + 1`` reads), the tokens
    whose norms Darcet et al. 2024 ("Vision Transformers Need Registers") plot. A forward hook per block
    keeps only the norms, so memory holds ``[B, N]`` per block, not the ``[B, N, D]`` tokens.

    Yields:
        a list that fills with one ``[B, N]`` float32 tensor per block call, in call order.
    """
    norms: List[torch.Tensor] = []

    def record(module, args, output):
        norms.append(output.detach().float().norm(dim=-1))  # [B, N]

    handles = [block.register_forward_hook(record) for block in vit_of(vit).blocks]
    try:
        yield norms
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edit_block_output(model: nn.Module, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replaces the output of ``blocks[layer]`` (the tokens ``[B, N, D]``) by ``edit(tokens)`` while open.

    The blocks after ``layer`` (and the head) read the edited tokens; the hook is removed on exit.
    """
    vit = vit_of(model)
    check_layers(vit, [layer])
    handle = vit.blocks[int(layer)].register_forward_hook(lambda module, args, output: edit(output))
    try:
        yield
    finally:
        handle.remove()


def check_layers(vit: nn.Module, layers: Sequence[int]) -> None:
    num = len(vit.blocks)
    for layer in layers:
        if not 0 <= int(layer) < num:
            raise UserError(f'layer {layer} does not exist; the model has blocks 0..{num - 1}.')


@contextmanager
def skip_blocks(model: nn.Module, indices: Sequence[int]) -> Iterator[None]:
    """Replaces ``blocks[i]`` by the identity for every ``i`` in indices, restoring them on exit."""
    vit = vit_of(model)
    check_layers(vit, indices)
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
    vit = vit_of(model)
    by_layer: Dict[int, List[int]] = {}
    for layer, head in heads:
        check_layers(vit, [layer])
        num_heads = vit.blocks[int(layer)].attn.num_heads
        if not 0 <= int(head) < num_heads:
            raise UserError(f'head {head} does not exist; layer {layer} has heads 0..{num_heads - 1}.')
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


def timm_config(vit: torch.nn.Module, label_names: Optional[Sequence[str]] = None) -> Dict:
    """The timm-native ``config.json`` of a model, loadable by timm and by transformers.

    timm's exporter records ``num_classes`` inside ``model_args`` as well as at the top level;
    transformers' TimmWrapper passes both to ``create_model`` and fails, so it is dropped from
    ``model_args`` (the top-level value still sets the head).
    """
    with tempfile.TemporaryDirectory() as tmp:
        model_config = {'label_names': list(label_names)} if label_names else None
        save_config_for_hf(vit, os.path.join(tmp, CONFIG_FILE), model_config=model_config)
        with open(os.path.join(tmp, CONFIG_FILE)) as f:
            config = json.load(f)
    config.get('model_args', {}).pop('num_classes', None)
    return config
