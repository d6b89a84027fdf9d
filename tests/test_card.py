"""Tests of the model card (analysis/card.py + model_card.md) on hand-made run output folders."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from analysis.render.card import md_escape, render_model_card

CLASS_NAMES = ['daisy', 'rose|red', '<script>alert(1)</script>']
NUM_LAYERS, NUM_HEADS = 3, 2


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding='utf-8')


def _write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)


def make_run_dir(root: Path, *, has_masks: bool = True, pretrained: bool = False,
                 dataset_name: str = 'synthetic', background: bool = False,
                 figures=('confusion_matrix.png', 'layer_grid.png', 'head_maps_layer2.png')) -> Path:
    """A fake training-run output folder following the output-directory format."""
    root.mkdir(parents=True, exist_ok=True)
    f1 = {'daisy': 0.95, 'rose|red': 0.81, '<script>alert(1)</script>': 0.9}
    _write_json(root / 'all_results.json', {
        'epoch': 2.0, 'train_loss': 0.4, 'eval_accuracy': 0.9,
        'test_accuracy': 0.8765, 'test_macro_f1': 0.8543,
        'test_f1_per_class': f1,
        'test_precision_per_class': {name: 0.5 + i / 10 for i, name in enumerate(CLASS_NAMES)},
        'test_recall_per_class': {name: 0.6 + i / 10 for i, name in enumerate(CLASS_NAMES)},
        'test_support_per_class': {name: 10 + i for i, name in enumerate(CLASS_NAMES)},
        'test_confusion_matrix': [[9, 1, 0], [1, 9, 1], [0, 0, 12]],
        'test_class_names': CLASS_NAMES, 'test_split': 'test'})
    _write_json(root / 'run_config.json', {
        'model': {'model_name_or_path': 'vit_tiny_patch16_224', 'pretrained': pretrained,
                  'model_args': {'img_size': 64}},
        'data': {'dataset_name': dataset_name, 'synthetic_background': 'correlated', 'train_dir': None},
        'training': {'seed': 1234, 'num_train_epochs': 2.0, 'max_steps': -1, 'learning_rate': 0.001,
                     'per_device_train_batch_size': 32, 'hub_token': '<HUB_TOKEN>'},
        'environment': {'device': 'cpu', 'num_processes': 1, 'torch': '2.14.1', 'timm': '1.0.31',
                        'transformers': '5.24'},
        'train_runtime_s': 123.0})
    _write_json(root / 'config.json', {'architecture': 'vit_tiny_patch16_224', 'num_classes': 3,
                                       'pretrained_cfg': {'input_size': [3, 64, 64]}})
    per_head = [[1.0 + 0.1 * layer + 0.05 * head for head in range(NUM_HEADS)] for layer in range(NUM_LAYERS)]
    layers = {'entropy': {'mean': [0.9, 0.8, 0.7], 'per_head': per_head},
              'mean_attention_distance': {'mean': [10.0, 20.0, 30.0], 'per_head': per_head}}
    metrics = {'num_images': 33, 'num_layers': NUM_LAYERS, 'num_heads': NUM_HEADS, 'has_masks': has_masks,
               'layers': layers, 'rollout': {'entropy': 0.5}, 'omitted': {}}
    if has_masks:
        # Known answer: layers 1 and 3 have fg_lift > 1, layer 3 is the highest.
        layers['fg_lift'] = {'mean': [1.25, 0.75, 1.5], 'per_head': [[1.0, 1.5], [0.7, 0.8], [1.6, 1.4]]}
        layers['fg_ratio'] = {'mean': [0.5, 0.3, 0.6], 'per_head': per_head}
        layers['pointing_game'] = {'mean': [0.7, 0.2, 0.8], 'per_head': per_head}
        metrics['flower_area'] = 0.4
        metrics['rollout'].update({'fg_ratio': 0.55, 'fg_lift': 1.375, 'pointing_game': 0.75})
    else:
        metrics['omitted'] = {'fg_lift': 'the dataset has no flower masks'}
    _write_json(root / 'attention_metrics.json', metrics)
    if background:
        _write_json(root / 'background.json', {
            'variants': {'original': {'accuracy': 0.9, 'macro_f1': 0.88},
                         'mixed_same': {'accuracy': 0.85, 'macro_f1': 0.84},
                         'mixed_rand': {'accuracy': 0.55, 'macro_f1': 0.5},
                         'only_bg_t': {'accuracy': 0.6, 'macro_f1': 0.5}},
            'bg_gap': 0.30})
    for name in figures:
        _write_png(root / 'figures' / name)
    return root


def _linked_targets(text: str):
    """Targets of Markdown links and images that are not web addresses."""
    targets = re.findall(r'\]\(([^)\s]+)\)', text)
    return [t for t in targets if not t.startswith(('http://', 'https://'))]


def test_md_escape_neutralises_markdown_and_html():
    assert md_escape('a|b') == 'a\\|b'
    assert md_escape('<b>x</b>') == '&lt;b&gt;x&lt;/b&gt;'
    assert md_escape('line\nbreak') == 'line break'
    assert md_escape('[x](y)') == '\\[x\\](y)'


def test_card_metadata_matches_results(tmp_path):
    run = make_run_dir(tmp_path / 'run')
    path = render_model_card(run, repo_id='alice/flower-vit')
    assert path == run / 'README.md'
    card = ModelCard.load(path)
    results = json.loads((run / 'all_results.json').read_text())
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {'accuracy': results['test_accuracy'], 'f1': results['test_macro_f1']}
    assert all(r.dataset_split == 'test' for r in card.data.eval_results)
    assert card.data.library_name == 'timm'
    assert card.data.pipeline_tag == 'image-classification'
    assert card.data.license == 'apache-2.0'
    assert {'image-classification', 'timm', 'vision-transformer', 'attention-analysis'} <= set(card.data.tags)
    # Synthetic data is not a Hub dataset, and the model was trained from scratch.
    assert card.data.datasets is None
    assert card.data.base_model is None
    assert 'timm.create_model("hf-hub:alice/flower-vit", pretrained=True)' in card.text
    assert 'AutoModelForImageClassification.from_pretrained("alice/flower-vit")' in card.text
    assert 'pipeline("image-classification", model="alice/flower-vit")' in card.text
    assert 'TimmViTForImageClassification.from_pretrained("alice/flower-vit")' in card.text
    assert '<HUB_TOKEN>' not in card.content


def test_card_base_model_and_hub_dataset(tmp_path):
    run = make_run_dir(tmp_path / 'run', pretrained=True, dataset_name='bob/my-flowers')
    card = ModelCard.load(render_model_card(run, license='mit'))
    assert card.data.base_model == 'timm/vit_tiny_patch16_224'
    assert card.data.datasets == ['bob/my-flowers']
    assert card.data.license == 'mit'
    assert all(r.dataset_type == 'bob/my-flowers' for r in card.data.eval_results)
    assert 'hf-hub:<user>/<model>' in card.text


def test_card_per_class_table_is_escaped(tmp_path):
    run = make_run_dir(tmp_path / 'run')
    text = ModelCard.load(render_model_card(run)).text
    assert '<script>' not in text
    assert '| rose\\|red | 0.600 | 0.700 | 0.810 | 11 |' in text
    assert 'Lowest class F1: rose\\|red (0.810)' in text
    # Every row of the per-class table has exactly 5 cells: no class name split a row.
    rows = [line for line in text.splitlines() if line.startswith('| ') and '0.9' in line and 'daisy' in line]
    assert rows and all(len(re.split(r'(?<!\\)\|', row)) == 7 for row in rows)


def test_card_links_only_existing_figures(tmp_path):
    run = make_run_dir(tmp_path / 'run', figures=('confusion_matrix.png', 'head_maps_layer2.png'))
    text = ModelCard.load(render_model_card(run)).text
    targets = _linked_targets(text)
    assert set(targets) == {'figures/confusion_matrix.png', 'figures/head_maps_layer2.png'}
    assert all((run / target).is_file() for target in targets)


def test_card_fg_lift_table_from_metrics(tmp_path):
    run = make_run_dir(tmp_path / 'run', has_masks=True)
    text = ModelCard.load(render_model_card(run)).text
    assert '| 1 | 1.25 | 0.500 | 0.70 | 0.900 | 10.0 | 2 (1.50) |' in text
    assert '| rollout | 1.38 |' in text
    assert 'fg_lift &gt; 1 (attend to the flower more than its area): 1, 3 (of 3); highest: layer 3' in text
    assert 'background study was not run' in text


def test_card_without_masks_says_why(tmp_path):
    run = make_run_dir(tmp_path / 'run', has_masks=False)
    text = ModelCard.load(render_model_card(run)).text
    assert 'the dataset has no flower masks' in text
    assert 'fg_lift |' not in text  # no fg_lift column
    assert '| 3 | 0.700 | 30.0 |' in text


def test_card_background_study(tmp_path):
    run = make_run_dir(tmp_path / 'run', background=True, figures=('background.png',))
    card = ModelCard.load(render_model_card(run))
    assert 'bg_gap = acc(mixed_same) - acc(mixed_rand) = 0.30: the model uses the background' in card.text
    assert 'The model relies on the background' in card.text
    assert '| mixed_rand | the flower on the background of an image of another class | 0.550 | 0.500 |' in card.text
    assert 'figures/background.png' in _linked_targets(card.text)
    assert 'background-bias' in card.data.tags


def test_card_requires_results(tmp_path):
    run = make_run_dir(tmp_path / 'run')
    (run / 'all_results.json').unlink()
    with pytest.raises(FileNotFoundError, match='train first'):
        render_model_card(run)


def test_card_rejects_bad_repo_id(tmp_path):
    run = make_run_dir(tmp_path / 'run')
    with pytest.raises(ValueError, match='repo_id'):
        render_model_card(run, repo_id='not a repo id')
    assert not (run / 'README.md').exists()
