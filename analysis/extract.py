"""Streams a dataset split through the model and keeps a compact attention summary per image.

Per image: label, prediction, the CLS-to-patch attention of every layer and head (``[L, H, P]``,
float16), the CLS row of the attention rollout (``[P]``) and, with masks, the fraction of each
patch covered by the flower (``[P]``). Full ``N x N`` maps only for the first ``full_maps``
images. The per-batch maps are reduced (`AttentionMetricsAccumulator`) and dropped, so memory
holds one batch of maps plus the small per-image rows, never every image's ``L x H x N x N``.
"""
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .attention_metrics import AttentionMetricsAccumulator
from data_scripts.files import write_json
from .modeling import TimmViTForImageClassification
from .rollout import rollout_cls
from .run_files import METRICS_FILE, SUMMARY_FILE
from .summary import SUMMARY_FORMAT, SUMMARY_VERSION, save_summary
from .tokens import TokenLayout
from .transforms import batch_transform, collate, eval_geometry, eval_transform, model_data_config

_logger = logging.getLogger(__name__)



def _unnormalise(pixel_values: torch.Tensor, data_config: Dict) -> torch.Tensor:
    """``[B, 3, H, W]`` normalised -> ``[B, H, W, 3]`` uint8, the crop the model saw."""
    mean = torch.tensor(data_config['mean']).view(1, 3, 1, 1)
    std = torch.tensor(data_config['std']).view(1, 3, 1, 1)
    pixels = (pixel_values * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1)


def check_input_size(pixel_values: torch.Tensor, layout: TokenLayout) -> None:
    """Raises if the images do not tile the model's patch grid exactly."""
    if tuple(pixel_values.shape[-2:]) != layout.image_size:
        raise ValueError(
            f'images are {tuple(pixel_values.shape[-2:])} pixels but the model takes {layout.image_size} '
            f'({layout.grid_size} patches of {layout.patch_size}); use the model\'s eval transform '
            '(analysis.transforms.eval_transform) to resize and crop them.')


@torch.inference_mode()
def extract_summary(
        model: TimmViTForImageClassification,
        dataset: datasets.Dataset,
        *,
        data_config: Optional[Dict] = None,
        batch_size: int = 64,
        full_maps: int = 0,
        num_examples: int = 4,
        max_batches: Optional[int] = None,
        model_id: str = '',
        dataset_name: str = '',
        split: str = '',
        progress: bool = True,
) -> Tuple[Dict[str, torch.Tensor], Dict, Dict]:
    """Runs the model over a dataset split with ``output_attentions=True``.

    Args:
        model: the ViT.
        dataset: raw split with ``image``, ``label`` and optionally ``mask`` columns.
        data_config: timm data config (default: the model's).
        batch_size: images per forward pass.
        full_maps: keep the full ``[L, H, N, N]`` maps of the first this many images.
        num_examples: keep the input crops of up to this many correct and as many wrong predictions.
        max_batches: stop after this many batches (default: the whole split).
        model_id / dataset_name / split: recorded in the metadata.
        progress: show a tqdm bar.

    Returns:
        ``(tensors, metadata, metrics)``: the summary tensors, its metadata and the
        `AttentionMetricsAccumulator` result.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f'--max_batches must be >= 1, got {max_batches}')
    if full_maps < 0:
        raise ValueError(f'--full_maps must be >= 0, got {full_maps}')
    model.eval()
    data_config = data_config or model_data_config(model.timm_model)
    layout = model.token_layout
    class_names = dataset.features['label'].names
    scored = model.class_names == class_names
    if not scored:
        _logger.warning(f'the model predicts {model.num_labels} classes of its own, not the dataset\'s '
                        f'{class_names}: attention is measured, predictions are not scored.')
    has_masks = 'mask' in dataset.column_names
    columns = ['image', 'label'] + (['mask'] if has_masks else [])
    dataset = dataset.with_transform(
        batch_transform(eval_transform(data_config), eval_geometry(data_config) if has_masks else None),
        columns=columns)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    num_images = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    L, H, P, N = model.num_blocks, model.timm_model.blocks[0].attn.num_heads, layout.num_patches, layout.num_tokens

    # Per-image rows, allocated once: memory is fixed by the split size, not by the maps.
    labels = torch.empty(num_images, dtype=torch.long)
    predictions = torch.empty(num_images, dtype=torch.long)
    cls_attention = torch.empty(num_images, L, H, P, dtype=torch.float16)
    rollout = torch.empty(num_images, P, dtype=torch.float16)
    fg_fraction = torch.empty(num_images, P, dtype=torch.float16) if has_masks else None
    full = torch.empty(min(full_maps, num_images), L, H, N, N, dtype=torch.float16)
    examples = {True: [], False: []}  # correct? -> [(index, image uint8)]
    metrics = AttentionMetricsAccumulator(layout, L, H, class_names)

    start = 0
    for step, batch in enumerate(tqdm(loader, total=-(-num_images // batch_size), disable=not progress,
                                      desc='attention')):
        if start >= num_images:
            break
        pixel_values = batch['pixel_values']
        check_input_size(pixel_values, layout)
        out = model(pixel_values.to(model.device, model.dtype), output_attentions=True)
        attentions = out.attentions  # L x [B, H, N, N], reduced where the model runs
        B = pixel_values.shape[0]
        end = start + B
        labels_here = batch['labels'].to(model.device)
        cls_rows = torch.stack([layout.cls_to_patches(a) for a in attentions], dim=1).float()  # [B, L, H, P]
        roll = rollout_cls(attentions, layout=layout)  # [B, P]
        fg = layout.patch_fraction(batch['fg_mask'].to(model.device)) if has_masks else None  # [B, P]
        pred = out.logits.argmax(-1).cpu()
        metrics.update(attentions, cls_rows, labels_here, fg_fraction=fg, rollout_cls=roll)

        labels[start:end] = batch['labels']
        predictions[start:end] = pred
        cls_attention[start:end] = cls_rows.half().cpu()
        rollout[start:end] = roll.half().cpu()
        if has_masks:
            fg_fraction[start:end] = fg.half().cpu()
        if start < len(full):
            k = min(end, len(full)) - start
            full[start:start + k] = torch.stack([a[:k] for a in attentions], dim=1).half().cpu()  # [k, L, H, N, N]
        correct = pred == batch['labels'] if scored else torch.ones(B, dtype=torch.bool)
        for i in range(B):
            bucket = examples[bool(correct[i])]
            if len(bucket) < num_examples:
                bucket.append((start + i, _unnormalise(pixel_values[i:i + 1], data_config)[0]))
        start = end

    chosen = sorted(examples[True] + examples[False], key=lambda e: e[0])
    tensors = {
        'labels': labels, 'predictions': predictions, 'cls_attention': cls_attention, 'rollout': rollout,
        'example_indices': torch.tensor([i for i, _ in chosen], dtype=torch.long),
        'example_images': torch.stack([img for _, img in chosen]) if chosen
        else torch.empty(0, *layout.image_size, 3, dtype=torch.uint8),
    }
    if has_masks:
        tensors['fg_fraction'] = fg_fraction
    if len(full):
        tensors['full_attention'] = full
    metadata = {
        'format': SUMMARY_FORMAT, 'version': SUMMARY_VERSION, 'model_id': model_id, 'class_names': class_names,
        'num_layers': L, 'num_heads': H, 'layout': layout.to_dict(), 'image_size': list(layout.image_size),
        'has_masks': has_masks, 'dataset': dataset_name, 'split': split, 'num_images': num_images,
        'predictions_scored': scored, 'model_class_names': model.class_names if not scored else None,
    }
    return tensors, metadata, metrics.compute()


def extract_to_dir(model, dataset, output_dir, **kwargs) -> Path:
    """`extract_summary` into ``output_dir/attentions.safetensors`` + ``attention_metrics.json``."""
    tensors, metadata, metrics = extract_summary(model, dataset, **kwargs)
    output_dir = Path(output_dir)
    save_summary(output_dir / SUMMARY_FILE, tensors, metadata)
    write_json(output_dir / METRICS_FILE, metrics)
    _logger.info(f'attention summary of {metadata["num_images"]} images -> {output_dir / SUMMARY_FILE}')
    return output_dir / SUMMARY_FILE


@torch.inference_mode()
def attend_images(model: TimmViTForImageClassification, images, data_config: Optional[Dict] = None) -> Dict:
    """Attention of the model on a few user images (any size: the eval transform resizes and crops).

    Args:
        model: the ViT.
        images: PIL images.
        data_config: timm data config (default: the model's).

    Returns:
        ``images`` ``[E, H, W, 3]`` uint8 (the crops the model saw), ``cls_maps`` ``[E, L, P]``
        (head-averaged CLS attention), ``cls_attention`` ``[E, L, H, P]``, ``rollout`` ``[E, P]``,
        ``probs`` ``[E, C]``.
    """
    from data_scripts import to_rgb
    model.eval()
    data_config = data_config or model_data_config(model.timm_model)
    layout = model.token_layout
    transform = eval_transform(data_config)
    pixel_values = torch.stack([transform(to_rgb(img)) for img in images])
    check_input_size(pixel_values, layout)
    out = model(pixel_values.to(model.device, model.dtype), output_attentions=True)
    attentions = tuple(a.float().cpu() for a in out.attentions)
    cls_rows = torch.stack([layout.cls_to_patches(a) for a in attentions], dim=1)  # [E, L, H, P]
    return {
        'images': _unnormalise(pixel_values, data_config), 'cls_attention': cls_rows,
        'cls_maps': cls_rows.mean(dim=2), 'rollout': rollout_cls(attentions, layout=layout),
        'probs': out.logits.float().softmax(-1).cpu(),
    }
