"""The standard figures of a run: which picture to draw from which file (the pictures are `analysis.render.plots`).

``render_figures`` writes ``D/figures/*.png`` from what the other steps left in an output
directory ``D``; the report embeds them and the model card links them.
"""
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from analysis.core.run_files import (
    BACKGROUND_FILE,
    CHANGE_FILE,
    COMPRESS_FILE,
    FAITHFULNESS_FILE,
    FIGURES_DIR,
    IMPORTANCE_FILE,
    METRICS_FILE,
    SINKS_FILE,
    START_SUMMARY_FILE,
    SUMMARY_FILE,
    read_optional_json,
    read_results,
)
from analysis.maps.summary import SummaryReader, class_mean_cls_maps_streamed, load_summary
from analysis.modeling.tokens import TokenLayout
from analysis.render import plots
from analysis.render.findings import MANY_CLASSES, best_fg_lift_layer
from data_scripts.errors import UserError

_logger = logging.getLogger(__name__)

# A class-mean figure shows at most this many classes (rows); more classes take more figures (pages).
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
            raise UserError(f'the attention summary has {key} {int(values.min())}..{int(values.max())} but '
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
    # Per-image maps are read only for the examples, and reduced chunk by chunk for the class maps.
    tensors, meta = load_summary(summary_path, ('labels', 'predictions', 'example_indices', 'example_images'))
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
    examples = tensors.get('example_indices')
    if examples is not None and len(examples) > 0:
        idx = examples.long()
        with SummaryReader(summary_path) as reader:
            cls_attention = reader.rows('cls_attention', idx.tolist()).float()  # [E, L, H, P]
            rollout = reader.rows('rollout', idx.tolist()).float()  # [E, P]
        save('layer_grid', plots.layer_grid(
            tensors['example_images'], cls_attention.mean(dim=2), rollout,
            layout, _example_titles(tensors, class_names)))
        layer = head_map_layer(metrics)
        save('head_maps', plots.head_maps(tensors['example_images'][0], cls_attention[0, layer - 1],
                                          layout, layer), f'head_maps_layer{layer}.png')
    else:
        _logger.warning('the attention summary holds no example images; skipping layer_grid and head_maps')
    maps, counts = class_mean_cls_maps_streamed(summary_path, len(class_names))  # [C, L, P], [C]
    for stale in figures_dir.glob('class_maps_*.png'):  # pages of an earlier, larger summary
        stale.unlink()
    for name, shown in class_map_pages(counts):
        save(name, plots.class_mean_maps(maps[shown], [class_names[c] for c in shown], layout))
    return written


def class_map_pages(counts: torch.Tensor) -> List[Tuple[str, List[int]]]:
    """The class-map figures: ``(figure name, class indices shown)``, every class with images, in label order,
    at most `MAX_CLASS_MAP_ROWS` per figure, pages of equal size (``class_maps``, ``class_maps_2``, ...; one figure
    up to that many classes).

    Args:
        counts: ``[C]`` images per class in the summary.
    """
    classes = [c for c in range(len(counts)) if int(counts[c]) > 0]
    num_pages = -(-len(classes) // MAX_CLASS_MAP_ROWS)
    per_page = -(-len(classes) // num_pages) if num_pages else 1  # balanced: 102 classes -> 6 pages of 17
    pages = [classes[i:i + per_page] for i in range(0, len(classes), per_page)]
    return [('class_maps' if k == 0 else f'class_maps_{k + 1}', page) for k, page in enumerate(pages)]


def class_map_captions(summary_path: Union[str, Path]) -> List[Tuple[str, str]]:
    """``(figure name, caption)`` of every class-map figure of a summary (`class_map_pages`), saying what it shows."""
    tensors, meta = load_summary(summary_path, ('labels',))
    names = list(meta['class_names'])
    counts = torch.bincount(tensors['labels'].long(), minlength=len(names))  # [C]
    pages = class_map_pages(counts)
    total = sum(len(shown) for _, shown in pages)
    without = len(names) - total
    missing = f'; {without} class{"es" if without != 1 else ""} without images in the summary' if without else ''
    if len(pages) == 1:
        return [(pages[0][0], f'Mean CLS attention over the images of each class: all {total} classes with '
                              f'images{missing}.')]
    captions = []
    for k, (name, shown) in enumerate(pages):
        first, last = sum(len(s) for _, s in pages[:k]) + 1, sum(len(s) for _, s in pages[:k + 1])
        captions.append((name, f'Mean CLS attention per class, page {k + 1} of {len(pages)}: classes {first}-{last} '
                               f'of the {total} with images, in label order ({names[shown[0]]} to {names[shown[-1]]})'
                               f'{missing}.'))
    return captions


def before_after_grid(start_summary: Union[str, Path], end_summary: Union[str, Path], num_images: int = 3):
    """Layer grid of a few example images, each shown with its start maps and, below, its end maps.

    Returns:
        The figure, or None when the end summary holds no example images.
    """
    # Only the example rows are read (the summaries may hold thousands of images).
    end, meta = load_summary(end_summary, ('example_indices', 'example_images'))
    if len(end.get('example_indices', [])) == 0:
        return None
    layout = TokenLayout.from_dict(meta['layout'])
    indices = end['example_indices'][:num_images].long().tolist()
    names = meta['class_names']
    rows = {}
    for label, path in (('start', start_summary), ('after', end_summary)):
        with SummaryReader(path) as reader:
            rows[label] = {k: reader.rows(k, indices) for k in ('cls_attention', 'rollout', 'labels')}
    images, maps, rollout, titles = [], [], [], []
    for e, i in enumerate(indices):
        for label in ('start', 'after'):
            images.append(end['example_images'][e])
            maps.append(rows[label]['cls_attention'][e].float().mean(dim=1))  # [L, P]
            rollout.append(rows[label]['rollout'][e].float())
            titles.append(f'{names[int(rows["after"]["labels"][e])]}\n{label}')
    return plots.layer_grid(torch.stack(images), torch.stack(maps), torch.stack(rollout), layout, titles)


def rendered_figures(output_dir: Union[str, Path]) -> Dict[str, Path]:
    """The PNGs `render_figures` wrote into ``D/figures`` before, by name (to re-write a report without drawing
    them again)."""
    return {path.stem: path for path in sorted((Path(output_dir) / FIGURES_DIR).glob('*.png'))}


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
    summary; ``background.png`` / ``importance.png`` / ``faithfulness.png`` / ``sinks.png`` when those studies were run,
    ``compression.png`` for a compressed model. Figures whose inputs are missing are skipped (and logged).

    Args:
        output_dir: the training output directory ``D``.
        summary_path: the attention summary; default ``D/attentions.safetensors`` (skipped when
            absent; an explicitly given path must exist).
        figures_dir: where to write; default ``D/figures``.

    Returns:
        ``{figure name: path}`` with names ``confusion_matrix``, ``f1_bars``, ``depth_curves``,
        ``layer_grid``, ``head_maps``, ``class_maps``, ``background``, ``importance``, ``faithfulness``,
        ``sinks``, ``compression``.
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
        save('f1_bars', plots.f1_bars(all_results['test_f1_per_class'],
                                      worst_first=len(all_results['test_f1_per_class']) >= MANY_CLASSES))
    if summary_path is None and (output_dir / SUMMARY_FILE).is_file():
        summary_path = output_dir / SUMMARY_FILE
    if summary_path is not None:
        written.update(summary_figures(summary_path, figures_dir, metrics))
    else:
        _logger.warning('%s not found; skipping the attention pictures', output_dir / SUMMARY_FILE)

    change = read_optional_json(output_dir / CHANGE_FILE)
    if change is not None:
        save('attention_change', plots.attention_change_figure(change))
        if summary_path is not None and (output_dir / START_SUMMARY_FILE).is_file():
            grid = before_after_grid(output_dir / START_SUMMARY_FILE, summary_path)
            if grid is not None:
                save('layer_grid_change', grid)
    if background is not None:
        save('background', plots.background_figure(background))
    if importance is not None:
        save('importance', plots.importance_figure(importance))
    compress = read_optional_json(output_dir / COMPRESS_FILE)
    if compress is not None and compress.get('search'):
        save('compression', plots.compression_figure(compress))
    faithfulness = read_optional_json(output_dir / FAITHFULNESS_FILE)
    if faithfulness is not None:
        save('faithfulness', plots.faithfulness_figure(faithfulness))
    sinks = read_optional_json(output_dir / SINKS_FILE)
    if sinks is not None:
        save('sinks', plots.sinks_figure(sinks))
    _logger.info('wrote %d figures to %s', len(written), figures_dir)
    return written
