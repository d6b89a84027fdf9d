"""Pictures of the attention analysis: arrays in, matplotlib ``Figure`` out.

Every function here is pure: it takes numbers (numpy arrays or torch tensors), a
:class:`~analysis.modeling.tokens.TokenLayout` and names, and returns a ``matplotlib.figure.Figure``.
Figures are built with ``Figure()`` directly, not ``pyplot``, so nothing is registered in a
global figure manager (no figure to close, no GUI backend needed). :func:`save_figure` writes
a PNG atomically. Reading files and choosing what to draw is :mod:`analysis.render.report`'s job.

Attention maps are drawn DINO-style (Caron et al. 2021, ``visualize_attention.py``): the
CLS-to-patch row ``[P]`` is reshaped to the patch grid and upsampled by the patch size
(nearest neighbour), so each patch covers exactly the pixels it was cut from.
"""
import logging
import textwrap
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import matplotlib
import matplotlib.colors
import matplotlib.ticker
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.modeling.tokens import TokenLayout
from data_scripts.errors import UserError
from data_scripts.files import atomic_path

_logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

DEFAULT_DPI = 110
ATTENTION_CMAP = 'inferno'
OVERLAY_ALPHA = 0.6
# Above this many classes, numbers in confusion-matrix cells become unreadable.
MAX_CLASSES_WITH_CELL_VALUES = 20
DEPTH_METRIC_LABELS = {
    'fg_lift': 'fg_lift (flower share of attention / flower area)',
    'pointing_game': 'pointing game (top patch on flower)',
    'entropy': 'entropy of the CLS attention / log P (1 = uniform)',
    'mean_attention_distance': 'mean attention distance (px)',
}


def _as_numpy(x: ArrayLike) -> np.ndarray:
    """Tensor / list / array -> numpy; floating tensors (float16 included) become float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        return x.numpy()
    arr = np.asarray(x)
    if arr.dtype == object:  # JSON lists with None (undefined fg_lift) -> NaN, which plots leave out
        arr = np.array(x, dtype=np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return arr


def _scale_to_max(attn_map: np.ndarray) -> np.ndarray:
    """Divides a map by its own maximum so every panel uses the full colour range."""
    peak = float(attn_map.max())
    return attn_map / peak if peak > 0 else attn_map


def upsample_to_image(patch_values: ArrayLike, layout: TokenLayout) -> np.ndarray:
    """Patch values ``[P]`` -> pixel map ``[H, W]`` (nearest neighbour, one block per patch).

    Args:
        patch_values: one value per patch, ``[P]``, row-major.
        layout: token layout of the model.

    Returns:
        ``[grid_h * patch_h, grid_w * patch_w]`` float32 array.
    """
    grid = layout.to_grid(torch.as_tensor(_as_numpy(patch_values)))  # [gh, gw]
    return np.kron(grid.numpy(), np.ones(layout.patch_size, dtype=np.float32))  # [H, W]


def _check_image(image: np.ndarray, layout: TokenLayout) -> None:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise UserError(f'expected an RGB image [H, W, 3], got shape {tuple(image.shape)}')
    if tuple(image.shape[:2]) != tuple(layout.image_size):
        raise UserError(
            f'image is {tuple(image.shape[:2])} px but the patch grid covers {layout.image_size} px; '
            'store the model-input crop of the image (the summary\'s example_images) with its layout.')


def _overlay(ax: Axes, image: Optional[np.ndarray], patch_values: ArrayLike, layout: TokenLayout) -> None:
    """Draws one attention map, scaled to its own max, over ``image`` (or alone when None)."""
    attn = _scale_to_max(upsample_to_image(patch_values, layout))  # [H, W]
    if image is not None:
        ax.imshow(image)
        ax.imshow(attn, cmap=ATTENTION_CMAP, alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0)
    else:
        ax.imshow(attn, cmap=ATTENTION_CMAP, vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])


def panel(image: Optional[np.ndarray], patch_values: ArrayLike, layout: TokenLayout) -> np.ndarray:
    """One attention map as RGB pixels in [0, 1]: scaled to its own max, coloured, over ``image`` (alone when None).

    The same picture `_overlay` draws (``OVERLAY_ALPHA`` of the colour over the image), computed
    here so that a grid of many maps is one picture instead of one matplotlib axes per map.
    """
    import matplotlib
    attn = _scale_to_max(upsample_to_image(patch_values, layout))  # [H, W]
    colour = matplotlib.colormaps[ATTENTION_CMAP](attn)[..., :3]  # [H, W, 3]
    if image is None:
        return colour
    return (1.0 - OVERLAY_ALPHA) * (image / 255.0) + OVERLAY_ALPHA * colour


def _draw_panel_grid(ax: Axes, panels: List[List[np.ndarray]], row_labels: List[str], col_labels: List[str],
                     fontsize: int = 9) -> None:
    """Draws rows of equal-sized RGB panels as one image, a thin white gap between panels, labelled on top and left."""
    rows, cols = len(panels), len(panels[0])
    h, w = panels[0][0].shape[:2]
    gap = panel_gap(h)
    canvas = np.ones((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), dtype=np.float32)
    for r, row in enumerate(panels):
        for c, pixels in enumerate(row):
            canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = pixels
    ax.imshow(canvas, interpolation='antialiased')
    ax.set_xticks([c * (w + gap) + (w - 1) / 2 for c in range(cols)], col_labels, fontsize=fontsize + 1)
    ax.set_yticks([r * (h + gap) + (h - 1) / 2 for r in range(rows)], row_labels, fontsize=fontsize)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def panel_gap(panel_height: int) -> int:
    """White pixels between the panels of a grid picture."""
    return max(1, panel_height // 16)


def attention_colour_stops(num_stops: int = 16) -> List[List[int]]:
    """`ATTENTION_CMAP` as ``num_stops`` RGB stops (0..255) from 0 to 1, for pages that draw maps themselves."""
    import matplotlib
    cmap = matplotlib.colormaps[ATTENTION_CMAP]
    return [[round(255 * c) for c in cmap(i / (num_stops - 1))[:3]] for i in range(num_stops)]


def save_figure(fig: Figure, path: Union[str, Path], dpi: int = DEFAULT_DPI) -> Path:
    """Writes ``fig`` as a PNG, whole or not at all (temporary file, then ``os.replace``).

    Args:
        fig: the figure.
        path: destination ``.png``; missing parent folders are created.
        dpi: resolution.

    Returns:
        The path written.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=dpi, bbox_inches='tight')
    _logger.debug('wrote %s', path)
    return path


def figure_pixels(fig: Figure, dpi: int = DEFAULT_DPI) -> np.ndarray:
    """A figure rendered to ``[H, W, 3]`` uint8 RGB (for a web page that shows pictures, e.g. the app)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def upscaled(pixels: np.ndarray, size: int) -> np.ndarray:
    """An RGB picture in ``[0, 1]`` (e.g. a `panel`) enlarged to about ``size`` pixels wide, each pixel a block (no blur),
    as uint8."""
    factor = max(1, size // pixels.shape[1])
    return (np.kron(pixels, np.ones((factor, factor, 1))) * 255).round().clip(0, 255).astype(np.uint8)


def layer_grid(
        images: ArrayLike,
        cls_maps: ArrayLike,
        rollout: ArrayLike,
        layout: TokenLayout,
        row_titles: List[str],
) -> Figure:
    """One row per example image: the image, the CLS map of every layer, and the rollout.

    Args:
        images: ``[E, H, W, 3]`` uint8 model-input crops.
        cls_maps: ``[E, L, P]`` CLS-to-patch attention per layer, averaged over heads.
        rollout: ``[E, P]`` CLS row of attention rollout (patches only).
        layout: token layout of the model.
        row_titles: ``E`` labels, e.g. ``"true: daisy / pred: daisy ✓"``.

    Returns:
        Figure of one picture: ``E`` rows of ``L + 2`` panels ("image", "L1".."LL", "rollout"), the
        column names on top, the row titles on the left.
    """
    images = _as_numpy(images)
    cls_maps = _as_numpy(cls_maps)
    rollout = _as_numpy(rollout)
    if images.ndim != 4 or len(images) == 0:
        raise UserError(f'expected example images [E, H, W, 3] with E > 0, got shape {images.shape}')
    num_examples, num_layers = cls_maps.shape[:2]
    if not (len(images) == num_examples == len(rollout) == len(row_titles)):
        raise UserError(
            f'got {len(images)} images, {num_examples} CLS maps, {len(rollout)} rollout maps and '
            f'{len(row_titles)} row titles; pass one of each per example.')
    ncols = num_layers + 2
    panels = []
    for e in range(num_examples):
        image = images[e]
        _check_image(image, layout)
        panels.append([image / 255.0] + [panel(image, cls_maps[e, layer], layout) for layer in range(num_layers)]
                      + [panel(image, rollout[e], layout)])
    fig = Figure(figsize=(1.15 * ncols, 1.1 * num_examples + 0.6), layout='constrained')
    col_titles = ['image'] + [f'L{i + 1}' for i in range(num_layers)] + ['rollout']
    _draw_panel_grid(fig.subplots(), panels, list(row_titles), col_titles)
    title = 'CLS-to-patch attention per layer (mean over heads) and rollout; each map scaled to its own maximum'
    fig.suptitle(textwrap.fill(title, width=max(40, int(11 * 1.15 * ncols))), fontsize=12)  # fits a grid of few layers
    return fig


def head_maps(image: ArrayLike, cls_attention_layer: ArrayLike, layout: TokenLayout, layer: int) -> Figure:
    """The CLS map of every head of one layer, plus their mean, over one image.

    Args:
        image: ``[H, W, 3]`` uint8 model-input crop.
        cls_attention_layer: ``[num_heads, P]`` CLS-to-patch attention of each head.
        layout: token layout of the model.
        layer: 1-based layer number, for the title.

    Returns:
        Figure with panels "image", "head 1".."head H", "mean".
    """
    image = _as_numpy(image)
    _check_image(image, layout)
    per_head = _as_numpy(cls_attention_layer)  # [H, P]
    num_heads = per_head.shape[0]
    num_panels = num_heads + 2
    ncols = min(num_panels, 7)
    nrows = -(-num_panels // ncols)
    fig = Figure(figsize=(1.6 * ncols, 1.75 * nrows + 0.5), layout='constrained')
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    axes[0].imshow(image)
    axes[0].set_title('image', fontsize=9)
    for h in range(num_heads):
        _overlay(axes[h + 1], image, per_head[h], layout)
        axes[h + 1].set_title(f'head {h + 1}', fontsize=9)
    _overlay(axes[num_heads + 1], image, per_head.mean(axis=0), layout)
    axes[num_heads + 1].set_title('mean', fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[num_panels:]:
        ax.set_axis_off()
    fig.suptitle(f'Layer {layer}: CLS-to-patch attention of each head; '
                 'each map scaled to its own maximum', fontsize=10)
    return fig


def class_mean_maps(class_maps: ArrayLike, class_names: List[str], layout: TokenLayout) -> Figure:
    """Mean CLS map of each class (rows) at each layer (columns).

    Args:
        class_maps: ``[C, L, P]`` head-averaged CLS-to-patch attention, averaged over the images
            of each class.
        class_names: ``C`` row labels.
        layout: token layout of the model.

    Returns:
        Figure of one picture: ``C`` rows (classes, named on the left) of ``L`` attention maps (layers, named
        on top), no image underneath.
    """
    class_maps = _as_numpy(class_maps)
    num_classes, num_layers = class_maps.shape[:2]
    if num_classes != len(class_names) or num_classes == 0:
        raise UserError(f'got {num_classes} class maps and {len(class_names)} class names; '
                         'pass one name per map (and at least one).')
    gh, gw = layout.grid_size
    cell = 1.0 * max(gw / gh, 1.0)
    fig = Figure(figsize=(cell * num_layers + 1.2, 1.0 * num_classes + 0.7), layout='constrained')
    panels = [[panel(None, class_maps[c, layer], layout) for layer in range(num_layers)] for c in range(num_classes)]
    _draw_panel_grid(fig.subplots(), panels, list(class_names), [f'L{layer + 1}' for layer in range(num_layers)])
    fig.suptitle('Mean CLS attention per class and layer; each map scaled to its own maximum', fontsize=10)
    return fig


def _plot_depth_metric(ax: Axes, name: str, metric: Mapping, num_layers: int) -> None:
    """Thin line per head, thick line for the head-averaged map, x = layer 1..L."""
    x = np.arange(1, num_layers + 1)
    per_head = _as_numpy(metric['per_head'])  # [L, H]
    mean = _as_numpy(metric['mean'])  # [L]
    if per_head.shape[0] != num_layers or mean.shape[0] != num_layers:
        raise UserError(f'metric {name!r} has {mean.shape[0]} layers (per_head: {per_head.shape[0]}), '
                         f'expected {num_layers}.')
    for h in range(per_head.shape[1]):
        ax.plot(x, per_head[:, h], color='tab:blue', alpha=0.35, linewidth=0.8,
                label='single head' if h == 0 else None)
    ax.plot(x, mean, color='black', linewidth=2.5, marker='o', markersize=3, label='head-mean map')
    ax.set_title(DEPTH_METRIC_LABELS.get(name, name), fontsize=9)
    ax.set_xlabel('layer')
    ax.set_xticks(x)


def depth_curves(metrics: Mapping) -> Figure:
    """Attention metrics over depth, one subplot per metric (schema of ``attention_metrics.json``).

    Draws fg_lift (dashed line at 1.0, "no preference"), pointing game (dashed chance level = the
    flower's share of the image), entropy and mean attention distance, each that is present.
    Metrics that are absent (no masks, no full attention maps) are named under the plots with the
    reason from ``metrics["omitted"]``.

    Args:
        metrics: the parsed ``attention_metrics.json``.

    Returns:
        The figure.
    """
    layers = metrics['layers']
    num_layers = int(metrics['num_layers'])
    names = [n for n in DEPTH_METRIC_LABELS if n in layers]
    if not names:
        raise UserError(f'attention_metrics.json has none of the layer metrics {list(DEPTH_METRIC_LABELS)}; '
                         're-run the attention analysis.')
    omitted = metrics.get('omitted', {})
    missing = [n for n in DEPTH_METRIC_LABELS if n not in layers]
    ncols = min(len(names), 2)
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.2 * nrows + (0.5 if missing else 0.0)), layout='constrained')
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        _plot_depth_metric(ax, name, layers[name], num_layers)
        if name == 'fg_lift':
            ax.axhline(1.0, color='tab:red', linestyle='--', linewidth=1, label='no preference (1.0)')
        elif name == 'pointing_game':
            if 'flower_area' not in metrics:
                raise UserError('attention_metrics.json has a pointing game but no flower_area (its chance '
                                 'level); re-run the attention analysis.')
            chance = float(metrics['flower_area'])
            ax.axhline(chance, color='tab:red', linestyle='--', linewidth=1, label=f'chance ({chance:.0%})')
            ax.set_ylim(0.0, 1.0)
        elif name == 'entropy':
            ax.set_ylim(0.0, 1.05)
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    if missing:
        lines = [f'{n} omitted: {omitted.get(n, "not in attention_metrics.json")}' for n in missing]
        fig.text(0.5, -0.01, '\n'.join(lines), ha='center', va='top', fontsize=8)
    fig.suptitle(f'CLS attention over depth ({int(metrics["num_images"])} images)', fontsize=10)
    return fig


def confusion_matrix_figure(cm: ArrayLike, class_names: List[str]) -> Figure:
    """Confusion matrix (rows = true class, columns = predicted class).

    Args:
        cm: ``[C, C]`` integer counts.
        class_names: ``C`` names in the order of the rows.

    Returns:
        The figure; cell values are written when there are at most 20 classes.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = _as_numpy(cm)
    num_classes = len(class_names)
    if cm.shape != (num_classes, num_classes):
        raise UserError(f'confusion matrix is {cm.shape} but there are {num_classes} class names.')
    side = max(4.0, 0.32 * num_classes + 2.0)
    fig = Figure(figsize=(side + 1.0, side), layout='constrained')
    ax = fig.subplots()
    ConfusionMatrixDisplay(cm, display_labels=class_names).plot(
        ax=ax, cmap='Blues', xticks_rotation='vertical', colorbar=True,
        include_values=num_classes <= MAX_CLASSES_WITH_CELL_VALUES)
    if num_classes > MAX_CLASSES_WITH_CELL_VALUES:
        ax.tick_params(labelsize=6)
    ax.set_title('Confusion matrix (rows: true, columns: predicted)', fontsize=10)
    return fig


def f1_bars(f1_per_class: Mapping[str, float], worst_first: bool = False) -> Figure:
    """Horizontal bars of the F1 score of each class, best at the top (worst at the top with ``worst_first``).

    Args:
        f1_per_class: ``{class name: f1}``.
        worst_first: put the worst classes at the top, where a long figure is read first.

    Returns:
        The figure.
    """
    if not f1_per_class:
        raise UserError('f1_per_class is empty; nothing to draw.')
    items = sorted(f1_per_class.items(), key=lambda kv: kv[1])  # worst first = bottom bar
    if worst_first:
        items = items[::-1]  # the bars are drawn bottom up: the worst class ends on top
    names = [k for k, _ in items]
    values = np.array([float(v) for _, v in items])
    fig = Figure(figsize=(6.0, 0.28 * len(items) + 1.2), layout='constrained')
    ax = fig.subplots()
    y = np.arange(len(items))
    ax.barh(y, values, color='tab:green')
    ax.set_yticks(y, names, fontsize=8 if len(items) <= 30 else 6)
    for yi, v in zip(y, values):
        ax.text(min(v + 0.01, 1.0), yi, f'{v:.2f}', va='center', fontsize=7)
    ax.set_xlim(0.0, 1.08)
    if worst_first:
        ax.set_ylim(-0.6, len(items) - 0.4)  # no default 5% margin: that is several empty rows at many classes
    ax.set_xlabel('F1')
    ax.set_title(f'F1 per class ({len(items)} classes, worst at the top)' if worst_first else 'F1 per class',
                 fontsize=10)
    return fig


def background_figure(background: Mapping) -> Figure:
    """Accuracy per background variant (and fg_lift over depth per variant when present).

    Args:
        background: ``{"variants": {name: {"accuracy": f, "macro_f1": f, "fg_lift": [L]}},
            "bg_gap": f}``; ``macro_f1``, ``fg_lift`` and ``bg_gap`` are optional.

    Returns:
        The figure.
    """
    variants = background.get('variants') or {}
    if not variants:
        raise UserError('background.json has no "variants"; nothing to draw. Re-run the background study.')
    names = list(variants)
    with_lift = [n for n in names if variants[n].get('fg_lift') is not None]
    fig = Figure(figsize=(5.5 + (4.5 if with_lift else 0.0), 3.6), layout='constrained')
    axes = fig.subplots(1, 2 if with_lift else 1, squeeze=False).ravel()
    ax = axes[0]
    x = np.arange(len(names))
    has_f1 = all('macro_f1' in variants[n] for n in names)
    width = 0.4 if has_f1 else 0.6
    acc = [float(variants[n]['accuracy']) for n in names]
    bars = ax.bar(x - (width / 2 if has_f1 else 0.0), acc, width, label='accuracy', color='tab:blue')
    ax.bar_label(bars, fmt='%.2f', fontsize=7)
    if has_f1:
        f1 = [float(variants[n]['macro_f1']) for n in names]
        bars = ax.bar(x + width / 2, f1, width, label='macro F1', color='tab:orange')
        ax.bar_label(bars, fmt='%.2f', fontsize=7)
    ax.set_xticks(x, names, rotation=30, ha='right', fontsize=8)
    ax.set_ylim(0.0, 1.25)  # room above the bars for the legend
    ax.legend(fontsize=7, loc='upper center', ncol=2)
    title = 'Accuracy per background variant'
    if 'bg_gap' in background:
        title += f' (bg_gap {float(background["bg_gap"]):.2f})'
    ax.set_title(title, fontsize=10)
    if with_lift:
        ax = axes[1]
        for n in with_lift:
            lift = _as_numpy(variants[n]['fg_lift'])
            ax.plot(np.arange(1, len(lift) + 1), lift, marker='o', markersize=3, label=n)
        ax.axhline(1.0, color='tab:red', linestyle='--', linewidth=1, label='no preference')
        ax.set_xlabel('layer')
        ax.set_title('fg_lift over depth per variant', fontsize=10)
        ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.0, 0.5))
    return fig


FAITHFULNESS_STYLES = {  # the non-layer maps; layers are drawn thin, coloured by depth
    'rollout': dict(color='black', linestyle='--', linewidth=1.8),
    'gradient_rollout': dict(color='tab:red', linestyle='-', linewidth=2.0),
    'random': dict(color='tab:gray', linestyle=':', linewidth=1.8),
    'centre': dict(color='tab:brown', linestyle=':', linewidth=1.5),
    'mask': dict(color='tab:green', linestyle='-.', linewidth=1.8),
}


def faithfulness_figure(faithfulness: Mapping) -> Figure:
    """Deletion and insertion curves of every map, and their AUCs.

    Args:
        faithfulness: the parsed ``faithfulness.json`` (`analysis.studies.faithfulness.faithfulness_study`):
            ``methods`` (per map ``deletion_curve``, ``insertion_curve``, ``deletion_auc``,
            ``insertion_auc`` with ``mean`` / ``se``), ``fractions``, ``num_images``, ``baseline``.

    Returns:
        The figure: mean deletion curves, mean insertion curves (layers coloured by depth), and the two
        AUCs per map with error bars of 2 standard errors.
    """
    import matplotlib

    from analysis.studies.faithfulness import method_kind, method_label
    methods = faithfulness.get('methods') or {}
    if not methods:
        raise UserError('faithfulness.json has no "methods"; nothing to draw. Re-run the faithfulness scores.')
    names = list(methods)
    layers = [n for n in names if method_kind(n) == 'layer']
    depth = matplotlib.colormaps['viridis']

    def style(name: str) -> dict:
        if method_kind(name) == 'layer':
            return dict(color=depth(layers.index(name) / max(1, len(layers) - 1)), linewidth=0.9, alpha=0.8)
        return FAITHFULNESS_STYLES.get(name, {})

    x = _as_numpy(faithfulness['fractions'])
    fig = Figure(figsize=(14.0, max(3.8, 0.24 * len(names) + 1.2)), layout='constrained')
    axes = fig.subplots(1, 3, width_ratios=[1.0, 1.0, 1.1])
    for ax, curve, xlabel, title in (
            (axes[0], 'deletion_curve', 'fraction of patches removed, most relevant first', 'Deletion (lower = more faithful)'),
            (axes[1], 'insertion_curve', 'fraction of patches shown, most relevant first', 'Insertion (higher = more faithful)')):
        for name in names:
            if methods[name].get(curve) is not None:
                ax.plot(x, _as_numpy(methods[name][curve]), label=method_label(name), **style(name))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel('probability of the predicted class', fontsize=8)
        ax.set_ylim(0.0, 1.02)
        ax.set_title(title, fontsize=10)
    shown = {method_label(n) for n in names if method_kind(n) != 'layer' or n in layers[:1] + layers[-1:]}
    axes[1].legend(handles=[h for h in axes[1].get_lines() if h.get_label() in shown], fontsize=7, loc='lower right')

    ax = axes[2]
    y = np.arange(len(names))
    for offset, key, colour, label in ((-0.2, 'deletion_auc', 'tab:orange', 'deletion AUC'),
                                       (0.2, 'insertion_auc', 'tab:blue', 'insertion AUC')):
        mean = np.array([methods[n][key]['mean'] for n in names], dtype=np.float32)
        se = np.array([methods[n][key].get('se') or 0.0 for n in names], dtype=np.float32)
        ax.barh(y + offset, mean, 0.4, xerr=2 * se, color=colour, label=label, capsize=1.5,
                error_kw=dict(linewidth=0.8))
    ax.set_yticks(y, [method_label(n) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel('AUC (error bars: 2 standard errors)', fontsize=8)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))  # outside: the bars reach the right side
    ax.set_title('AUC per map', fontsize=10)
    fig.suptitle(f'Which attention map explains the decision: {faithfulness.get("num_images", "?")} images, '
                 f'{faithfulness.get("steps", "?")} steps, removed patches = {faithfulness.get("baseline", "?")}',
                 fontsize=11)
    return fig


def _band_over_depth(ax: Axes, stats: Sequence[Mapping], label: str, **style) -> None:
    """Per layer ``{"mean", "se"}`` (1-based layers on x): the means, and a band of 2 SE around them."""
    depth = np.arange(1, len(stats) + 1)
    mean = np.array([s['mean'] for s in stats], dtype=float)
    se = np.array([s['se'] or 0.0 for s in stats], dtype=float)
    ax.plot(depth, mean, marker='o', markersize=3, label=label, **style)
    ax.fill_between(depth, mean - 2 * se, mean + 2 * se, alpha=0.2, color=style['color'])


def _draw_pruning(ax: Axes, pruning: Mapping, baseline: Optional[float]) -> None:
    """Accuracy against the number of heads removed by greedy pruning."""
    acc = _as_numpy(pruning['accuracy'])  # accuracy[i]: after removing the first i + 1 heads of the order
    ax.plot(np.arange(1, len(acc) + 1), acc, marker='.', color='tab:purple')
    if baseline is not None:
        ax.axhline(baseline - pruning.get('tolerance', 0.01), color='tab:red', linestyle='--', linewidth=1,
                   label='baseline - 1 point')
        ax.legend(fontsize=7)
    total = pruning.get('num_heads')
    ax.set_xlabel('heads removed' + (f' (of {int(total)})' if total is not None else ''))
    ax.set_ylabel('accuracy')
    ax.set_title('Greedy head pruning', fontsize=10)


def importance_figure(importance: Mapping) -> Figure:
    """Layer and head importance: every key present in ``importance`` gets a panel.

    Args:
        importance: ``{"probe_accuracy": [L], "layer_skip_accuracy": [L], "truncate_accuracy": [L],
            "head_ablation_accuracy": [[H]*L], "baseline_accuracy": f, "greedy_pruning":
            {"order": [[layer, head], ...], "accuracy": [...], "num_prunable": n, "num_heads": n}}``, all optional.

    Returns:
        The figure.
    """
    baseline = importance.get('baseline_accuracy')
    baseline = None if baseline is None else float(baseline)

    def baseline_line(ax: Axes) -> None:
        if baseline is not None:
            ax.axhline(baseline, color='black', linestyle='--', linewidth=1, label=f'full model ({baseline:.2f})')

    panels = []
    def line_panel(key: str, first_x: int, color: str, label: str, xlabel: str, title: str):
        def draw(ax: Axes) -> None:
            acc = _as_numpy(importance[key])
            ax.plot(np.arange(first_x, first_x + len(acc)), acc, marker='o', markersize=3, color=color, label=label)
            baseline_line(ax)
            ax.set_xlabel(xlabel)
            ax.set_ylabel('accuracy')
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7)
        return draw

    if importance.get('probe_accuracy') is not None:
        panels.append(line_panel('probe_accuracy', 1, 'tab:blue', 'linear probe on CLS', 'layer',
                                 'Linear probe per layer'))
    if importance.get('layer_skip_accuracy') is not None:
        def draw_skip(ax: Axes) -> None:
            acc = _as_numpy(importance['layer_skip_accuracy'])
            ax.bar(np.arange(1, len(acc) + 1), acc, color='tab:orange', label='layer skipped')
            baseline_line(ax)
            top = max(float(np.nanmax(acc)), baseline if baseline is not None else 0.0)
            ax.set_ylim(0.0, 1.2 * top)  # room for the legend above the bars
            ax.set_xlabel('skipped layer')
            ax.set_ylabel('accuracy')
            ax.set_title('Accuracy with one layer skipped', fontsize=10)
            ax.legend(fontsize=7, loc='upper center', ncol=2)
        panels.append(draw_skip)
    if importance.get('truncate_accuracy') is not None:
        panels.append(line_panel('truncate_accuracy', 0, 'tab:green', 'probe, truncated', 'last blocks removed',
                                 'Truncated model (probe)'))
    if importance.get('head_ablation_accuracy') is not None:
        def draw_heads(ax: Axes) -> None:
            acc = _as_numpy(importance['head_ablation_accuracy'])  # [L, H]
            values = (baseline - acc) if baseline is not None else acc
            im = ax.imshow(values, cmap='Reds' if baseline is not None else 'viridis', aspect='auto')
            ax.figure.colorbar(im, ax=ax)
            ax.set_xticks(np.arange(acc.shape[1]), np.arange(1, acc.shape[1] + 1), fontsize=7)
            ax.set_yticks(np.arange(acc.shape[0]), np.arange(1, acc.shape[0] + 1), fontsize=7)
            ax.set_xlabel('head')
            ax.set_ylabel('layer')
            ax.set_title('Accuracy drop when one head is ablated' if baseline is not None
                         else 'Accuracy with one head ablated', fontsize=10)
        panels.append(draw_heads)
    if importance.get('greedy_pruning') is not None:
        panels.append(lambda ax: _draw_pruning(ax, importance['greedy_pruning'], baseline))
    if not panels:
        raise UserError('importance.json has none of probe_accuracy, layer_skip_accuracy, truncate_accuracy, '
                         'head_ablation_accuracy, greedy_pruning; nothing to draw. Re-run the importance study.')
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout='constrained')
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, draw in zip(axes, panels):
        draw(ax)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    return fig


CHANGE_METRIC_LABELS = {
    'fg_lift': 'fg_lift (head-mean map)',
    'pointing_game': 'pointing game',
    'entropy': 'entropy / log P',
    'mean_attention_distance': 'mean attention distance (px)',
}


def attention_change_figure(change: Mapping) -> Figure:
    """What training changed, over depth: each metric at the start and at the end, and how far the maps moved.

    Args:
        change: the parsed ``attention_change.json`` (`analysis.maps.attention_change.attention_change`).

    Returns:
        The figure: one panel per metric (start dashed, end solid) and one of the per-image
        Jensen-Shannon divergence between start and end maps (mean, error bars: 2 standard errors).
    """
    names = [n for n in CHANGE_METRIC_LABELS if n in change.get('metrics', {})]
    num_layers = int(change['num_layers'])
    x = np.arange(1, num_layers + 1)
    fig = Figure(figsize=(3.4 * (len(names) + 1), 3.2), layout='constrained')
    axes = fig.subplots(1, len(names) + 1, squeeze=False)[0]
    for ax, name in zip(axes, names):
        values = change['metrics'][name]
        ax.plot(x, _as_numpy(values['start']), linestyle='--', marker='o', markersize=3, color='tab:gray',
                label='start')
        ax.plot(x, _as_numpy(values['end']), marker='o', markersize=3, color='tab:blue', label='after training')
        if name == 'fg_lift':
            ax.axhline(1.0, color='tab:red', linestyle=':', linewidth=1)
        ax.set_title(CHANGE_METRIC_LABELS[name], fontsize=10)
        ax.set_xlabel('layer')
        ax.legend(fontsize=7)
    js = change['js_divergence']
    axes[-1].bar(x, _as_numpy(js['mean']), yerr=2 * _as_numpy(js['se']), color='tab:purple', capsize=2)
    axes[-1].set_title('how far each image\'s map moved (JS divergence)', fontsize=10)
    axes[-1].set_xlabel('layer')
    axes[-1].set_ylim(0.0, max(0.05, 1.2 * float(np.max(_as_numpy(js['mean']) + 2 * _as_numpy(js['se'])))))
    fig.suptitle(f'Attention before and after training ({int(change["num_images"])} images)', fontsize=11)
    return fig


def compression_figure(compress: Mapping) -> Figure:
    """Accuracy against CPU speed-up of every depth the compression search walked, and per-class F1 of both models.

    Args:
        compress: the parsed ``compress.json`` (`analysis.compress.run.compress_run`): ``search`` (per depth
            walked: ``depth``, ``speedup``, ``val_accuracy``, ``within_tolerance``), ``validation``
            (``full_accuracy``, ``threshold``), ``blocks`` (``num_full``, ``num_kept``), ``throughput``
            (``speedup``) and ``test`` (``full`` / ``compressed``: ``accuracy``, ``f1_per_class``).

    Returns:
        The figure: validation accuracy after distillation against measured speed-up (the full model
        at 1x, the tolerance as a dashed line, the kept model starred, test accuracy as hollow
        markers), and the test F1 of every class for the full and the compressed model.
    """
    validation = compress.get('validation') or {}
    if validation.get('full_accuracy') is None:
        raise UserError('compress.json has no validation.full_accuracy; nothing to draw. Re-run the compression.')
    test = compress.get('test') or {}
    full_test, compressed_test = test.get('full') or {}, test.get('compressed') or {}
    with_f1 = bool(full_test.get('f1_per_class'))
    fig = Figure(figsize=(5.6 + (4.6 if with_f1 else 0.0), 3.8), layout='constrained')
    axes = fig.subplots(1, 2 if with_f1 else 1, squeeze=False)[0]

    ax = axes[0]
    num_full = int((compress.get('blocks') or {}).get('num_full', 0))
    ax.scatter([1.0], [float(validation['full_accuracy'])], color='black', zorder=3,
               label=f'full model ({num_full} blocks)')
    walked = [s for s in compress.get('search') or [] if s.get('speedup') is not None]
    for passed, colour, label in ((True, 'tab:green', 'within tolerance'), (False, 'tab:red', 'outside tolerance')):
        points = [s for s in walked if bool(s['within_tolerance']) == passed]
        if points:
            ax.scatter([s['speedup'] for s in points], [s['val_accuracy'] for s in points], color=colour, zorder=3,
                       label=f'{label} (validation)')
    for s in walked:
        label = f'{int(s["depth"])} block' + ('s' if int(s['depth']) > 1 else '')
        ax.annotate(label, (s['speedup'], s['val_accuracy']), textcoords='offset points', xytext=(4, 4), fontsize=7)
    shown = [float(validation['full_accuracy'])] + [float(s['val_accuracy']) for s in walked] + [
        float(v) for v in (full_test.get('accuracy'), compressed_test.get('accuracy')) if v is not None]
    low = max(0.0, min(shown) - 0.05)
    if validation.get('threshold') is not None and float(validation['threshold']) >= low:
        ax.axhline(float(validation['threshold']), color='tab:gray', linestyle='--', linewidth=1,
                   label=f'tolerance ({float(validation["threshold"]):.3f})')
    ax.set_ylim(low, min(1.0, max(shown)) + 0.03)
    speedup = (compress.get('throughput') or {}).get('speedup')
    kept = (compress.get('blocks') or {}).get('num_kept')
    if speedup is not None and compressed_test.get('accuracy') is not None:
        chosen = [s for s in walked if s['depth'] == kept]
        if chosen:
            ax.scatter([chosen[0]['speedup']], [chosen[0]['val_accuracy']], marker='*', s=220, color='gold',
                       edgecolor='black', zorder=4, label=f'kept: {kept} blocks')
        ax.scatter([1.0, float(speedup)], [float(full_test['accuracy']), float(compressed_test['accuracy'])],
                   facecolors='none', edgecolors='tab:blue', s=60, zorder=3, label='test accuracy (full, kept)')
    ax.set_xlabel('CPU inference speed-up over the full model (x, measured)')
    ax.set_ylabel('accuracy')
    ax.set_title('Accuracy against speed-up', fontsize=10)
    ax.legend(fontsize=7, loc='best')

    if with_f1:
        ax = axes[1]
        names = list(full_test['f1_per_class'])
        y = np.arange(len(names))
        ax.barh(y + 0.2, [float(full_test['f1_per_class'][n]) for n in names], 0.4, color='tab:gray',
                label='full model')
        if compressed_test.get('f1_per_class'):
            ax.barh(y - 0.2, [float(compressed_test['f1_per_class'][n]) for n in names], 0.4, color='tab:green',
                    label='compressed')
        ax.set_yticks(y, names, fontsize=8 if len(names) <= 30 else 6)
        ax.set_xlim(0.0, 1.05)
        ax.set_xlabel('F1 (test)')
        ax.set_title('F1 per class', fontsize=10)
        ax.legend(fontsize=7, loc='lower left')
    return fig


def sinks_figure(sinks: Mapping) -> Figure:
    """High-norm tokens over depth: the norm histogram of every layer, and the shares of the CLS attention.

    Args:
        sinks: the parsed ``sinks.json`` (`analysis.studies.sinks.sinks_study`): ``layers`` (per layer
            ``flagged_share``, ``sink_share``, optionally ``register_share``, ``fg_lift``, ``fg_lift_without``)
            and ``histogram`` (``edges``, per layer ``counts``: patch norm / the image's median).

    Returns:
        The figure: left, one histogram row per layer (norm ratio and share of tokens, both on log
        scales, the open-ended first and last bins drawn one bin wide); middle, over depth, the share of tokens flagged, the sink share and the register share;
        right (with masks), fg_lift with and without the flagged tokens.
    """
    layers = sinks.get('layers') or []
    if not layers:
        raise UserError('sinks.json has no "layers"; nothing to draw. Re-run python -m analysis sinks.')
    L = len(layers)
    has_lift = 'fg_lift' in layers[0]
    fig = Figure(figsize=(11.0, 3.2 + 0.12 * L), layout='constrained')
    axes = fig.subplots(1, 3 if has_lift else 2, width_ratios=[1.3, 1, 1][:3 if has_lift else 2])
    ax = axes[0]
    edges = np.log10(_as_numpy(sinks['histogram']['edges']))
    counts = _as_numpy(sinks['histogram']['counts'])  # [L, bins + 1]: under, bins, over
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # [L, bins + 1]
    x_edges = np.concatenate([[edges[0] - (edges[1] - edges[0])], edges, [edges[-1] + (edges[1] - edges[0])]])
    mesh = ax.pcolormesh(x_edges, np.arange(0.5, L + 1), np.where(share > 0, share, np.nan), cmap='viridis',
                         norm=matplotlib.colors.LogNorm(vmin=1e-4, vmax=1))
    fig.colorbar(mesh, ax=ax, location='top', label='share of the layer\'s patch tokens', shrink=0.8)
    ax.set_yticks(np.arange(1, L + 1), [str(i) for i in range(1, L + 1)], fontsize=7)
    ax.set_ylabel('layer')
    ticks = [-1, 0, 1]
    ax.set_xticks(ticks, [f'{10 ** t:g}x' for t in ticks])
    ax.set_xlabel('token norm / the image\'s median patch norm')
    ax.set_title('Token norms per layer', fontsize=10, loc='left')

    ax = axes[1]
    for key, label, style in (('flagged_share', 'tokens flagged (share)', dict(color='tab:gray', linestyle=':')),
                              ('sink_share', 'CLS attention on them (sink share)', dict(color='tab:red')),
                              ('register_share', 'CLS attention on registers', dict(color='tab:blue'))):
        if key in layers[0]:
            _band_over_depth(ax, [layer[key] for layer in layers], label, **style)
    ax.set_xlabel('layer')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_title('Shares over depth (bands: 2 SE over images)', fontsize=10)
    ax.legend(fontsize=7)
    if has_lift:
        ax = axes[2]
        for key, label, colour in (('fg_lift', 'all patches', 'tab:green'),
                                   ('fg_lift_without', 'without flagged tokens', 'tab:purple')):
            _band_over_depth(ax, [layer[key] for layer in layers], label, color=colour)
        ax.axhline(1.0, color='tab:red', linestyle='--', linewidth=1)
        ax.set_xlabel('layer')
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title('fg_lift with and without flagged tokens', fontsize=10)
        ax.legend(fontsize=7)
    return fig
