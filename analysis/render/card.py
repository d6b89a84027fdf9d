"""The model card: renders ``model_card.md`` (a Jinja template) into ``D/README.md`` for one run.

Everything on the card comes from the files of the training run in the output directory ``D``
(see the output-directory format): ``all_results.json`` and ``run_config.json`` are required;
``config.json``, ``data_report.json``, ``attention_metrics.json``, ``background.json`` and the
PNGs under ``figures/`` are used when they exist, and the card says so when they do not.

Text from those files (class names, dataset and model names) is Markdown-escaped before it goes
into the template, figures are linked with relative paths and only when the file exists, and no
Hub token is ever read here.
"""
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from analysis.core.resources import template_text
from analysis.core.run_files import (
    BACKGROUND_FILE,
    CARD_FILE,
    CHANGE_FILE,
    COMPRESS_FILE,
    CONFIG_FILE,
    DATA_REPORT_FILE,
    FAITHFULNESS_FILE,
    FIGURES_DIR,
    METRICS_FILE,
    RESULTS_FILE,
    RUN_CONFIG_FILE,
    SINKS_FILE,
    read_json,
    read_optional_json,
)
from analysis.render.findings import (
    VARIANT_DESCRIPTIONS,
    attention_sentences,
    background_limitation,
    background_sentences,
    change_sentences,
    change_table,
    compression_search_table,
    compression_sentences,
    compression_table,
    compression_tradeoff,
    confused_pairs_sentence,
    confused_pairs_table,
    faithfulness_sentences,
    faithfulness_table,
    fmt,
    per_class_order,
    per_class_order_note,
    sink_sentences,
    sink_table,
)
from analysis.render.stability import one_run_sentences
from data_scripts.errors import MissingFileError, UserError
from data_scripts.files import write_text

logger = logging.getLogger(__name__)

TEMPLATE_NAME = 'model_card.md'  # packaged: analysis/render/templates/ (the top-level model_card.md)
REPO_ID_PLACEHOLDER = '<user>/<model>'
BASE_TAGS = ['image-classification', 'timm', 'vision-transformer', 'attention-analysis', 'flowers']
CLASSIFICATION_FIGURES = [
    ('confusion_matrix.png', 'Confusion matrix (rows: true class, columns: predicted class)'),
    ('f1_bars.png', 'F1 per class'),
]
ATTENTION_FIGURES = [
    ('layer_grid.png', 'CLS attention of every layer and attention rollout on example images'),
    ('depth_curves.png', 'Attention metrics over depth, per head and head mean'),
    ('class_maps.png', 'Mean CLS attention per class'),
    ('importance.png', 'Layer and head importance'),
]
CHANGE_FIGURES = [
    ('attention_change.png', 'Attention metrics over depth before and after training'),
    ('layer_grid_change.png', 'CLS attention of every layer before and after training, on example images'),
]
BACKGROUND_FIGURES = [('background.png', 'Accuracy on background-study variants')]
COMPRESSION_FIGURES = [('compression.png', 'Accuracy against CPU speed-up of every depth tried, and F1 per class')]
SINKS_FIGURES = [('sinks.png', 'Token norms per layer, the sink and register shares over depth, fg_lift without the '
                                'flagged tokens')]
FAITHFULNESS_FIGURES = [('faithfulness.png', 'Deletion and insertion curves of every attention map, and their AUCs')]


def md_escape(text: Any) -> str:
    """Makes text from a file safe to put into Markdown prose or a table cell.

    Escapes Markdown syntax (``\\ ` * [ ] |``), turns HTML into entities and newlines into
    spaces, so a class name like ``a|b`` or ``<script>`` shows as written and cannot break a table.
    Underscores are left alone: names like ``pink_primrose`` are common, and CommonMark does not
    emphasise underscores inside a word.

    Args:
        text: any value; it is converted with ``str`` first.

    Returns:
        The escaped one-line string.
    """
    text = str(text)
    text = text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
    text = re.sub(r'([\\`*\[\]|])', r'\\\1', text)
    return re.sub(r'[\r\n]+', ' ', text)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; cells must already be escaped."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def _figure_links(output_dir: Path, figures: Sequence[Tuple[str, str]]) -> List[str]:
    """Markdown images for the figures that exist under ``output_dir/figures`` (relative links)."""
    return [f'![{alt}]({FIGURES_DIR}/{name})' for name, alt in figures
            if (output_dir / FIGURES_DIR / name).is_file()]


def _class_map_figures(output_dir: Path) -> List[Tuple[str, str]]:
    """The ``figures/class_maps_{k}.png`` pages after ``class_maps.png`` (many classes), in page order."""
    pages = [(int(m.group(1)), p.name) for p in (output_dir / FIGURES_DIR).glob('class_maps_*.png')
             if (m := re.fullmatch(r'class_maps_(\d+)\.png', p.name))]
    return [(name, f'Mean CLS attention per class, page {k}') for k, name in sorted(pages)]


def _head_map_figures(output_dir: Path) -> List[Tuple[str, str]]:
    """The ``figures/head_maps_layer{l}.png`` files, in layer order."""
    found = []
    for path in (output_dir / FIGURES_DIR).glob('head_maps_layer*.png'):
        match = re.fullmatch(r'head_maps_layer(\d+)\.png', path.name)
        if match:
            found.append((int(match.group(1)), path.name))
    return [(name, f'CLS attention of every head of layer {layer}') for layer, name in sorted(found)]


def hub_dataset_id(data_config: Dict[str, Any]) -> Optional[str]:
    """The Hub dataset id a run trained on, or None when it used a built-in or local dataset.

    ``dataset_name`` is a Hub id unless it is one of the built-in datasets ("synthetic",
    "oxford102"), the run used image folders (``train_dir``), or it names a local path (starts
    with ``.``, ``/`` or ``~``, or exists on this machine).

    Args:
        data_config: the "data" section of run_config.json (DataArguments fields).

    Returns:
        The dataset id, or None.
    """
    name = data_config.get('dataset_name')
    if not name or data_config.get('train_dir') or name in ('synthetic', 'synthetic_shapes', 'oxford102'):
        return None
    if name.startswith(('.', '/', '~')) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _dataset_names(data_config: Dict[str, Any]) -> Tuple[str, str, str]:
    """(dataset_type for model-index, human name for model-index, Markdown description)."""
    hub_id = hub_dataset_id(data_config)
    name = str(data_config.get('dataset_name') or '')
    if data_config.get('train_dir'):
        folder = Path(str(data_config['train_dir'])).name
        return 'imagefolder', f'image folders ({folder})', f'image folders ({md_escape(folder)})'
    if name == 'synthetic':
        description = 'procedurally generated synthetic flowers with exact flower masks'
        if data_config.get('synthetic_background'):
            description += f', background mode "{md_escape(data_config["synthetic_background"])}"'
        return 'synthetic-flowers', 'Synthetic flowers (procedural)', description
    if name == 'synthetic_shapes':
        return ('synthetic-shapes', 'Synthetic shapes (procedural)',
                'procedurally generated shapes and textures with exact object masks, no flowers (the pretraining '
                'set of the demo\'s base model)')
    if name == 'oxford102':
        return ('oxford-flowers-102', 'Oxford Flowers-102',
                'Oxford Flowers-102, Nilsback & Zisserman 2008, official splits')
    if hub_id is not None:
        return hub_id, hub_id, f'the Hub dataset [{md_escape(hub_id)}](https://huggingface.co/datasets/{hub_id})'
    folder = Path(name).name or name
    return 'local-dataset', folder, f'a local dataset folder ({md_escape(folder)})'


def _data_limitation(data_config: Dict[str, Any], dataset_description: str) -> str:
    name = data_config.get('dataset_name')
    if not data_config.get('train_dir') and name == 'synthetic':
        return ('It was trained on procedurally generated synthetic flowers: it is a demonstration '
                'model and is not expected to recognise photographs of real flowers.')
    if not data_config.get('train_dir') and name == 'synthetic_shapes':
        return ('It was trained on procedurally generated shapes and textures, as a backbone to fine-tune on the '
                'synthetic flowers; it recognises no real-world object.')
    if not data_config.get('train_dir') and name == 'oxford102':
        return ('Oxford Flowers-102 has 40 to 258 images per class, mostly photographed in the UK; '
                'flowers from other regions, drawings and unusual viewpoints may be misclassified.')
    return (f'It was evaluated only on {dataset_description}; its accuracy on images unlike that '
            'data is unknown.')


def _intended_use(data_config: Dict[str, Any], num_classes: int) -> str:
    if not data_config.get('train_dir') and data_config.get('dataset_name') == 'synthetic':
        return (f'Demonstrating and testing the training and attention-analysis pipeline on the '
                f'{num_classes} synthetic flower classes listed above; not for real photographs.')
    if not data_config.get('train_dir') and data_config.get('dataset_name') == 'synthetic_shapes':
        return ('A pretrained backbone for the demo: fine-tune it on the synthetic flowers '
                '(`--model_name_or_path base:shapes`); its own classes are the shapes listed above.')
    return f'Classifying close-up photographs of the {num_classes} flower classes listed above.'


def _per_class_table(all_results: Dict[str, Any]) -> Tuple[str, str]:
    """The per-class precision / recall / F1 / support table and a sentence on the weakest class."""
    names = all_results['test_class_names']
    precision = all_results.get('test_precision_per_class', {})
    recall = all_results.get('test_recall_per_class', {})
    f1 = all_results.get('test_f1_per_class', {})
    support = all_results.get('test_support_per_class', {})
    rows = [[md_escape(name), fmt(precision.get(name)), fmt(recall.get(name)), fmt(f1.get(name)),
             fmt(support.get(name), 'int')] for name in per_class_order(all_results)]
    table = _table(['Class', 'Precision', 'Recall', 'F1', 'Support'], rows)
    note = per_class_order_note(all_results)
    if note:
        table = f'{note}\n\n{table}'
    confused = confused_pairs_table(all_results)
    if confused:
        header, pairs = confused
        table += ('\n\n### Most confused class pairs\n\n' + confused_pairs_sentence(all_results) + '\n\n'
                  + _table([h.capitalize() for h in header], [[md_escape(c) for c in row] for row in pairs]))
    scored = [(float(f1[name]), name) for name in names if f1.get(name) is not None]
    sentence = ''
    if scored:
        lowest, name = min(scored)
        sentence = f'Lowest class F1: {md_escape(name)} ({lowest:.3f}).'
    return table, sentence


def _attention_section(metrics: Optional[Dict[str, Any]]) -> Tuple[str, str]:
    """The per-layer metrics table and its explanation; returns (section, num_layers_text)."""
    if metrics is None:
        return ('The attention analysis was not run for this model (there is no '
                '`attention_metrics.json` next to the weights), so no attention numbers are reported.',
                'layers')
    layers = metrics['layers']
    num_layers = int(metrics['num_layers'])
    has_masks = bool(metrics.get('has_masks')) and 'fg_lift' in layers
    distance = layers['mean_attention_distance']['mean']
    entropy = layers['entropy']['mean']
    parts = [f'Measured on {metrics["num_images"]} images from the CLS token\'s attention to the '
             'patches, per layer (the metric of the head-averaged map). Layers are numbered from 1 '
             '(closest to the pixels).']
    if has_masks:
        fg_lift, fg_ratio = layers['fg_lift'], layers['fg_ratio']['mean']
        pointing = layers['pointing_game']['mean']
        parts.append(
            f'The flower covers {float(metrics["flower_area"]):.1%} of the image on average. '
            '**fg_ratio** is the share of CLS attention on flower patches; **fg_lift** = fg_ratio / '
            'flower area (1 = no preference, above 1 = attends to the flower more than its area); '
            '**pointing game** is the share of images whose most-attended patch lies on the flower; '
            '**entropy** is normalised to [0, 1] (1 = uniform); **mean attention distance** is in pixels; '
            '"best head" is the head with the highest fg_lift.')
        rows = []
        for layer in range(num_layers):
            heads = fg_lift['per_head'][layer]
            best = max(range(len(heads)), key=lambda h: heads[h])
            rows.append([str(layer + 1), fmt(fg_lift['mean'][layer], digits=2), fmt(fg_ratio[layer]),
                         fmt(pointing[layer], digits=2), fmt(entropy[layer]), fmt(distance[layer], 'px'),
                         f'{best + 1} ({fmt(heads[best], digits=2)})'])
        rollout = metrics.get('rollout') or {}
        if 'fg_lift' in rollout:
            rows.append(['rollout', fmt(rollout['fg_lift'], digits=2), fmt(rollout.get('fg_ratio')),
                         fmt(rollout.get('pointing_game'), digits=2), fmt(rollout.get('entropy')), '–', '–'])
        parts.append(_table(['Layer', 'fg_lift', 'fg_ratio', 'pointing game', 'entropy',
                             'mean attention distance (px)', 'best head (fg_lift)'], rows))
        parts += [md_escape(sentence) for sentence in attention_sentences(metrics)[:1]]
    else:
        reasons = '; '.join(md_escape(reason) for reason in dict.fromkeys((metrics.get('omitted') or {}).values()))
        parts.append('Flower-vs-background metrics (fg_ratio, fg_lift, pointing game, per class) are '
                     f'absent because the evaluation data has no flower masks ({reasons or "no reason recorded"}). '
                     'Only the mask-free metrics are reported: **entropy** normalised to [0, 1] '
                     '(1 = uniform) and **mean attention distance** in pixels.')
        rows = [[str(layer + 1), fmt(entropy[layer]), fmt(distance[layer], 'px')]
                for layer in range(num_layers)]
        parts.append(_table(['Layer', 'entropy', 'mean attention distance (px)'], rows))
    return '\n\n'.join(parts), f'{num_layers} layers'


def _background_section(background: Optional[Dict[str, Any]], num_classes: int,
                        figures: List[str]) -> Tuple[str, str]:
    """The background-study results and the limitation sentence they support."""
    if background is None:
        return ('The background study was not run for this model (no `background.json`; run '
                '`python -m analysis background` to add it).', background_limitation(None))
    variants = background.get('variants') or {}
    rows = [[md_escape(name), md_escape(VARIANT_DESCRIPTIONS.get(name, '')), fmt(values.get('accuracy')),
             fmt(values.get('macro_f1'))] for name, values in variants.items()]
    parts = ['The test images were re-rendered with the flower and the background separated '
             '(after Xiao et al. 2020, *Noise or Signal: The Role of Image Backgrounds in Object '
             'Recognition*):',
             _table(['Variant', 'What the model sees', 'Accuracy', 'Macro F1'], rows)]
    chance = 1.0 / num_classes if num_classes else None
    only_bg = variants.get('only_bg_t', {}).get('accuracy')
    if only_bg is not None and chance is not None:
        parts.append(f'On the background alone the accuracy is {float(only_bg):.1%} '
                     f'(chance: {chance:.1%}).')
    parts += [md_escape(sentence) for sentence in background_sentences(background)[1:]]
    limitation = background_limitation(background)
    parts += figures
    return '\n\n'.join(parts), limitation


def _faithfulness_section(faithfulness: Optional[Dict[str, Any]], metrics: Optional[Dict[str, Any]],
                          figures: List[str]) -> str:
    """Which attention map explains the decision: the deletion / insertion table and its sentences."""
    if faithfulness is None:
        return ('The faithfulness of the attention maps was not measured (no `faithfulness.json`; run '
                '`python -m analysis faithfulness` to add it).')
    header, rows = faithfulness_table(faithfulness)
    parts = [f'Each map ranks the patches of an image. **Deletion**: the most relevant patches are removed first '
             f'(they show the {md_escape(faithfulness.get("baseline", "?"))} baseline) and the probability of the '
             'predicted class is recorded; lower AUC = more faithful. **Insertion**: they are shown first on a fully '
             'removed image; higher AUC = more faithful (Petsiuk et al. 2018; Chefer et al. 2021). Mean ± standard '
             f'error over {int(faithfulness["num_images"])} {md_escape(faithfulness.get("split", ""))} images, '
             f'{int(faithfulness["steps"])} steps.',
             '\n'.join(f'- {md_escape(sentence)}' for sentence in faithfulness_sentences(faithfulness, metrics)),
             _table([md_escape(h) for h in header], [[md_escape(cell) for cell in row] for row in rows])]
    return '\n\n'.join(parts + figures)


def _sinks_section(sinks: Optional[Dict[str, Any]], figures: List[str]) -> str:
    """High-norm tokens and attention sinks: the per-layer table and its sentences."""
    if sinks is None:
        return ('High-norm tokens and attention sinks were not measured (no `sinks.json`; run '
                '`python -m analysis sinks` to add it).')
    header, rows = sink_table(sinks)
    parts = [f'Per image and layer, {md_escape(sinks["rule"]["statistic"])} (k = {sinks["rule"]["k"]:.2f}, the modified '
             'z-score rule of Iglewicz & Hoaglin 1993). The sink share is the part of the CLS attention on the flagged '
             'tokens, which Darcet et al. 2024 ("Vision Transformers Need Registers") found to be background patches '
             f'reused as scratch space in large ViTs. Mean ± standard error over {int(sinks["num_images"])} images.',
             '\n'.join(f'- {md_escape(sentence)}' for sentence in sink_sentences(sinks)),
             _table([md_escape(h) for h in header], [[md_escape(cell) for cell in row] for row in rows])]
    return '\n\n'.join(parts + figures)


def _image_size(output_dir: Path) -> str:
    config = read_optional_json(output_dir / CONFIG_FILE)
    input_size = ((config or {}).get('pretrained_cfg') or {}).get('input_size')
    if not input_size:
        return 'not recorded'
    return f'{input_size[-2]} × {input_size[-1]} pixels'


def start_description(run_config: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """How training started, in words, and the Hub id of the ``base_model`` (None when it is not on the Hub).

    Reads ``run_config.json``'s ``start`` (written by the training job) and ``model`` sections.
    """
    model = run_config.get('model') or {}
    start = run_config.get('start') or {}
    name = str(model.get('model_name_or_path', 'not recorded'))
    compressed = start.get('compressed_from')  # written by python -m analysis compress
    if compressed:
        hub_id = compressed.get('hub_id')
        source = (f'[{md_escape(hub_id)}](https://huggingface.co/{hub_id})' if hub_id else
                  f'the model in {md_escape(Path(str(compressed["path"])).name)} (not on the Hub; weights sha256 '
                  f'{md_escape(str(start.get("weights_sha256", ""))[:12])})')
        return (f'compressed from {source} ({len(compressed["kept_blocks"])} of its {compressed["num_blocks"]} '
                'blocks kept) and distilled from it'), hub_id
    if not model.get('pretrained', start.get('pretrained')):
        return f'trained from scratch (random initialisation, the architecture of {md_escape(name)})', None
    if start.get('timm_model') or timm.is_model(name):
        return f'fine-tuned from timm\'s pretrained {md_escape(name)}', f'timm/{name}'
    if name.startswith('base:'):
        own = start.get('checkpoint_results') or {}
        strength = (f'; on its own task it reaches test accuracy {own["accuracy"]:.3f} over {own["num_classes"]} '
                    'classes' if own.get('accuracy') is not None else '')
        return (f'fine-tuned from the base model `{md_escape(name)}` (pretrained by this project on its synthetic '
                f'pretraining data, which has no flowers{strength})', None)
    if '/' in name and hub_dataset_id({'dataset_name': name}):  # a Hub repo id, same rules as for datasets
        return f'fine-tuned from [{md_escape(name)}](https://huggingface.co/{name})', name
    return f'fine-tuned from the checkpoint {md_escape(name)}', None


def _compression_section(compress: Optional[Dict[str, Any]], figures: List[str]) -> Tuple[str, str]:
    """The compression section and the trade-off limitation of a compressed model; empty for any other."""
    if compress is None or compress.get('outcome') != 'compressed':
        return '', ''
    header, rows = compression_table(compress)
    search_header, search_rows = compression_search_table(compress)
    parts = ['\n'.join(f'- {md_escape(sentence)}' for sentence in compression_sentences(compress)),
             _table([md_escape(h) for h in header], [[md_escape(c) for c in row] for row in rows]),
             'Depths the search tried (validation accuracy; the test split was used only for the final numbers):',
             _table([md_escape(h) for h in search_header], [[md_escape(c) for c in row] for row in search_rows])]
    return '\n\n'.join(parts + figures), md_escape(compression_tradeoff(compress))


def _change_section(change: Optional[Dict[str, Any]], figures: List[str]) -> str:
    if change is None:
        return 'The attention of the starting weights was not recorded, so what training changed is not reported.'
    header, rows = change_table(change)
    parts = [f'The same {int(change["num_images"])} images through the weights training started from and through '
             'the trained model. JS divergence: how far each image\'s head-mean CLS map moved (Jensen-Shannon, '
             'bits, 0 = unchanged, 1 = disjoint); fg_ratio change: per image, after minus before (negative = moved '
             'off the flower).',
             '\n'.join(f'- {md_escape(sentence)}' for sentence in change_sentences(change)),
             _table([md_escape(h) for h in header], rows)]
    return '\n\n'.join(parts + figures)


def _training_table(output_dir: Path, all_results: Dict[str, Any], run_config: Dict[str, Any],
                    dataset_description: str) -> str:
    model = run_config.get('model') or {}
    training = run_config.get('training') or {}
    environment = run_config.get('environment') or {}
    data_report = read_optional_json(output_dir / DATA_REPORT_FILE)
    architecture = (read_optional_json(output_dir / CONFIG_FILE) or {}).get('architecture', 'not recorded')
    rows = [['Model', f'{md_escape(architecture)} (timm), {start_description(run_config)[0]}']]
    if model.get('model_args'):
        rows.append(['Model arguments', md_escape(json.dumps(model['model_args'], sort_keys=True))])
    rows.append(['Data', dataset_description])
    if data_report is not None:
        counts = ', '.join(f'{md_escape(split)} {n}' for split, n in data_report.get('num_checked', {}).items())
        rows.append(['Images per split', f'{counts} ({data_report.get("num_skipped", 0)} unreadable images skipped)'])
    rows.append(['Image size', _image_size(output_dir)])
    max_steps = training.get('max_steps')
    if max_steps is not None and int(max_steps) > 0:
        length = f'{int(max_steps)} steps'
    else:
        length = f'{training.get("num_train_epochs", "not recorded")} epochs'
    if all_results.get('epoch') is not None:
        length += f' (ended at epoch {float(all_results["epoch"]):.2f})'
    rows.append(['Training length', length])
    for key, label in [('per_device_train_batch_size', 'Batch size per device'),
                       ('learning_rate', 'Learning rate'), ('lr_scheduler_type', 'Learning-rate schedule'),
                       ('weight_decay', 'Weight decay'), ('seed', 'Seed')]:
        if training.get(key) is not None:
            rows.append([label, md_escape(training[key])])
    hardware = md_escape(environment.get('device', 'not recorded'))
    if environment.get('num_processes'):
        hardware += f', {md_escape(environment["num_processes"])} process(es)'
    rows.append(['Hardware', hardware])
    if run_config.get('train_runtime_s') is not None:
        rows.append(['Training time', f'{float(run_config["train_runtime_s"]) / 60:.1f} min'])
    versions = ', '.join(f'{lib} {md_escape(environment[lib])}' for lib in ('torch', 'timm', 'transformers')
                         if environment.get(lib))
    if versions:
        rows.append(['Software', versions])
    return _table(['Setting', 'Value'], rows)


def _check_run_dir(output_dir: Path, repo_id: Optional[str]) -> None:
    """Raises a UserError unless ``output_dir`` holds a finished run and ``repo_id`` (if given) is a Hub id."""
    for required in (RESULTS_FILE, RUN_CONFIG_FILE):
        if not (output_dir / required).is_file():
            raise MissingFileError(
                f'{output_dir / required} not found: the model card is made from a finished training '
                'run; train first (train_hf.py --output_dir DIR) or pass that output directory.')
    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise UserError(f'Invalid repo_id {repo_id!r}: {e} Use the form "user/name".') from e


def _card_metadata(all_results: Dict[str, Any], data_config: Dict[str, Any], dataset_type: str, dataset_name: str,
                   *, title: str, base_model: Optional[str], license: str, has_background: bool) -> ModelCardData:
    """The card's YAML header: library, license, tags, datasets, base model and the model-index results."""
    eval_split = str(all_results.get('test_split', 'test'))
    eval_results = [
        EvalResult(task_type='image-classification', task_name='Image Classification',
                   dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=eval_split,
                   metric_type='accuracy', metric_name='Accuracy',
                   metric_value=float(all_results['test_accuracy'])),
        EvalResult(task_type='image-classification', task_name='Image Classification',
                   dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=eval_split,
                   metric_type='f1', metric_name='Macro F1', metric_args={'average': 'macro'},
                   metric_value=float(all_results['test_macro_f1'])),
    ]
    tags = list(BASE_TAGS)
    if data_config.get('dataset_name') in ('synthetic', 'synthetic_shapes') and not data_config.get('train_dir'):
        tags.append('synthetic-data')
    if has_background:
        tags.append('background-bias')
    hub_id = hub_dataset_id(data_config)
    return ModelCardData(
        library_name='timm', pipeline_tag='image-classification', license=license, tags=tags,
        datasets=[hub_id] if hub_id else None,
        base_model=base_model,
        model_name=title, eval_results=eval_results)


def _about_sections(output_dir: Path, all_results: Dict[str, Any], run_config: Dict[str, Any],
                    dataset_description: str) -> Dict[str, Any]:
    """Template values that describe the model and its data: subject, training setup, intended use, limits."""
    data_config = run_config.get('data') or {}
    num_classes = len(all_results['test_class_names'])
    subject = ({'subject': 'shapes and textures', 'focus': 'object'} if data_config.get('dataset_name') == 'synthetic_shapes'
               else {'subject': 'flowers', 'focus': 'flower'})
    return dict(
        num_classes=num_classes,
        **subject,
        dataset_description=dataset_description,
        training_table=_training_table(output_dir, all_results, run_config, dataset_description),
        intended_use=_intended_use(data_config, num_classes),
        data_limitation=_data_limitation(data_config, dataset_description),
    )


def _headline_results(all_results: Dict[str, Any]) -> Dict[str, Any]:
    """Template values of the results table: split, number of images, accuracy, macro F1, per-class table."""
    support = all_results.get('test_support_per_class') or {}
    per_class_table, lowest_f1_sentence = _per_class_table(all_results)
    return dict(
        eval_split=md_escape(str(all_results.get('test_split', 'test'))),
        num_eval_images=int(sum(int(n) for n in support.values())) if support else 'all',
        accuracy_text=f'{float(all_results["test_accuracy"]):.2%}',
        macro_f1_text=f'{float(all_results["test_macro_f1"]):.4f}',
        lowest_f1_sentence=lowest_f1_sentence,
        per_class_table=per_class_table,
    )


def _attention_figures(output_dir: Path) -> str:
    """Links to the attention figures that exist, head maps and class-map pages in their place."""
    figures = (ATTENTION_FIGURES[:2] + _head_map_figures(output_dir) + ATTENTION_FIGURES[2:3]
               + _class_map_figures(output_dir) + ATTENTION_FIGURES[3:])
    return '\n\n'.join(_figure_links(output_dir, figures))


def _study_sections(output_dir: Path, num_classes: int, metrics: Optional[Dict[str, Any]],
                    background: Optional[Dict[str, Any]], seed: Optional[int]) -> Dict[str, Any]:
    """Template values of the analyses: attention, change, background, faithfulness and compression."""
    attention_section, num_layers_text = _attention_section(metrics)
    background_section, background_limitation = _background_section(
        background, num_classes, _figure_links(output_dir, BACKGROUND_FIGURES))
    compression_section, compression_limitation = _compression_section(
        read_optional_json(output_dir / COMPRESS_FILE), _figure_links(output_dir, COMPRESSION_FIGURES))
    return dict(
        num_layers_text=num_layers_text,
        attention_section=attention_section,
        attention_figures=_attention_figures(output_dir),
        change_section=_change_section(read_optional_json(output_dir / CHANGE_FILE),
                                       _figure_links(output_dir, CHANGE_FIGURES)),
        background_section=background_section,
        background_limitation=background_limitation,
        sinks_section=_sinks_section(read_optional_json(output_dir / SINKS_FILE),
                                     _figure_links(output_dir, SINKS_FIGURES)),
        faithfulness_section=_faithfulness_section(read_optional_json(output_dir / FAITHFULNESS_FILE), metrics,
                                                   _figure_links(output_dir, FAITHFULNESS_FIGURES)),
        compression_section=compression_section,
        compression_limitation=compression_limitation,
        stability_section='\n'.join(f'- {md_escape(s)}' for s in one_run_sentences(output_dir, seed)),
    )


def _source_files(output_dir: Path) -> str:
    """The run files the card was made from, as a Markdown list of code spans."""
    sources = [name for name in (RESULTS_FILE, RUN_CONFIG_FILE, CONFIG_FILE, DATA_REPORT_FILE,
                                 METRICS_FILE, BACKGROUND_FILE, FAITHFULNESS_FILE, COMPRESS_FILE)
               if (output_dir / name).is_file()]
    return ', '.join(f'`{name}`' for name in sources)


def build_card(output_dir: Union[str, Path], *, repo_id: Optional[str] = None, license: str = 'apache-2.0',
               template: Optional[str] = None, space_id: Optional[str] = None) -> ModelCard:
    """Builds the model card of a training run (without writing it).

    Args:
        output_dir: the run's output directory (holds all_results.json and run_config.json).
        repo_id: the Hub repository the model goes to; None shows "<user>/<model>" in the examples.
        license: the license identifier for the card metadata.
        template: the Jinja template text (default: the packaged model_card.md).
        space_id: the Hugging Face Space that runs the app on this model (linked from "How to use").

    Returns:
        The rendered ``huggingface_hub.ModelCard``.
    """
    output_dir = Path(output_dir)
    _check_run_dir(output_dir, repo_id)
    all_results = read_json(output_dir / RESULTS_FILE)
    run_config = read_json(output_dir / RUN_CONFIG_FILE)
    metrics = read_optional_json(output_dir / METRICS_FILE)
    background = read_optional_json(output_dir / BACKGROUND_FILE)
    data_config = run_config.get('data') or {}
    model_name = str((read_optional_json(output_dir / CONFIG_FILE) or {}).get('architecture')
                     or (run_config.get('model') or {}).get('model_name_or_path', 'vit'))
    start_text, base_model = start_description(run_config)
    dataset_type, dataset_name, dataset_description = _dataset_names(data_config)
    title = repo_id or f'{model_name} on {dataset_name}'

    card_data = _card_metadata(all_results, data_config, dataset_type, dataset_name, title=title,
                               base_model=base_model, license=license, has_background=background is not None)
    return ModelCard.from_template(
        card_data, template_str=template if template is not None else template_text(TEMPLATE_NAME),
        title=md_escape(title),
        model_name=md_escape(model_name),
        start_text=start_text,
        classification_figures='\n\n'.join(_figure_links(output_dir, CLASSIFICATION_FIGURES)),
        **_headline_results(all_results),
        **_study_sections(output_dir, len(all_results['test_class_names']), metrics, background,
                          (run_config.get('training') or {}).get('seed')),
        **_about_sections(output_dir, all_results, run_config, dataset_description),
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        space_id=space_id,
        source_files=_source_files(output_dir),
    )


def render_model_card(output_dir: Union[str, Path], *, repo_id: Optional[str] = None,
                      license: str = 'apache-2.0', space_id: Optional[str] = None) -> Path:
    """Renders the model card of a training run and writes it to ``output_dir/README.md``.

    Args:
        output_dir: the run's output directory (holds all_results.json and run_config.json).
        repo_id: the Hub repository the model goes to; None shows "<user>/<model>" in the examples.
        license: the license identifier for the card metadata.
        space_id: the Space that runs the app on this model, linked from the card.

    Returns:
        The path of the written README.md.
    """
    output_dir = Path(output_dir)
    card = build_card(output_dir, repo_id=repo_id, license=license, space_id=space_id)
    path = output_dir / CARD_FILE
    write_text(path, str(card))
    logger.info('Wrote the model card to %s', path)
    return path
