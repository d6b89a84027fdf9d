"""Background variants on hand-made image/mask pairs, and the background study's JSON schema."""
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

from analysis.studies.background import (
    VARIANTS,
    VariantRenderer,
    background_study,
    choose_partners,
    fill_background,
    make_variant,
)
from analysis.studies.importance import image_tensors
from conftest import tiny_vit
from data_scripts.synthetic_flowers import MIXED_VARIANTS, SyntheticFlowersConfig, render_example

CLASSES = ['a', 'b', 'c']


def _striped_image(h=8, w=12, value_fg=200):
    """Background: vertical stripes (column x has value 10 * x); flower: a 2 x 3 block of value_fg."""
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:] = (10 * np.arange(w, dtype=np.uint8))[None, :, None]
    mask = np.zeros((h, w), dtype=bool)
    mask[3:5, 4:7] = True
    image[mask] = value_fg
    return image, mask


def test_only_fg_and_no_fg_put_pixels_where_they_belong():
    image, mask = _striped_image()
    only_fg = make_variant(image, mask, 'only_fg')
    assert (only_fg[mask] == 200).all()
    assert (only_fg[~mask] == 0).all()
    no_fg = make_variant(image, mask, 'no_fg')
    assert (no_fg[mask] == 0).all()
    np.testing.assert_array_equal(no_fg[~mask], image[~mask])
    np.testing.assert_array_equal(make_variant(image, mask, 'original'), image)


def test_float_and_uint8_masks_mean_the_same_as_bool():
    image, mask = _striped_image()
    expected = make_variant(image, mask, 'only_fg')
    np.testing.assert_array_equal(make_variant(image, mask.astype(np.float32), 'only_fg'), expected)
    np.testing.assert_array_equal(make_variant(image, mask.astype(np.uint8) * 255, 'only_fg'), expected)


def test_only_bg_t_fills_the_flower_with_the_images_own_background():
    image, mask = _striped_image()
    out = make_variant(image, mask, 'only_bg_t')
    np.testing.assert_array_equal(out[~mask], image[~mask])  # background untouched
    assert not (out[mask] == 200).any()  # no flower pixel left
    background_values = set(np.unique(image[~mask]).tolist())
    assert set(np.unique(out[mask]).tolist()) <= background_values
    # Vertical stripes: the first shift copies from 3 columns to the right (box width 3) -> 10 * (x + 3).
    ys, xs = np.nonzero(mask)
    np.testing.assert_array_equal(out[ys, xs, 0], 10 * (xs + 3))


def test_only_bg_t_with_a_flower_as_wide_as_the_image_uses_the_rows_above_and_below():
    image = np.zeros((6, 4, 3), dtype=np.uint8)
    image[:] = (10 * np.arange(6, dtype=np.uint8))[:, None, None]  # horizontal stripes
    mask = np.zeros((6, 4), dtype=bool)
    mask[2:4, :] = True
    image[mask] = 250
    out = make_variant(image, mask, 'only_bg_t')
    assert not (out[mask] == 250).any()
    np.testing.assert_array_equal(out[~mask], image[~mask])


def test_only_bg_t_without_background_is_an_error():
    image = np.full((4, 4, 3), 7, dtype=np.uint8)
    with pytest.raises(ValueError, match='no background'):
        fill_background(image, np.ones((4, 4), dtype=bool))


def test_mixed_pastes_the_flower_on_the_partners_filled_background():
    image, mask = _striped_image()
    partner = np.full((8, 12, 3), 33, dtype=np.uint8)
    partner_mask = np.zeros((8, 12), dtype=bool)
    partner_mask[0:2, 0:2] = True
    partner[partner_mask] = 99  # the partner's flower must not show up
    out = make_variant(image, mask, 'mixed_same', partner, partner_mask)
    assert (out[mask] == 200).all()
    assert (out[~mask] == 33).all()


def test_mixed_resizes_a_partner_of_another_size():
    image, mask = _striped_image()
    partner = np.full((16, 24, 3), 50, dtype=np.uint8)
    out = make_variant(image, mask, 'mixed_rand', partner, np.zeros((16, 24), dtype=bool))
    assert out.shape == image.shape
    assert (out[~mask] == 50).all()


def test_bad_inputs_are_value_errors():
    image, mask = _striped_image()
    with pytest.raises(ValueError, match='only_fg'):
        make_variant(image, mask, 'flowers_only')
    with pytest.raises(ValueError, match='partner'):
        make_variant(image, mask, 'mixed_same')
    with pytest.raises(ValueError, match='height and width'):
        make_variant(image, mask[:4], 'only_fg')


def test_partners_follow_the_class_rule_and_the_seed():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    same = choose_partners(labels, 'mixed_same', seed=3)
    assert (labels[same] == labels).all() and (same != np.arange(len(labels))).all()
    rand = choose_partners(labels, 'mixed_rand', seed=3)
    assert (labels[rand] != labels).all()
    np.testing.assert_array_equal(same, choose_partners(labels, 'mixed_same', seed=3))
    assert any(not np.array_equal(choose_partners(labels, 'mixed_rand', seed=s), rand) for s in range(4, 10))
    with pytest.raises(ValueError, match='single image'):
        choose_partners(np.array([0, 1, 1]), 'mixed_same', seed=0)


def _tiny_dataset(n=6, size=32):
    rng = np.random.default_rng(0)
    images, masks = [], []
    for _ in range(n):
        images.append(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        m = np.zeros((size, size), dtype=np.uint8)
        m[8:24, 8:24] = 255
        masks.append(Image.fromarray(m, mode='L'))
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=CLASSES),
                                  'mask': datasets.Image()})
    return datasets.Dataset.from_dict({'image': images, 'label': [i % 3 for i in range(n)], 'mask': masks},
                                      features=features)


def variant_dataset(dataset, variant, seed=0, synthetic_config=None, split=None):
    """A split turned into one background variant, built in memory, with the same features (`VariantRenderer`)."""
    renderer = VariantRenderer(dataset, variant, np.arange(len(dataset)), seed, synthetic_config, split)
    batch = renderer(renderer.subset[:], range(len(dataset)))
    features = datasets.Features({k: dataset.features[k] for k in ('image', 'label', 'mask')})
    return datasets.Dataset.from_dict(batch, features=features)


def test_variant_dataset_keeps_features_and_the_shown_flowers_mask():
    ds = _tiny_dataset()
    out = variant_dataset(ds, 'no_fg', seed=0)
    assert out.features == ds.features and len(out) == len(ds)
    np.testing.assert_array_equal(np.asarray(out[0]['mask']), np.asarray(ds[0]['mask']))
    assert (np.asarray(out[0]['image'])[8:24, 8:24] == 0).all()
    with pytest.raises(ValueError, match='flower masks'):
        variant_dataset(ds.remove_columns('mask'), 'only_fg')


def _synthetic_split(config, split='test'):
    images, masks, labels = [], [], []
    for i in range(config.num_examples(split)):
        image, mask, label = render_example(config, split, i)
        images.append(image), masks.append(mask), labels.append(label)
    features = datasets.Features({'image': datasets.Image(),
                                  'label': datasets.ClassLabel(names=CLASSES[:config.num_classes]),
                                  'mask': datasets.Image()})
    return datasets.Dataset.from_dict({'image': images, 'label': labels, 'mask': masks}, features=features)


def test_synthetic_variants_have_known_pixels():
    """Each variant, checked against the split's own images and masks (not against the renderer)."""
    config = SyntheticFlowersConfig(num_classes=3, image_size=48, train_per_class=1, validation_per_class=0,
                                    test_per_class=3)
    ds = _synthetic_split(config)
    images = [np.asarray(row['image']) for row in ds]
    masks = [np.asarray(row['mask']) > 127 for row in ds]
    labels = ds['label']
    variant = {v: variant_dataset(ds, v, seed=0, synthetic_config=config, split='test') for v in VARIANTS}
    for i in range(len(ds)):
        fg, bg = masks[i], ~masks[i]
        got = {v: np.asarray(variant[v][i]['image']) for v in VARIANTS}
        for v in VARIANTS:  # every variant keeps the mask of the flower it shows (or showed)
            np.testing.assert_array_equal(np.asarray(variant[v][i]['mask']) > 127, fg)
        np.testing.assert_array_equal(got['original'], images[i])
        np.testing.assert_array_equal(got['only_fg'][fg], images[i][fg])
        assert (got['only_fg'][bg] == 0).all() and (got['no_fg'][fg] == 0).all()
        np.testing.assert_array_equal(got['no_fg'][bg], images[i][bg])
        np.testing.assert_array_equal(got['only_bg_t'][bg], images[i][bg])
        assert (np.abs(got['only_bg_t'][fg].astype(int) - images[i][fg]).sum(-1) > 30).mean() > 0.5  # flower gone
        for v in MIXED_VARIANTS:
            partner = int(choose_partners(labels, v, seed=0)[i])
            assert (labels[partner] == labels[i]) == (v == 'mixed_same')
            np.testing.assert_array_equal(got[v][fg], images[i][fg])
            visible = bg & ~masks[partner]  # where the partner shows its own background
            np.testing.assert_array_equal(got[v][visible], images[partner][visible])
    other = SyntheticFlowersConfig(num_classes=3, image_size=48, train_per_class=1, validation_per_class=0,
                                   test_per_class=3, seed=1)
    with pytest.raises(ValueError, match='differs'):
        variant_dataset(ds, 'only_fg', synthetic_config=other, split='test')


@pytest.fixture(scope='module')
def tiny_model():
    return tiny_vit(CLASSES, random_head=True)  # timm's zero head would predict one class


def test_background_study_schema(tiny_model):
    result = background_study(tiny_model, _tiny_dataset(), batch_size=4, model_id='tiny')
    assert set(result) == {'variants', 'bg_gap', 'num_images', 'seed', 'split', 'model_id', 'method'}
    assert list(result['variants']) == list(VARIANTS)
    for entry in result['variants'].values():
        assert set(entry['f1_per_class']) == set(CLASSES)
        assert entry['macro_f1'] == pytest.approx(np.mean(list(entry['f1_per_class'].values())))
        assert len(entry['fg_lift']) == tiny_model.num_blocks
    v = result['variants']
    assert result['bg_gap'] == pytest.approx(v['mixed_same']['accuracy'] - v['mixed_rand']['accuracy'])
    assert result['num_images'] == 6 and result['method'] == 'composited'
    # the oracle for `original`: the model's own forward on the eval crops of the unchanged images
    pixel_values, labels = image_tensors(tiny_model, _tiny_dataset())
    with torch.no_grad():
        predictions = tiny_model(pixel_values).logits.argmax(-1)
    assert v['original']['accuracy'] == pytest.approx((predictions == labels).float().mean().item())
    assert v['original']['macro_f1'] == pytest.approx(
        f1_score(labels, predictions, average='macro', labels=range(len(CLASSES)), zero_division=0))


def test_study_configs_differ_only_in_background_and_output_dir():
    from analysis.core.resources import config_file
    correlated = json.loads(config_file('study_correlated').read_text())
    random = json.loads(config_file('study_random.json').read_text())
    differ = {k for k in set(correlated) | set(random) if correlated.get(k) != random.get(k)}
    assert differ == {'synthetic_background', 'output_dir'}
    assert (correlated['synthetic_background'], random['synthetic_background']) == ('correlated', 'random')
    finetuned = {bg: json.loads(config_file(f'study_finetuned_{bg}').read_text()) for bg in ('correlated', 'random')}
    assert {k for k in finetuned['correlated'] if finetuned['correlated'][k] != correlated.get(k)} == {
        'pretrained', 'num_train_epochs', 'output_dir'}  # the same data, from the same base's weights
    assert finetuned['correlated']['model_name_or_path'] == correlated['model_name_or_path'] == 'base:shapes'
    assert finetuned['correlated']['pretrained'] and not correlated['pretrained']
    assert {k for k in finetuned['random'] if finetuned['random'][k] != finetuned['correlated'].get(k)} == {
        'synthetic_background', 'output_dir'}


@pytest.mark.e2e
def test_study_quick_end_to_end(tmp_path):
    from analysis.cli import main as cli
    assert cli(['study', '--output_dir', str(tmp_path), '--quick', 'true', '--seeds', '2']) == 0
    saved = study = json.loads((tmp_path / 'study.json').read_text())
    models = ['correlated', 'random', 'finetuned_correlated', 'finetuned_random']
    assert [r['model'] for r in saved['models']] == models
    for checks in saved['checks'].values():
        assert {c['claim'] for c in checks} >= {'larger bg_gap', 'higher only_bg_t accuracy'}
    assert set(saved['checks']) == set(saved['attention_change']) == {'from scratch', 'fine-tuned from the base'}
    for comparison in saved['attention_change'].values():
        assert len(comparison['layers']) == 2  # the quick models have 2 blocks
    assert set(saved['compression']) == {'finetuned_correlated', 'finetuned_random'}
    markdown = (tmp_path / 'study.md').read_text()
    assert study['quick'] is True and 'bg_gap' in markdown and 'moved off' in markdown.lower()
    # --seeds 2: the first seed is the study's own pair (not trained again), the second a new pair
    replication = study['replication']
    assert replication['seeds'] == [42, 1] and not (tmp_path / 'finetuned_random_seed42').exists()
    assert replication['per_seed'][0]['finetuned_random']['bg_gap'] == study['models'][3]['bg_gap']
    assert (tmp_path / 'finetuned_random_seed1' / 'background.json').is_file()
    assert len(replication['layers']) == 2 and '## The fine-tuned pair over 2 training seeds' in markdown
    # The fine-tuned pair started from the (quick) base: its backbone, not random weights.
    for name in models:
        start = json.loads((tmp_path / name / 'run_config.json').read_text())['start']
        assert bool(start['loaded']) == name.startswith('finetuned'), name
    for name in models:
        run = tmp_path / name
        for file in ('background.json', 'importance.json', 'faithfulness.json', 'attention_change.json',
                     'figures/background.png', 'figures/importance.png', 'report.html'):
            assert (run / file).is_file(), f'{name}/{file}'
        background = json.loads((run / 'background.json').read_text())
        assert background['method'] == 'rendered' and set(background['variants']) == set(VARIANTS)
