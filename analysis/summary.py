"""The attention summary file (``attentions.safetensors``): its format, writing and reading.

Tensors (``M`` images, ``L`` layers, ``H`` heads, ``P`` patches, ``N`` tokens): ``labels`` and
``predictions`` ``[M]``; ``cls_attention`` ``[M, L, H, P]`` float16; ``rollout`` ``[M, P]``;
``fg_fraction`` ``[M, P]`` (only with masks); ``full_attention`` ``[K, L, H, N, N]`` (only if
asked for); ``example_images`` ``[E, H_px, W_px, 3]`` uint8 and ``example_indices`` ``[E]``.
The safetensors metadata key ``"analysis"`` holds a JSON dict: format, version, model_id,
class_names, num_layers, num_heads, layout (`TokenLayout.to_dict`), image_size, has_masks,
dataset, split, num_images.
"""
import json
import os
from pathlib import Path
from typing import Dict, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from data_scripts.files import atomic_path
from .tokens import TokenLayout

SUMMARY_FORMAT = 'flower-vit-lens/attention-summary'
SUMMARY_VERSION = 1
EXTRACT_COMMAND = 'python -m analysis extract --model <dir>'


def save_summary(path: os.PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict) -> None:
    """Writes the summary as safetensors with the metadata as JSON (whole or not at all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={'analysis': json.dumps(metadata)})


def read_summary_meta(path: Union[str, Path]) -> Dict:
    """Reads only the ``"analysis"`` metadata of an attention summary (no tensors).

    Args:
        path: the summary file.

    Returns:
        The parsed metadata.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an attention summary of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist; run the attention analysis first '
                                f'({EXTRACT_COMMAND}) or pass the right path.')
    not_summary = (f'{path} is not an attention summary (expected a safetensors file with metadata '
                   f'"analysis" of format {SUMMARY_FORMAT!r}); pass the attentions.safetensors written by '
                   'the attention analysis.')
    try:
        with safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f'{not_summary} ({e})') from e
    if 'analysis' not in metadata:
        raise ValueError(not_summary)
    try:
        meta = json.loads(metadata['analysis'])
    except json.JSONDecodeError as e:
        raise ValueError(f'{not_summary} (its "analysis" metadata is not JSON: {e})') from e
    if not isinstance(meta, dict) or meta.get('format') != SUMMARY_FORMAT:
        raise ValueError(not_summary)
    if meta.get('version') != SUMMARY_VERSION:
        raise ValueError(f'{path} is an attention summary of version {meta.get("version")}; this code reads '
                         f'version {SUMMARY_VERSION}. Re-run the attention analysis.')
    return meta


def load_summary(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Loads an attention summary (``attentions.safetensors``).

    Args:
        path: the summary file.

    Returns:
        ``(tensors, meta)``: the tensors by name and the parsed ``"analysis"`` metadata.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an attention summary of this version.
    """
    meta = read_summary_meta(path)
    return load_file(str(path)), meta


def check_summary_matches(metadata: Dict, model: torch.nn.Module) -> None:
    """Raises if a summary was written by a model with another layout or other classes."""
    theirs = (TokenLayout.from_dict(metadata['layout']), metadata['num_layers'], metadata['num_heads'])
    ours = (model.token_layout, model.num_blocks, model.timm_model.blocks[0].attn.num_heads)
    if theirs != ours:
        raise ValueError(
            f'the attention summary comes from another model (layout, layers, heads {theirs} vs {ours}); '
            're-run `python -m analysis extract` with this model.')


