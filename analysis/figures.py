"""The standard figures of a run: which picture to draw from which file (the pictures are `analysis.plots`).

``render_figures`` writes ``D/figures/*.png`` from what the other steps left in an output
directory ``D``; the report embeds them and the model card links them.
"""
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from . import plots
from .attention_metrics import class_mean_cls_maps
from .findings import best_fg_lift_layer
from .run_files import (BACKGROUND_FILE, FIGURES_DIR, IMPORTANCE_FILE, METRICS_FILE, SUMMARY_FILE, read_optional_json,
                        read_results)
from .summary import load_summary
from .tokens import TokenLayout

_logger = logging.getLogger(__name__)

# The class-mean figure shows at most this many classes (rows); more would be unreadable.
MAX_CLASS_MAP_ROWS = 20


def head_map_layer(metrics: Optional[Mapping]) -> int:
    """1-based layer whose head maps are drawn: the highest fg_lift, else layer 1."""
    best = best_fg_lift_layer(metrics)
    return 1 if best is None else best + 1


def _check_summary(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    names = meta['class_names']
    for key in ('labels', 'predictions'):
        values = tensors[key]
        if len(values) and (int(values.min()) < 0 or int(values.max()) >= len(names)):
            raise ValueError(f'the attention summary has {key} {int(values.min())}..{int(values.max())} but '
                             f'{len(names)} class names; re-run the attention analysis.')


def _example_titles(tensors: Mapping[str, torch.Tensor], class_names: Sequence[str]) -> List[str]:
    titles = []
    for i in tensors['example_indices'].tolist():
        true, pred = int(tensors['labels'][i]), int(tensors['predictions'][i])
        mark = '\u2713' if true == pred else '\u2717'
        titles.append(f'true: {class_names[true]}\npred: {class_names[pred]} {mark}')
    return titles


def summary_figures(summary_path: Union[str, Path], figures_dir: Union[str, Path],
                    metrics: Optional[Mapping] = None) -> Dict[str, Path]:
    """The pictures of an attention summary: layer grid, head maps, class mean maps, depth curves.

    Args:
        summary_path: an ``attentions.safetensors``.
        figures_dir: where to write the PNGs.
        metrics: its attention metrics (default: ``attention_metrics.json`` next to the summary,
            if there is one); they choose the head-map layer and give the depth curves.

    Returns:
        ``{figure name: path}``.
    """
    figures_dir = Path(figures_dir)
    tensors, meta = load_summary(summary_path)
    _check_summary(tensors, meta)
    if metrics is None:
        metrics = read_optional_json(Path(summary_path).parent / METRICS_FILE)
    written: Dict[str, Path] = {}

    def save(name: str, fig, filename: Optional[str] = None) -> None:
        written[name] = plots.save_figure(fig, figures_dir / (filename or f'{name}.png'))

    if metrics is not None:
        save('depth_curves', plots.depth_curves(metrics))
    layout = TokenLayout.from_dict(meta['layout'])
    class_names = list(meta['class_names'])
    cls_attention = tensors['cls_attention'].float()  # [M, L, H, P]
    examples = tensors.get('example_indices')
    if examples is not None and len(examples) > 0:
        idx = examples.long()
        save('layer_grid', plots.layer_grid(
            tensors['example_images'], cls_attention[idx].mean(dim=2), tensors['rollout'][idx].float(),
            layout, _example_titles(tensors, class_names)))
        layer = head_map_layer(metrics)
        save('head_maps', plots.head_maps(tensors['example_images'][0], cls_attention[idx[0], layer - 1],
                                          layout, layer), f'head_maps_layer{layer}.png')
    else:
        _logger.warning('the attention summary holds no example images; skipping layer_grid and head_maps')
    maps, counts = class_mean_cls_maps(cls_attention, tensors['labels'], len(class_names))
    shown = [c for c in range(len(class_names)) if counts[c] > 0][:MAX_CLASS_MAP_ROWS]
    if len(shown) < int((counts > 0).sum()):
        _logger.info('class_maps shows the first %d of %d classes with images', len(shown), int((counts > 0).sum()))
    if shown:
        save('class_maps', plots.class_mean_maps(maps[shown], [class_names[c] for c in shown], layout))
    return written


def render_figures(
        output_dir: Union[str, Path],
        *,
        summary_path: Optional[Union[str, Path]] = None,
        figures_dir: Optional[Union[str, Path]] = None,
) -> Dict[str, Path]:
    """Writes the standard PNGs of a run into ``figures_dir`` (default ``D/figures``).

    ``confusion_matrix.png`` and ``f1_bars.png`` from ``all_results.json``; ``depth_curves.png``
    from ``attention_metrics.json``; ``layer_grid.png``, ``head_maps_layer{l}.png`` (the layer
    with the highest fg_lift, layer 1 without masks) and ``class_maps.png`` from the attention
    summary; ``background.png`` / ``importance.png`` when those studies were run. Figures whose
    inputs are missing are skipped (and logged).

    Args:
        output_dir: the training output directory ``D``.
        summary_path: the attention summary; default ``D/attentions.safetensors`` (skipped when
            absent; an explicitly given path must exist).
        figures_dir: where to write; default ``D/figures``.

    Returns:
        ``{figure name: path}`` with names ``confusion_matrix``, ``f1_bars``, ``depth_curves``,
        ``layer_grid``, ``head_maps``, ``class_maps``, ``background``, ``importance``.
    """
    output_dir = Path(output_dir)
    figures_dir = Path(figures_dir) if figures_dir is not None else output_dir / FIGURES_DIR
    all_results = read_results(output_dir)
    metrics = read_optional_json(output_dir / METRICS_FILE)
    background = read_optional_json(output_dir / BACKGROUND_FILE)
    importance = read_optional_json(output_dir / IMPORTANCE_FILE)
    written: Dict[str, Path] = {}

    def save(name: str, fig, filename: Optional[str] = None) -> None:
        written[name] = plots.save_figure(fig, figures_dir / (filename or f'{name}.png'))

    if 'test_confusion_matrix' in all_results:
        save('confusion_matrix', plots.confusion_matrix_figure(
            all_results['test_confusion_matrix'], all_results['test_class_names']))
    if all_results.get('test_f1_per_class'):
        save('f1_bars', plots.f1_bars(all_results['test_f1_per_class']))
    if summary_path is None and (output_dir / SUMMARY_FILE).is_file():
        summary_path = output_dir / SUMMARY_FILE
    if summary_path is not None:
        written.update(summary_figures(summary_path, figures_dir, metrics))
    else:
        _logger.warning('%s not found; skipping the attention pictures', output_dir / SUMMARY_FILE)

    if background is not None:
        save('background', plots.background_figure(background))
    if importance is not None:
        save('importance', plots.importance_figure(importance))
    _logger.info('wrote %d figures to %s', len(written), figures_dir)
    return written
