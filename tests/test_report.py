"""Tests of analysis.render.report: summary loading, sentences from numbers, figures and the HTML report."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from analysis.maps import summary
from analysis.maps.attention_metrics import class_mean_cls_maps
from analysis.modeling.tokens import TokenLayout
from analysis.render import figures, findings, report

# M images, L layers, H heads; 1 prefix token, 2 x 2 patches of 8 px -> 16 x 16 images.
M, L, H = 6, 3, 2
LAYOUT = TokenLayout(num_prefix_tokens=1, grid_size=(2, 2), patch_size=(8, 8))
P = LAYOUT.num_patches
EVIL = '<script>alert(1)</script>'
CLASS_NAMES = ['daisy', EVIL, 'tulip']


def _entry(mean):
    return {'mean': list(mean), 'per_head': [[m] * H if m is not None else [None] * H for m in mean]}


def make_metrics(has_masks: bool, fg_lift=(1.1, 1.4, 0.8), pointing=(0.5, 0.8, 0.3),
                 distance=(4.0, 6.5, 9.0), flower_area=0.25) -> dict:
    layers = {'entropy': _entry([0.95, 0.8, 0.6]), 'mean_attention_distance': _entry(distance)}
    metrics = {'num_images': M, 'num_layers': L, 'num_heads': H, 'has_masks': has_masks, 'layers': layers,
               'rollout': {'entropy': 0.7}, 'omitted': {}}
    if has_masks:
        metrics['flower_area'] = flower_area
        layers['fg_ratio'] = _entry([0.3, 0.35, 0.2])
        layers['fg_lift'] = _entry(fg_lift)
        layers['pointing_game'] = _entry(pointing)
        metrics['rollout'].update(fg_ratio=0.3, fg_lift=1.2, pointing_game=0.6)
        metrics['per_class'] = {name: {'num_images': 2, 'fg_ratio': [0.3] * L, 'fg_lift': list(fg_lift),
                                       'pointing_game': list(pointing)} for name in CLASS_NAMES}
    else:
        metrics['omitted'] = {m: 'the dataset has no flower masks'
                              for m in ('fg_ratio', 'fg_lift', 'pointing_game', 'flower_area', 'per_class')}
    return metrics


def make_results() -> dict:
    per_class = dict(zip(CLASS_NAMES, [1.0, 0.8, 0.667]))
    return {'eval_accuracy': 0.8, 'test_accuracy': 0.8333, 'test_macro_f1': 0.822,
            'test_f1_per_class': per_class, 'test_precision_per_class': per_class,
            'test_recall_per_class': per_class, 'test_support_per_class': {n: 2 for n in CLASS_NAMES},
            'test_confusion_matrix': [[2, 0, 0], [0, 2, 0], [0, 1, 1]], 'test_class_names': CLASS_NAMES,
            'test_split': 'test'}


def write_summary(path: Path, has_masks: bool) -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    cls_attention = torch.softmax(torch.randn(M, L, H, P, generator=g), dim=-1)
    tensors = {
        'labels': labels,
        'predictions': torch.tensor([0, 0, 1, 1, 1, 2]),
        'cls_attention': cls_attention.half(),
        'rollout': torch.softmax(torch.randn(M, P, generator=g), dim=-1).half(),
        'example_images': torch.randint(0, 255, (3, 16, 16, 3), dtype=torch.uint8, generator=g),
        'example_indices': torch.tensor([0, 4, 5]),
    }
    if has_masks:
        tensors['fg_fraction'] = torch.rand(M, P, generator=g).half()
    meta = {'format': summary.SUMMARY_FORMAT, 'version': 1, 'model_id': 'vit-<b>tiny</b>',
            'class_names': CLASS_NAMES, 'num_layers': L, 'num_heads': H, 'layout': LAYOUT.to_dict(),
            'image_size': [16, 16], 'has_masks': has_masks, 'dataset': 'flowers&co', 'split': 'test',
            'num_images': M}
    save_file(tensors, str(path), metadata={'analysis': json.dumps(meta)})


def make_run(tmp_path: Path, has_masks: bool = True, background=None, importance=None) -> Path:
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'all_results.json').write_text(json.dumps(make_results()))
    (out / 'attention_metrics.json').write_text(json.dumps(make_metrics(has_masks)))
    write_summary(out / 'attentions.safetensors', has_masks)
    if background is not None:
        (out / 'background.json').write_text(json.dumps(background))
    if importance is not None:
        (out / 'importance.json').write_text(json.dumps(importance))
    return out


BACKGROUND = {'variants': {'original': {'accuracy': 0.9, 'macro_f1': 0.89},
                           'mixed_same': {'accuracy': 0.85, 'macro_f1': 0.84},
                           'mixed_rand': {'accuracy': 0.64, 'macro_f1': 0.6}}, 'bg_gap': 0.21}
IMPORTANCE = {'probe_accuracy': [0.3, 0.85, 0.9], 'layer_skip_accuracy': [0.5, 0.88, 0.89],
              'truncate_accuracy': [0.9, 0.85, 0.3], 'head_ablation_accuracy': [[0.7, 0.9], [0.89, 0.9], [0.9, 0.88]],
              'baseline_accuracy': 0.9,
              'greedy_pruning': {'order': [[2, 1], [1, 0], [0, 1], [0, 0], [1, 1], [2, 0]],
                                 'accuracy': [0.895, 0.893, 0.88, 0.7], 'num_prunable': 2, 'num_heads': 6,
                                 'tolerance': 0.01}}


# ----------------------------------------------------------------------------- load_summary

def test_load_summary_round_trip(tmp_path):
    write_summary(tmp_path / 's.safetensors', has_masks=True)
    tensors, meta = summary.load_summary(tmp_path / 's.safetensors')
    assert tensors['cls_attention'].shape == (M, L, H, P)
    assert meta['class_names'] == CLASS_NAMES and meta['has_masks'] is True


def test_load_summary_rejects_files_that_are_not_summaries(tmp_path):
    save_file({'x': torch.zeros(2)}, str(tmp_path / 'plain.safetensors'))
    with pytest.raises(ValueError, match='not an attention summary'):
        summary.load_summary(tmp_path / 'plain.safetensors')
    save_file({'x': torch.zeros(2)}, str(tmp_path / 'other.safetensors'),
              metadata={'analysis': json.dumps({'format': 'something-else', 'version': 1})})
    with pytest.raises(ValueError, match='not an attention summary'):
        summary.load_summary(tmp_path / 'other.safetensors')
    (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file at all')
    with pytest.raises(ValueError, match='not an attention summary'):
        summary.load_summary(tmp_path / 'junk.safetensors')
    with pytest.raises(FileNotFoundError):
        summary.load_summary(tmp_path / 'missing.safetensors')


# ----------------------------------------------------------------------------- sentences

def test_sentences_reflect_the_numbers_with_masks():
    sentences = findings.summary_sentences(make_results(), make_metrics(has_masks=True))
    assert sentences[0] == 'Test accuracy 83.3%, macro F1 0.822; lowest class F1: tulip 0.67.'
    assert ('Layers with fg_lift > 1 (attend to the flower more than its area): 1, 2 (of 3); '
            'highest: layer 2 (fg_lift 1.40).') in sentences
    assert 'The most-attended patch lies on the flower in 80% of images at layer 2 (chance: 25%).' in sentences
    assert 'Mean attention distance grows from 4.0 px (layer 1) to 9.0 px (layer 3); range 4.0-9.0 px.' in sentences
    assert not any('omitted' in s for s in sentences)


def test_sentences_name_exactly_the_layers_above_one_and_skip_undefined_lift():
    metrics = make_metrics(has_masks=True, fg_lift=(0.9, None, 1.05), distance=(9.0, 6.0, 5.0))
    sentences = findings.summary_sentences(make_results(), metrics)
    assert any(s.startswith('Layers with fg_lift > 1 (attend to the flower more than its area): 3 (of 3); '
                            'highest: layer 3 (fg_lift 1.05)') for s in sentences)
    assert 'Mean attention distance shrinks from 9.0 px (layer 1) to 5.0 px (layer 3); range 5.0-9.0 px.' in sentences
    flat = make_metrics(has_masks=True, distance=(32.7, 32.4, 32.7))
    assert ('Mean attention distance is about the same at every layer (32.4-32.7 px).'
            in findings.summary_sentences(make_results(), flat))


def test_sentences_without_masks_say_why():
    sentences = findings.summary_sentences(make_results(), make_metrics(has_masks=False))
    assert 'Flower-mask metrics are omitted: the dataset has no flower masks.' in sentences
    assert not any('fg_lift' in s or 'pointing' in s.lower() for s in sentences)


@pytest.mark.parametrize('gap, verdict', [(0.21, 'the model uses the background'),
                                          (0.01, 'the background has little effect on the predictions')])
def test_background_sentence_wording_follows_bg_gap(gap, verdict):
    sentences = findings.summary_sentences(make_results(), None, dict(BACKGROUND, bg_gap=gap), None)
    gap_sentence = [s for s in sentences if s.startswith('bg_gap')][0]
    assert f'= {gap:.2f}: {verdict}' in gap_sentence


def test_importance_sentences():
    sentences = findings.summary_sentences(make_results(), None, None, IMPORTANCE)
    # 90% of the final probe accuracy 0.9 is 0.81: first reached at layer 2.
    assert any(s.startswith('Class information appears in the CLS token at layer 2 ') for s in sentences)
    # After 3 removals accuracy 0.88 < 0.9 - 0.01, so 2 heads can go.
    assert '2 of 6 heads can be pruned with at most 1 point accuracy loss (greedy pruning).' in sentences
    assert 'Ablating a single head costs at most 20.0 points (layer 1, head 1).' in sentences
    assert any(s.startswith('Skipping layer 1 hurts most') for s in sentences)


def test_class_mean_cls_maps_averages_heads_then_images_of_each_class():
    cls_attention = torch.zeros(3, 1, 2, 2)
    cls_attention[0, 0] = torch.tensor([[1., 0.], [0., 1.]])  # head mean [0.5, 0.5]
    cls_attention[1, 0] = torch.tensor([[1., 0.], [1., 0.]])  # head mean [1, 0]
    cls_attention[2, 0] = torch.tensor([[0., 1.], [0., 1.]])  # head mean [0, 1]
    maps, counts = class_mean_cls_maps(cls_attention, torch.tensor([0, 0, 2]), num_classes=3)
    torch.testing.assert_close(maps[:, 0], torch.tensor([[0.75, 0.25], [0., 0.], [0., 1.]]))
    assert counts.tolist() == [2, 0, 1]


# ----------------------------------------------------------------------------- figures and HTML

def test_render_figures_writes_the_standard_pngs(tmp_path):
    out = make_run(tmp_path, has_masks=True)
    written = figures.render_figures(out)
    names = sorted(p.name for p in (out / 'figures').iterdir())
    # fg_lift is highest at layer 2 -> the head maps are of layer 2.
    assert names == ['class_maps.png', 'confusion_matrix.png', 'depth_curves.png', 'f1_bars.png',
                     'head_maps_layer2.png', 'layer_grid.png']
    assert sorted(p.name for p in written.values()) == names
    for path in written.values():  # real pictures: they decode, and they are not one flat colour
        pixels = np.asarray(Image.open(path).convert('RGB'), dtype=np.float32)
        assert min(pixels.shape[:2]) >= 100 and pixels.std() > 10, path.name


def test_write_report_is_self_contained_and_escaped(tmp_path):
    out = make_run(tmp_path, has_masks=True)
    page = report.write_report(out, figures.render_figures(out)).read_text()
    assert (out / 'report.html').is_file()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 6
    assert 'src="http' not in page and 'href=' not in page and '<link' not in page
    assert EVIL not in page and '&lt;script&gt;alert(1)&lt;/script&gt;' in page
    assert '<b>tiny</b>' not in page and 'flowers&amp;co' in page
    assert '<th>fg_lift</th>' in page
    assert 'Layers with fg_lift &gt; 1' in page
    assert 'The background study was not run' in page and 'python -m analysis background --model' in page
    assert 'The importance study was not run' in page
    assert not (out / 'figures' / 'background.png').exists()


def test_write_report_without_masks_shows_the_omission_and_no_fg_lift_table(tmp_path):
    out = make_run(tmp_path, has_masks=False)
    page = report.write_report(out, figures.render_figures(out)).read_text()
    assert 'Flower-mask metrics (fg_ratio, fg_lift, pointing game, per class) are missing: ' \
           'the dataset has no flower masks.' in page
    assert '<th>fg_lift</th>' not in page and '<th>pointing_game</th>' not in page
    assert '<th>entropy</th>' in page
    assert (out / 'figures' / 'head_maps_layer1.png').is_file()


def test_write_report_includes_background_and_importance_when_present(tmp_path):
    out = make_run(tmp_path, background=BACKGROUND, importance=IMPORTANCE)
    page = report.write_report(out, figures.render_figures(out)).read_text()
    assert 'was not run' not in page
    assert 'bg_gap = acc(mixed_same) - acc(mixed_rand) = 0.21: the model uses the background' in page
    assert '2 of 6 heads can be pruned' in page
    assert (out / 'figures' / 'background.png').is_file() and (out / 'figures' / 'importance.png').is_file()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 8


def test_write_report_needs_training_results(tmp_path):
    with pytest.raises(FileNotFoundError, match='train first'):
        report.write_report(tmp_path, figures.render_figures(tmp_path))
