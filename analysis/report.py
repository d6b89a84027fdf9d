"""The self-contained HTML report of a training run and its attention analysis.

Reads what the other steps left in an output directory ``D``:

* ``D/all_results.json`` (required; from ``train_hf.py``),
* ``D/attention_metrics.json`` and ``D/attentions.safetensors`` (the attention analysis),
* ``D/background.json`` and ``D/importance.json`` (optional studies),

renders the standard figures into ``D/figures/`` (:func:`render_figures`; the model card links
them) and writes ``D/report.html`` with every figure embedded as a base64 PNG, inline CSS and
no external resource (:func:`write_report`). The sentences at the top of the report are
generated from the numbers (:func:`summary_sentences`). Every piece of text that comes from a
file is HTML-escaped.
"""
import base64
import html
import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from analysis import plots
from analysis.files import write_text
from analysis.summary import METRICS_FILE, SUMMARY_FILE, load_summary, read_summary_meta
from analysis.tokens import TokenLayout

_logger = logging.getLogger(__name__)

RESULTS_FILE = 'all_results.json'
BACKGROUND_FILE = 'background.json'
IMPORTANCE_FILE = 'importance.json'
REPORT_FILE = 'report.html'
FIGURES_DIR = 'figures'
# Commands shown in the report when a step was not run ({model} = the output directory).
ATTENTION_COMMAND = 'python -m analysis extract --model {model}'
BACKGROUND_COMMAND = 'python -m analysis background --model {model} --split test'
IMPORTANCE_COMMAND = 'python -m analysis importance --model {model}'
# |bg_gap| from which we say the model uses the background. Xiao et al. 2021 ("Noise or Signal")
# report BG-Gaps of roughly 0.1-0.2 for ImageNet models; 0.05 is well above the noise of a
# few hundred test images.
BG_GAP_THRESHOLD = 0.05
# "Class information appears" at the first layer whose probe reaches this share of the last one.
PROBE_SHARE = 0.9
# Pruning may cost at most this much accuracy (1 point).
PRUNING_TOLERANCE = 0.01
# The class-mean figure shows at most this many classes (rows); more would be unreadable.
MAX_CLASS_MAP_ROWS = 20
MASK_METRICS = ('fg_ratio', 'fg_lift', 'pointing_game')
LAYER_TABLE_METRICS = ('fg_ratio', 'fg_lift', 'pointing_game', 'entropy', 'mean_attention_distance')


# ----------------------------------------------------------------------------- reading inputs

def _read_json(path: Path) -> Dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON ({e}); re-create it or remove it.') from e


def _read_json_if_exists(path: Path) -> Optional[Dict]:
    return _read_json(path) if path.is_file() else None


def _read_results(output_dir: Path) -> Dict:
    path = output_dir / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist: train first (python train_hf.py --output_dir {output_dir} '
                                '...) or pass the output directory of a finished training run.')
    return _read_json(path)


def _defined(values: Sequence[Optional[float]]) -> List[Tuple[int, float]]:
    """``(0-based layer, value)`` for the layers whose value is defined (not None / NaN)."""
    return [(i, float(v)) for i, v in enumerate(values) if v is not None and not math.isnan(float(v))]


def _classification_sentences(all_results: Mapping) -> List[str]:
    if 'test_accuracy' not in all_results:
        return ['all_results.json holds no test_accuracy: the classification results are missing.']
    split = str(all_results.get('test_split', 'test'))
    text = f'{split.capitalize()} accuracy {100 * float(all_results["test_accuracy"]):.1f}%'
    if 'test_macro_f1' in all_results:
        text += f', macro F1 {float(all_results["test_macro_f1"]):.3f}'
    f1 = all_results.get('test_f1_per_class') or {}
    if f1:
        worst = min(f1, key=lambda k: f1[k])
        text += f'; lowest class F1: {worst} {float(f1[worst]):.2f}'
    return [text + '.']


def _attention_sentences(metrics: Mapping) -> List[str]:
    layers = metrics.get('layers', {})
    num_layers = int(metrics['num_layers'])
    sentences = []
    if 'fg_lift' in layers:
        lift = _defined(layers['fg_lift']['mean'])
        above = [i + 1 for i, v in lift if v > 1.0]
        if lift:
            best, best_value = max(lift, key=lambda iv: iv[1])
            listed = ', '.join(str(i) for i in above) if above else 'none'
            sentences.append(
                f'Layers with fg_lift > 1 (attend to the flower more than its area): {listed} (of {num_layers}); '
                f'highest: layer {best + 1} (fg_lift {best_value:.2f}).')
    if 'pointing_game' in layers:
        hits = _defined(layers['pointing_game']['mean'])
        if hits:
            best, best_value = max(hits, key=lambda iv: iv[1])
            chance = (f' (chance: {100 * float(metrics["flower_area"]):.0f}%)' if 'flower_area' in metrics else '')
            sentences.append(f'The most-attended patch lies on the flower in {100 * best_value:.0f}% of images '
                             f'at layer {best + 1}{chance}.')
    if 'mean_attention_distance' in layers:
        distance = layers['mean_attention_distance']['mean']
        first, last = float(distance[0]), float(distance[-1])
        low, high = min(map(float, distance)), max(map(float, distance))
        if high - low < 1.0:  # less than a pixel apart: no trend worth a verb
            sentences.append(f'Mean attention distance is about the same at every layer ({low:.1f}-{high:.1f} px).')
        else:
            verb = 'grows' if last > first else 'shrinks' if last < first else 'returns'
            sentences.append(f'Mean attention distance {verb} from {first:.1f} px (layer 1) to {last:.1f} px '
                             f'(layer {num_layers}); range {low:.1f}-{high:.1f} px.')
    if 'entropy' in layers:
        entropy = layers['entropy']['mean']
        sentences.append(f'CLS attention entropy (1 = uniform over patches) is {float(entropy[0]):.2f} at layer 1 '
                         f'and {float(entropy[-1]):.2f} at layer {num_layers}.')
    rollout = metrics.get('rollout') or {}
    if rollout.get('fg_lift') is not None:
        sentences.append(f'Attention rollout: fg_lift {float(rollout["fg_lift"]):.2f}'
                         + (f', pointing game {100 * float(rollout["pointing_game"]):.0f}%'
                            if rollout.get('pointing_game') is not None else '') + '.')
    if not metrics.get('has_masks', False):
        sentences.append(f'Flower-mask metrics are omitted: {_mask_omission_reason(metrics)}.')
    return sentences


def _mask_omission_reason(metrics: Mapping) -> str:
    omitted = metrics.get('omitted', {})
    reasons = sorted({str(omitted[m]) for m in MASK_METRICS if m in omitted})
    return '; '.join(reasons) if reasons else 'attention_metrics.json says the dataset has no masks'


def _background_sentences(background: Mapping) -> List[str]:
    sentences = []
    variants = background.get('variants') or {}
    if variants:
        sentences.append('Accuracy by background: ' + ', '.join(
            f'{name} {100 * float(v["accuracy"]):.1f}%' for name, v in variants.items() if 'accuracy' in v) + '.')
    if background.get('bg_gap') is not None:
        gap = float(background['bg_gap'])
        if gap >= BG_GAP_THRESHOLD:
            verdict = 'the model uses the background'
        elif gap <= -BG_GAP_THRESHOLD:
            verdict = 'random backgrounds help more than same-class ones, which is unexpected; check the study'
        else:
            verdict = 'the background has little effect on the predictions'
        sentences.append(f'bg_gap = acc(mixed_same) - acc(mixed_rand) = {gap:.2f}: {verdict} '
                         f'(|bg_gap| >= {BG_GAP_THRESHOLD:.2f} counts as using the background).')
    return sentences


def _importance_sentences(importance: Mapping) -> List[str]:
    sentences = []
    baseline = importance.get('baseline_accuracy')
    probe = importance.get('probe_accuracy')
    if probe:
        final = float(probe[-1])
        first = next(i for i, a in enumerate(probe) if float(a) >= PROBE_SHARE * final)
        sentences.append(
            f'Class information appears in the CLS token at layer {first + 1} (probe accuracy '
            f'{100 * float(probe[first]):.1f}% >= {PROBE_SHARE:.0%} of the final {100 * final:.1f}%).')
    skip = importance.get('layer_skip_accuracy')
    if skip and baseline is not None:
        worst = min(range(len(skip)), key=lambda i: float(skip[i]))
        sentences.append(f'Skipping layer {worst + 1} hurts most: accuracy {100 * float(skip[worst]):.1f}% '
                         f'instead of {100 * float(baseline):.1f}%.')
    heads = importance.get('head_ablation_accuracy')
    if heads and baseline is not None:
        layer, head = min(((l, h) for l in range(len(heads)) for h in range(len(heads[l]))),
                          key=lambda lh: float(heads[lh[0]][lh[1]]))
        drop = float(baseline) - float(heads[layer][head])
        sentences.append(f'Ablating a single head costs at most {100 * drop:.1f} points '
                         f'(layer {layer + 1}, head {head + 1}).')
    pruning = importance.get('greedy_pruning')
    if pruning and baseline is not None:
        num_ok = int(pruning['num_prunable'])
        total = pruning.get('num_heads')
        of = f' of {int(total)}' if total is not None else ''
        sentences.append(f'{num_ok}{of} heads can be pruned with < {100 * PRUNING_TOLERANCE:.0f} point '
                         'accuracy loss (greedy pruning).')
    return sentences


def summary_sentences(
        all_results: Mapping,
        metrics: Optional[Mapping] = None,
        background: Optional[Mapping] = None,
        importance: Optional[Mapping] = None,
) -> List[str]:
    """Plain sentences generated from the numbers, for the top of the report and the model card.

    Layer and head numbers in the text are 1-based.

    Args:
        all_results: parsed ``all_results.json``.
        metrics: parsed ``attention_metrics.json``, or None when the attention analysis was not run.
        background: parsed ``background.json``, or None.
        importance: parsed ``importance.json``, or None.

    Returns:
        The sentences, classification first.
    """
    sentences = _classification_sentences(all_results)
    if metrics is not None:
        sentences += _attention_sentences(metrics)
    if background is not None:
        sentences += _background_sentences(background)
    if importance is not None:
        sentences += _importance_sentences(importance)
    return sentences


# ----------------------------------------------------------------------------- figures

def best_fg_lift_layer(metrics: Optional[Mapping]) -> int:
    """1-based layer with the highest head-averaged fg_lift; 1 when there is no fg_lift."""
    lift = _defined(((metrics or {}).get('layers', {}).get('fg_lift') or {}).get('mean', []))
    if not lift:
        return 1
    return max(lift, key=lambda iv: iv[1])[0] + 1


def class_mean_cls_maps(cls_attention: torch.Tensor, labels: torch.Tensor,
                        num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Head-averaged CLS maps averaged over the images of each class.

    Args:
        cls_attention: ``[M, L, H, P]`` CLS-to-patch attention.
        labels: ``[M]`` class indices.
        num_classes: ``C``.

    Returns:
        ``(maps [C, L, P], counts [C])``; classes without images have all-zero maps and count 0.
    """
    maps = cls_attention.float().mean(dim=2)  # [M, L, P]
    labels = labels.long()
    sums = torch.zeros(num_classes, *maps.shape[1:]).index_add_(0, labels, maps)  # [C, L, P]
    counts = torch.bincount(labels, minlength=num_classes)  # [C]
    return sums / counts.clamp(min=1)[:, None, None], counts


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
        metrics = _read_json_if_exists(Path(summary_path).parent / METRICS_FILE)
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
        layer = best_fg_lift_layer(metrics)
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
    all_results = _read_results(output_dir)
    metrics = _read_json_if_exists(output_dir / METRICS_FILE)
    background = _read_json_if_exists(output_dir / BACKGROUND_FILE)
    importance = _read_json_if_exists(output_dir / IMPORTANCE_FILE)
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


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #555; margin-top: 0; }
.summary { background: #f4f8fb; border-left: 4px solid #3b7dd8; padding: 0.2em 1.2em 0.6em; }
.summary h2 { margin-top: 0.6em; border-bottom: none; }
.note { background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.5em 1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
code { background: #f2f2f2; padding: 0.1em 0.3em; border-radius: 3px; }
details { margin: 0.8em 0; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value, kind: str = 'float') -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 'n/a'
    if kind == 'percent':
        return f'{100 * float(value):.1f}%'
    if kind == 'int':
        return str(int(value))
    if kind == 'px':
        return f'{float(value):.1f}'
    return f'{float(value):.3f}'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; ``header`` is escaped here, cells must already be escaped."""
    head = ''.join(f'<th>{_esc(h)}</th>' for h in header)
    body = ''.join('<tr>' + ''.join(f'<td>{c}</td>' for c in row) + '</tr>' for row in rows)
    return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _figure(figures: Mapping[str, Path], name: str, caption: str, missing: str) -> str:
    if name not in figures:
        return f'<p class="note">{_esc(missing)}</p>'
    data = base64.b64encode(Path(figures[name]).read_bytes()).decode('ascii')
    return (f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{_esc(caption)}</figcaption></figure>')


def _classification_section(all_results: Mapping, figures: Mapping[str, Path]) -> str:
    parts = ['<section id="classification"><h2>Classification results</h2>']
    split = all_results.get('test_split', 'test')
    parts.append(_table(['split', 'accuracy', 'macro F1'], [[
        _esc(split), _fmt(all_results.get('test_accuracy'), 'percent'), _fmt(all_results.get('test_macro_f1'))]]))
    names = all_results.get('test_class_names') or list(all_results.get('test_f1_per_class', {}))
    per_class = [(all_results.get(f'test_{k}_per_class') or {}) for k in ('precision', 'recall', 'f1', 'support')]
    if names and any(per_class):
        rows = [[_esc(n)] + [_fmt(d.get(n), 'int' if k == 3 else 'float') for k, d in enumerate(per_class)]
                for n in names]
        parts.append(_table(['class', 'precision', 'recall', 'F1', 'support'], rows))
    parts.append(_figure(figures, 'confusion_matrix', 'Confusion matrix (rows: true class, columns: predicted).',
                         'No confusion matrix in all_results.json.'))
    parts.append(_figure(figures, 'f1_bars', 'F1 per class.', 'No per-class F1 in all_results.json.'))
    parts.append('</section>')
    return ''.join(parts)


def _layer_table(metrics: Mapping) -> str:
    layers = metrics['layers']
    names = [m for m in LAYER_TABLE_METRICS if m in layers]
    kinds = {'pointing_game': 'percent', 'mean_attention_distance': 'px'}
    header = ['layer'] + [m + (' (px)' if m == 'mean_attention_distance' else '') for m in names]
    rows = [[str(layer + 1)] + [_fmt(layers[m]['mean'][layer], kinds.get(m, 'float')) for m in names]
            for layer in range(int(metrics['num_layers']))]
    rollout = metrics.get('rollout')
    if rollout:
        rows.append(['rollout'] + [_fmt(rollout.get(m), kinds.get(m, 'float')) for m in names])
    return _table(header, rows)


def _per_class_table(metrics: Mapping) -> str:
    per_class = metrics.get('per_class') or {}
    if not per_class:
        return ''
    num_layers = int(metrics['num_layers'])
    rows = [[_esc(name), _fmt(v.get('num_images'), 'int')] + [_fmt(x) for x in v.get('fg_lift', [])]
            for name, v in per_class.items()]
    table = _table(['class', 'images'] + [f'L{i + 1}' for i in range(num_layers)], rows)
    return f'<details><summary>fg_lift per class and layer (head-mean map)</summary>{table}</details>'


def _attention_section(output_dir: Path, metrics: Optional[Mapping], meta: Optional[Mapping],
                       figures: Mapping[str, Path]) -> str:
    parts = ['<section id="attention"><h2>Attention</h2>']
    command = _esc(ATTENTION_COMMAND.format(model=output_dir))
    if metrics is None and meta is None:
        parts.append(f'<p class="note">The attention analysis was not run. Run it with <code>{command}</code>.</p>')
        parts.append('</section>')
        return ''.join(parts)
    if metrics is not None and not metrics.get('has_masks', False):
        parts.append('<p class="note">Flower-mask metrics (fg_ratio, fg_lift, pointing game, per class) are '
                     f'missing: {_esc(_mask_omission_reason(metrics))}.</p>')
    parts.append('<p>Maps show the CLS-to-patch attention averaged over heads, upsampled by the patch size; '
                 'each map is scaled to its own maximum, so compare where a map looks, not how bright it is '
                 'across panels.</p>')
    missing_summary = f'No attention summary ({SUMMARY_FILE}); run {ATTENTION_COMMAND.format(model=output_dir)}.'
    parts.append(_figure(figures, 'layer_grid',
                         'Example images (\u2713 correct, \u2717 wrong prediction): CLS attention of every layer and the '
                         'CLS row of attention rollout (Abnar & Zuidema 2020).',
                         missing_summary))
    if metrics is not None:
        parts.append('<h3>Metrics over depth</h3>')
        parts.append(_figure(figures, 'depth_curves', 'Thin lines: single heads; thick line: the head-mean map.',
                             'No depth curves.'))
        parts.append(_layer_table(metrics))
        parts.append(_per_class_table(metrics))
        for name, reason in (metrics.get('omitted') or {}).items():
            if name not in MASK_METRICS + ('flower_area', 'per_class'):
                parts.append(f'<p class="note">{_esc(name)} omitted: {_esc(reason)}.</p>')
    else:
        parts.append(f'<p class="note">{METRICS_FILE} not found; run <code>{command}</code>.</p>')
    layer = best_fg_lift_layer(metrics)
    parts.append(f'<h3>Heads of layer {layer}</h3>')
    why = ('the layer with the highest fg_lift' if metrics is not None and 'fg_lift' in metrics.get('layers', {})
           else 'no fg_lift to choose a layer by, so layer 1')
    parts.append(_figure(figures, 'head_maps', f'CLS attention of each head of layer {layer} on the first example '
                         f'({why}).', missing_summary))
    parts.append('<h3>Mean map per class</h3>')
    parts.append(_figure(figures, 'class_maps', f'Mean CLS attention over the images of each class (at most '
                         f'{MAX_CLASS_MAP_ROWS} classes shown).', missing_summary))
    parts.append('</section>')
    return ''.join(parts)


def _background_section(output_dir: Path, background: Optional[Mapping], figures: Mapping[str, Path]) -> str:
    parts = ['<section id="background"><h2>Background study</h2>']
    if background is None:
        parts.append('<p>The background study was not run. Run it with '
                     f'<code>{_esc(BACKGROUND_COMMAND.format(model=output_dir))}</code>.</p>')
    else:
        parts.append('<ul>' + ''.join(f'<li>{_esc(s)}</li>' for s in _background_sentences(background)) + '</ul>')
        variants = background.get('variants') or {}
        if variants:
            parts.append(_table(['variant', 'accuracy', 'macro F1'], [
                [_esc(n), _fmt(v.get('accuracy'), 'percent'), _fmt(v.get('macro_f1'))] for n, v in variants.items()]))
        parts.append(_figure(figures, 'background', 'Accuracy per background variant.', 'No background figure.'))
    parts.append('</section>')
    return ''.join(parts)


def _importance_section(output_dir: Path, importance: Optional[Mapping], figures: Mapping[str, Path]) -> str:
    parts = ['<section id="importance"><h2>Layer and head importance</h2>']
    if importance is None:
        parts.append('<p>The importance study was not run. Run it with '
                     f'<code>{_esc(IMPORTANCE_COMMAND.format(model=output_dir))}</code>.</p>')
    else:
        parts.append('<ul>' + ''.join(f'<li>{_esc(s)}</li>' for s in _importance_sentences(importance)) + '</ul>')
        parts.append(_figure(figures, 'importance', 'Layer and head importance.', 'No importance figure.'))
    parts.append('</section>')
    return ''.join(parts)


def write_report(
        output_dir: Union[str, Path],
        *,
        summary_path: Optional[Union[str, Path]] = None,
        figures_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Renders the figures and writes one self-contained ``D/report.html``.

    Args:
        output_dir: the training output directory ``D`` (must hold ``all_results.json``).
        summary_path: the attention summary; default ``D/attentions.safetensors`` when present.
        figures_dir: where the PNGs go; default ``D/figures``.

    Returns:
        Path of the report.

    Raises:
        FileNotFoundError: ``D/all_results.json`` (or an explicitly given summary) does not exist.
    """
    output_dir = Path(output_dir)
    all_results = _read_results(output_dir)
    metrics = _read_json_if_exists(output_dir / METRICS_FILE)
    background = _read_json_if_exists(output_dir / BACKGROUND_FILE)
    importance = _read_json_if_exists(output_dir / IMPORTANCE_FILE)
    figures = render_figures(output_dir, summary_path=summary_path, figures_dir=figures_dir)
    if summary_path is None and (output_dir / SUMMARY_FILE).is_file():
        summary_path = output_dir / SUMMARY_FILE
    meta = read_summary_meta(summary_path) if summary_path is not None else None

    model_id = (meta or {}).get('model_id', output_dir.name)
    facts = []
    if meta is not None:
        facts.append(f'dataset {_esc(meta.get("dataset", "?"))}, split {_esc(meta.get("split", "?"))}, '
                     f'{_esc(meta.get("num_images", "?"))} images analysed')
        facts.append(f'{_esc(meta.get("num_layers", "?"))} layers x {_esc(meta.get("num_heads", "?"))} heads')
    sentences = summary_sentences(all_results, metrics, background, importance)
    body = [
        f'<h1>Attention report: {_esc(model_id)}</h1>',
        f'<p class="meta">{"; ".join(facts)}</p>' if facts else '',
        '<section id="summary" class="summary"><h2>Summary</h2><ul>'
        + ''.join(f'<li>{_esc(s)}</li>' for s in sentences) + '</ul></section>',
        _classification_section(all_results, figures),
        _attention_section(output_dir, metrics, meta, figures),
        _background_section(output_dir, background, figures),
        _importance_section(output_dir, importance, figures),
    ]
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>Attention report: {_esc(model_id)}</title><style>{_CSS}</style></head>\n<body>\n'
            + '\n'.join(body) + '\n</body></html>\n')
    path = output_dir / REPORT_FILE
    write_text(path, page)
    _logger.info('wrote %s', path)
    return path
