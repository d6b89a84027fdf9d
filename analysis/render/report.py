"""The self-contained HTML report of a training run and its attention analysis.

Reads what the other steps left in an output directory ``D`` (see `analysis.core.run_files`): the
results, the attention metrics and summary, the optional studies. It renders the standard
figures into ``D/figures/`` (`analysis.render.figures`) and writes ``D/report.html`` from the Jinja
templates in ``analysis/render/templates/report*`` with every figure embedded as a base64 PNG, inline
CSS and no external resource. Jinja escapes every value; the sentences come from
`analysis.render.findings`, as the model card's do.
"""
import base64
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from analysis.core.resources import html_templates, template_text
from analysis.core.run_files import (
    BACKGROUND_FILE,
    CHANGE_FILE,
    COMPRESS_FILE,
    FAITHFULNESS_FILE,
    IMPORTANCE_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_CONFIG_FILE,
    SINKS_FILE,
    SUMMARY_FILE,
    read_optional_json,
    read_results,
)
from analysis.maps.attention_metrics import MASK_METRICS
from analysis.maps.summary import EXTRACT_COMMAND, read_summary_meta
from analysis.render.explorer import explorer_section
from analysis.render.figures import MAX_CLASS_MAP_ROWS, class_map_captions, head_map_layer
from analysis.render.findings import (
    background_sentences,
    change_sentences,
    change_table,
    compression_search_table,
    compression_sentences,
    compression_table,
    confused_pairs_sentence,
    confused_pairs_table,
    faithfulness_outcome_table,
    faithfulness_sentences,
    faithfulness_table,
    fmt,
    importance_sentences,
    mask_omission_reason,
    per_class_order,
    per_class_order_note,
    sink_sentences,
    sink_table,
    summary_sentences,
)
from analysis.render.stability import one_run_sentences
from data_scripts.files import write_text

_logger = logging.getLogger(__name__)

# Commands shown in the report when a step was not run ({model} = the output directory).
BACKGROUND_COMMAND = 'python -m analysis background --model {model} --split test'
IMPORTANCE_COMMAND = 'python -m analysis importance --model {model}'
COMPRESS_COMMAND = 'python -m analysis compress --model {model} --output_dir {model}_compressed'
SINKS_COMMAND = 'python -m analysis sinks --model {model} --split test'
FAITHFULNESS_COMMAND = 'python -m analysis faithfulness --model {model} --split test'
LAYER_TABLE_METRICS = ('fg_ratio', 'fg_lift', 'pointing_game', 'entropy', 'mean_attention_distance')
METRIC_KINDS = {'pointing_game': 'percent', 'mean_attention_distance': 'px'}


def figure_data_uris(figures: Mapping[str, Path]) -> Dict[str, str]:
    """``{figure name: data URI}`` of the rendered PNGs, so the page needs no other file."""
    return {name: 'data:image/png;base64,' + base64.b64encode(Path(path).read_bytes()).decode('ascii')
            for name, path in figures.items()}


def _classification(all_results: Mapping) -> Dict:
    names = all_results.get('test_class_names') or list(all_results.get('test_f1_per_class', {}))
    per_class = [(all_results.get(f'test_{k}_per_class') or {}) for k in ('precision', 'recall', 'f1', 'support')]
    rows = []
    if names and any(per_class):
        rows = [[n] + [fmt(d.get(n), 'int' if k == 3 else 'float') for k, d in enumerate(per_class)]
                for n in per_class_order(all_results)]
    confused = confused_pairs_table(all_results)
    return {'split': all_results.get('test_split', 'test'), 'accuracy': fmt(all_results.get('test_accuracy'), 'percent'),
            'macro_f1': fmt(all_results.get('test_macro_f1')), 'per_class_rows': rows,
            'per_class_note': per_class_order_note(all_results),
            'confused': {'header': confused[0], 'rows': confused[1], 'sentence': confused_pairs_sentence(all_results)}
            if confused else None}


def _layer_rows(metrics: Mapping) -> Dict:
    layers = metrics['layers']
    names = [m for m in LAYER_TABLE_METRICS if m in layers]
    rows = [[str(layer + 1)] + [fmt(layers[m]['mean'][layer], METRIC_KINDS.get(m, 'float')) for m in names]
            for layer in range(int(metrics['num_layers']))]
    rollout = metrics.get('rollout')
    if rollout:
        rows.append(['rollout'] + [fmt(rollout.get(m), METRIC_KINDS.get(m, 'float')) for m in names])
    header = ['layer'] + [m + (' (px)' if m == 'mean_attention_distance' else '') for m in names]
    return {'header': header, 'rows': rows}


def _per_class_lift(metrics: Mapping) -> Optional[Dict]:
    per_class = metrics.get('per_class') or {}
    if not per_class:
        return None
    num_layers = int(metrics['num_layers'])
    rows = [[name, fmt(v.get('num_images'), 'int')] + [fmt(x) for x in v.get('fg_lift', [])]
            for name, v in per_class.items()]
    return {'header': ['class', 'images'] + [f'L{i + 1}' for i in range(num_layers)], 'rows': rows}


def _attention(output_dir: Path, metrics: Optional[Mapping], meta: Optional[Mapping],
               summary_path: Optional[Path]) -> Dict:
    layer = head_map_layer(metrics)
    has_lift = metrics is not None and 'fg_lift' in metrics.get('layers', {})
    section = {
        'ran': metrics is not None or meta is not None,
        'command': EXTRACT_COMMAND.format(model=output_dir),
        'metrics_file': METRICS_FILE,
        'missing_summary': f'No attention summary ({SUMMARY_FILE}); run {EXTRACT_COMMAND.format(model=output_dir)}.',
        'head_layer': layer,
        'head_layer_why': 'the layer with the highest fg_lift' if has_lift else 'no fg_lift to choose a layer by, '
                                                                                 'so layer 1',
        'class_maps': class_map_captions(summary_path) if summary_path is not None else [],
        'class_map_rows': MAX_CLASS_MAP_ROWS,
        'mask_note': None, 'layer_table': None, 'per_class': None, 'other_omissions': [],
    }
    if metrics is not None:
        if not metrics.get('has_masks', False):
            section['mask_note'] = mask_omission_reason(metrics)
        section['layer_table'] = _layer_rows(metrics)
        section['per_class'] = _per_class_lift(metrics)
        section['other_omissions'] = [(name, reason) for name, reason in (metrics.get('omitted') or {}).items()
                                      if name not in MASK_METRICS + ('flower_area', 'per_class')]
    return section


def _background(output_dir: Path, background: Optional[Mapping]) -> Dict:
    if background is None:
        return {'ran': False, 'command': BACKGROUND_COMMAND.format(model=output_dir)}
    variants = background.get('variants') or {}
    return {'ran': True, 'sentences': background_sentences(background),
            'rows': [[n, fmt(v.get('accuracy'), 'percent'), fmt(v.get('macro_f1'))] for n, v in variants.items()]}


def _compression(output_dir: Path, compress: Optional[Mapping]) -> Dict:
    if compress is None:
        return {'ran': False, 'command': COMPRESS_COMMAND.format(model=output_dir)}
    search_header, search_rows = compression_search_table(compress)
    section = {'ran': True, 'compressed': compress.get('outcome') == 'compressed',
               'sentences': compression_sentences(compress), 'base': compress['base_model'],
               'search': {'header': search_header, 'rows': search_rows}, 'table': None}
    if section['compressed']:
        header, rows = compression_table(compress)
        section['table'] = {'header': header, 'rows': rows}
    return section


def _importance(output_dir: Path, importance: Optional[Mapping]) -> Dict:
    if importance is None:
        return {'ran': False, 'command': IMPORTANCE_COMMAND.format(model=output_dir)}
    return {'ran': True, 'sentences': importance_sentences(importance)}


def _change(change: Optional[Mapping]) -> Dict:
    if change is None:
        return {'ran': False, 'missing': f'no {CHANGE_FILE}; the training job writes it'}
    header, rows = change_table(change)
    return {'ran': True, 'num_images': change['num_images'], 'start': change.get('start_model') or 'the start',
            'sentences': change_sentences(change), 'table': {'header': header, 'rows': rows}}


def _faithfulness(output_dir: Path, faithfulness: Optional[Mapping], metrics: Optional[Mapping]) -> Dict:
    if faithfulness is None:
        return {'ran': False, 'command': FAITHFULNESS_COMMAND.format(model=output_dir)}
    header, rows = faithfulness_table(faithfulness)
    outcome = faithfulness_outcome_table(faithfulness)
    baseline = faithfulness.get('baseline', '?')
    if baseline == 'mean' and faithfulness.get('baseline_rgb'):
        baseline += ' (RGB ' + ', '.join(fmt(v, digits=2) for v in faithfulness['baseline_rgb']) + ')'
    return {'ran': True, 'sentences': faithfulness_sentences(faithfulness, metrics),
            'table': {'header': header, 'rows': rows},
            'outcome': {'header': outcome[0], 'rows': outcome[1]} if outcome else None,
            'facts': f'{faithfulness["num_images"]} {faithfulness.get("split", "")} images, {faithfulness["steps"]} steps '
                     f'of {faithfulness["num_patches"]} patches, removed patches show the {baseline} baseline',
            'omitted': list((faithfulness.get('omitted') or {}).values()),
            'command': FAITHFULNESS_COMMAND.format(model=output_dir)}


def _sinks(output_dir: Path, sinks: Optional[Mapping]) -> Dict:
    if sinks is None:
        return {'ran': False, 'command': SINKS_COMMAND.format(model=output_dir)}
    header, rows = sink_table(sinks)
    return {'ran': True, 'sentences': sink_sentences(sinks), 'table': {'header': header, 'rows': rows},
            'rule': sinks['rule']['statistic'] + f' (k = {sinks["rule"]["k"]:.2f}: {sinks["rule"]["why"]})',
            'num_images': sinks['num_images'], 'command': SINKS_COMMAND.format(model=output_dir)}


def _facts(meta: Optional[Mapping]) -> List[str]:
    if meta is None:
        return []
    return [f'dataset {meta.get("dataset", "?")}, split {meta.get("split", "?")}, '
            f'{meta.get("num_images", "?")} images analysed',
            f'{meta.get("num_layers", "?")} layers x {meta.get("num_heads", "?")} heads']


def write_report(
        output_dir: Union[str, Path],
        figures: Dict[str, Path],
        *,
        summary_path: Optional[Union[str, Path]] = None,
) -> Path:
    """Writes one self-contained ``D/report.html`` with the figures embedded.

    Args:
        output_dir: the training output directory ``D`` (must hold ``all_results.json``).
        figures: the PNGs to embed, by name, as `analysis.render.figures.render_figures` returns them
            (the step before this one).
        summary_path: the attention summary; default ``D/attentions.safetensors`` when present.

    Returns:
        Path of the report.

    Raises:
        MissingFileError: ``D/all_results.json`` (or an explicitly given summary) does not exist.
    """
    output_dir = Path(output_dir)
    all_results = read_results(output_dir)
    metrics = read_optional_json(output_dir / METRICS_FILE)
    background = read_optional_json(output_dir / BACKGROUND_FILE)
    importance = read_optional_json(output_dir / IMPORTANCE_FILE)
    faithfulness = read_optional_json(output_dir / FAITHFULNESS_FILE)
    compress = read_optional_json(output_dir / COMPRESS_FILE)
    if summary_path is None and (output_dir / SUMMARY_FILE).is_file():
        summary_path = output_dir / SUMMARY_FILE
    meta = read_summary_meta(summary_path) if summary_path is not None else None

    page = html_templates().get_template('report/page.html.j2').render(
        model_id=(meta or {}).get('model_id', output_dir.name),
        facts=_facts(meta),
        css=template_text('report/style.css'),
        sentences=summary_sentences(all_results, metrics, background, importance, faithfulness=faithfulness)
        + (compression_sentences(compress)[:1] if compress is not None else []),
        figures=figure_data_uris(figures),
        classification=_classification(all_results),
        attention=_attention(output_dir, metrics, meta, summary_path),
        explorer=explorer_section(summary_path, str(output_dir)),
        background=_background(output_dir, background),
        importance=_importance(output_dir, importance),
        compression=_compression(output_dir, compress),
        faithfulness=_faithfulness(output_dir, faithfulness, metrics),
        sinks=_sinks(output_dir, read_optional_json(output_dir / SINKS_FILE)),
        change=_change(read_optional_json(output_dir / CHANGE_FILE)),
        stability=one_run_sentences(output_dir, ((read_optional_json(output_dir / RUN_CONFIG_FILE) or {})
                                                 .get('training') or {}).get('seed')),
    )
    path = output_dir / REPORT_FILE
    write_text(path, page)
    _logger.info('wrote %s', path)
    return path
