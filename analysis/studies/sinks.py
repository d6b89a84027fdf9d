"""Does the model have attention sinks, and does it need them? ``sinks.json`` of a model on a split.

The per-layer table (`analysis.maps.sinks.SinkAccumulator`) comes from an attention summary: the
extraction writes every image's token norms and CLS rows (`analysis.maps.extract`), so the training
job reads its own summary and adds no pass over the images for it.

**The causal check** (`causal_check`): at the sink layer (`sink_layer`: the first layer whose sink share
reaches half its maximum over depth, i.e. where the flagged tokens start to draw the CLS attention),
every flagged token of an image is replaced by the mean of its unflagged patch tokens (mean
substitution: zeros would be far off the distribution the next blocks read, and overstate the
tokens' role), and the change of the logit of the class predicted on the intact image is measured.
The control replaces as many random background patch tokens (not flagged; covered by the flower less
than half), drawn by seed per image, the same way. Per image the two changes are paired: the
difference (sinks minus random) has its own mean and SE. Images without a flagged token at that layer
are left out (their number is reported).
"""
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from analysis.core.run_files import SINKS_FILE, SUMMARY_FILE
from analysis.core.stats import mean_se
from analysis.maps.extract import check_input_size, eval_loader, extract_to_file
from analysis.maps.sinks import MODIFIED_Z, K, SinkAccumulator, flag_high_norm, mean_substitute, sink_margin
from analysis.maps.summary import SummaryReader
from analysis.modeling.timm_internals import capture_token_norms, edit_block_output
from analysis.modeling.tokens import TokenLayout
from analysis.modeling.transforms import model_data_config
from analysis.studies.background import sample_rows
from analysis.studies.stability import direction
from data_scripts.errors import UserError
from data_scripts.files import write_json

_logger = logging.getLogger(__name__)

SINKS_MAX_IMAGES = 500  # the command line's images
CAUSAL_IMAGES = 100  # the command line's causal check
JOB_CAUSAL_IMAGES = 64  # the training job's bounded causal check (the table itself reads the summary)
RULE = {'statistic': 'per image and layer, a patch token is flagged when its norm exceeds median + k * MAD of '
                     'that image\'s patch-token norms at that layer (prefix tokens are never flagged)',
        'k': K, 'modified_z': MODIFIED_Z,
        'why': 'the robust outlier rule of Iglewicz & Hoaglin (1993), modified z-score above 3.5: median and MAD '
               'ignore the outliers themselves, so the threshold follows each layer\'s own scale (norms grow with '
               'depth) and each model; a normal distribution has 0.02 % of its values above it'}
SUMMARY_ROWS = ('token_norms', 'cls_attention', 'prefix_attention')


def summary_sinks(summary_path: Union[str, Path]) -> Dict:
    """`SinkAccumulator.compute` of an attention summary, read chunk by chunk."""
    with SummaryReader(summary_path) as reader:
        missing = [n for n in SUMMARY_ROWS if n not in reader]
        if missing:
            raise UserError(f'{summary_path} has no {", ".join(missing)} rows (written by an older version, or without '
                            'keep_rows); extract it again: python -m analysis extract --model <run>')
        meta = reader.meta
        accumulator = SinkAccumulator(TokenLayout.from_dict(meta['layout']), meta['num_layers'], meta['num_heads'])
        names = list(SUMMARY_ROWS) + (['fg_fraction'] if meta.get('has_masks') else [])
        for chunk in reader.chunks(names):
            accumulator.update(chunk['token_norms'], chunk['cls_attention'], chunk['prefix_attention'],
                               chunk.get('fg_fraction'))
    return accumulator.compute()


def sink_layers(table: Dict) -> List[int]:
    """The 0-based layers with attention sinks: `sink_margin` above 0 beyond `Z` standard errors."""
    return [i for i, layer in enumerate(table['layers']) if direction(*sink_margin(layer)) > 0]


def sink_layer(table: Dict) -> Optional[int]:
    """The first layer (0-based) whose sink share reaches half its maximum over the layers; None without flags."""
    shares = [layer['sink_share']['mean'] for layer in table['layers']]
    if max(shares) <= 0:
        return None
    return next(i for i, s in enumerate(shares) if s >= max(shares) / 2)


def _random_background(flags: torch.Tensor, fg: torch.Tensor, image_ids, seed: int) -> torch.Tensor:
    """Per image, as many random background patches (fg < 0.5, not flagged) as it has flagged: bool ``[B, P]``."""
    chosen = torch.zeros_like(flags)
    for i, image_id in enumerate(image_ids):
        candidates = torch.nonzero((fg[i] < 0.5) & ~flags[i]).flatten().numpy()
        rng = np.random.default_rng([seed, int(image_id), 2])
        take = rng.choice(candidates, size=min(int(flags[i].sum()), len(candidates)), replace=False)
        chosen[i, torch.as_tensor(take, dtype=torch.long)] = True
    return chosen


@torch.inference_mode()
def causal_check(model, dataset_split: datasets.Dataset, layer: int, *, max_images: Optional[int] = 100,
                 batch_size: int = 64, seed: int = 0, progress: bool = False) -> Dict:
    """Logit change when the flagged tokens of ``layer`` are replaced by the mean of the other patch tokens,
    against as many random background tokens (module docstring).

    Args:
        model: `TimmViTForImageClassification`.
        dataset_split: raw split with ``image``, ``label`` and ``mask`` (the control draws background patches).
        layer: 0-based block whose output is edited.
        max_images: images drawn by seed (None: all).

    Returns:
        ``{"layer", "num_images", "images_with_flagged", "sinks": {mean, se}, "random": {mean, se},
        "difference": {mean, se}, "accuracy": {"intact", "sinks", "random"}}`` (logit changes: after - before).
    """
    if 'mask' not in dataset_split.column_names:
        raise UserError('the causal check draws random background tokens from the flower masks; this split has none.')
    model.eval()
    layout = model.token_layout
    p = layout.num_prefix_tokens
    rows = sample_rows(len(dataset_split), max_images, seed)
    loader = eval_loader(dataset_split, rows.tolist(), model_data_config(model.timm_model), True, batch_size)
    changes: Dict[str, list] = {'sinks': [], 'random': []}
    correct: Dict[str, list] = {'intact': [], 'sinks': [], 'random': []}
    start = 0
    for batch in tqdm(loader, disable=not progress, desc='sinks causal check'):
        pixel_values = batch['pixel_values'].to(model.device, model.dtype)
        check_input_size(pixel_values, layout)
        ids = rows[start:start + len(pixel_values)]
        start += len(pixel_values)
        with capture_token_norms(model.timm_model) as norms:
            logits = model(pixel_values).logits.float()
        flags = flag_high_norm(layout.patch_tokens(norms[layer])).cpu()  # [B, P]
        has = flags.any(-1)
        if not has.any():
            continue
        fg = layout.patch_fraction(batch['fg_mask']).cpu()  # [B, P]
        predicted = logits.argmax(-1)
        pool = torch.cat([torch.zeros(len(flags), p, dtype=torch.bool), ~flags], dim=1)  # unflagged patch tokens
        labels = batch['labels'][has]
        correct['intact'].append((predicted.cpu()[has] == labels).numpy())
        for name, chosen in (('sinks', flags), ('random', _random_background(flags, fg, ids, seed))):
            replace = torch.cat([torch.zeros(len(flags), p, dtype=torch.bool), chosen], dim=1).to(model.device)
            with edit_block_output(model, layer, lambda x: mean_substitute(x, replace, pool.to(x.device))):
                edited = model(pixel_values).logits.float()
            change = edited.gather(1, predicted[:, None])[:, 0] - logits.gather(1, predicted[:, None])[:, 0]
            changes[name].append(change.cpu()[has].numpy())
            correct[name].append((edited.argmax(-1).cpu()[has] == labels).numpy())
    if not changes['sinks']:
        return {'layer': layer, 'num_images': len(rows), 'images_with_flagged': 0,
                'omitted': f'no image has a flagged token at layer {layer + 1}'}
    sinks, random = np.concatenate(changes['sinks']), np.concatenate(changes['random'])
    return {
        'layer': layer, 'num_images': len(rows), 'images_with_flagged': int(len(sinks)),
        'sinks': mean_se(sinks), 'random': mean_se(random), 'difference': mean_se(sinks - random),
        'accuracy': {k: float(np.concatenate(v).mean()) for k, v in correct.items()},
        'what': 'change of the logit of the class predicted on the intact image (after - before), mean and SE '
                'over the images with a flagged token',
    }


def sinks_study(model, summary_path: Union[str, Path], dataset_split: Optional[datasets.Dataset] = None, *,
                causal_images: Optional[int] = CAUSAL_IMAGES, layer: Optional[int] = None, batch_size: int = 64,
                seed: int = 0, progress: bool = False) -> Dict:
    """The per-layer table of a summary, and the causal check on ``dataset_split`` (when it has masks).

    Args:
        layer: 0-based layer of the causal check (default: `sink_layer`).
        causal_images: images of the causal check (0: none).
    """
    began = time.perf_counter()
    table = summary_sinks(summary_path)
    chosen = sink_layer(table) if layer is None else layer
    result = {'rule': RULE, **table, 'sink_layer': chosen}
    if not causal_images:
        result['causal'] = {'omitted': 'not asked for (causal_images=0)'}
    elif dataset_split is None or 'mask' not in dataset_split.column_names:
        result['causal'] = {'omitted': 'the split has no flower masks to draw random background tokens from'}
    elif chosen is None:
        result['causal'] = {'omitted': 'no layer has flagged tokens'}
    else:
        result['causal'] = causal_check(model, dataset_split, chosen, max_images=causal_images, batch_size=batch_size,
                                        seed=seed, progress=progress)
    result['runtime_s'] = round(time.perf_counter() - began, 2)
    return result


def sinks_to_dir(model, output_dir: Union[str, Path], dataset_split: Optional[datasets.Dataset] = None, *,
                 summary_path: Optional[Union[str, Path]] = None, **options) -> Path:
    """`sinks_study` of ``output_dir``'s summary (default) into ``output_dir/sinks.json``."""
    output_dir = Path(output_dir)
    path = output_dir / SINKS_FILE
    write_json(path, sinks_study(model, summary_path or output_dir / SUMMARY_FILE, dataset_split, **options))
    _logger.info('attention sinks -> %s', path)
    return path


def sinks_of_split(model, dataset_split: datasets.Dataset, *, max_images: Optional[int] = SINKS_MAX_IMAGES,
                   seed: int = 0, batch_size: int = 64, model_id: str = '', split: str = 'test', progress: bool = False,
                   **options) -> Dict:
    """The command line's study: one extraction pass over ``max_images`` images drawn by seed (its summary in a
    temporary folder), then `sinks_study` (the causal check on images drawn by the same seed)."""
    rows = sample_rows(len(dataset_split), max_images, seed)
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / SUMMARY_FILE
        extract_to_file(model, dataset_split.select(rows), summary, batch_size=batch_size, model_id=model_id,
                        split=split, progress=progress, num_examples=0)
        return sinks_study(model, summary, dataset_split, batch_size=batch_size, seed=seed, progress=progress,
                           **options)
