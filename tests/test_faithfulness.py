"""Faithfulness of attention maps: curve math, known-answer models, gradient-weighted rollout, the study, rendering."""
import json
import math
import shutil

import datasets
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import conftest
from analysis.core.stats import mean_se
from analysis.modeling.tokens import TokenLayout
from analysis.modeling.vit import TimmViTForImageClassification
from analysis.render import findings, plots
from analysis.render.card import build_card
from analysis.render.figures import render_figures
from analysis.render.report import write_report
from analysis.studies import faithfulness as fa

CLASSES = ['a', 'b', 'c']
TINY_VIT = {'img_size': 16, 'patch_size': 4, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}
LAYOUT = TokenLayout(num_prefix_tokens=1, grid_size=(4, 4), patch_size=(4, 4))  # 16 x 16 px, 16 patches


def tiny_vit(seed: int = 0, classes=CLASSES) -> TimmViTForImageClassification:
    return conftest.tiny_vit(classes, seed=seed, **TINY_VIT)


def tiny_split(num_images: int, seed: int = 0, masks: bool = True, classes=CLASSES) -> datasets.Dataset:
    """Random-colour blocks on noise, a random square as the flower mask, random labels."""
    rng = np.random.default_rng(seed)
    images, labels, mask_images = [], [], []
    for _ in range(num_images):
        image = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        y, x = rng.integers(0, 9, size=2)
        image[y:y + 8, x:x + 8] = rng.integers(0, 256, size=3)
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[y:y + 8, x:x + 8] = 255
        images.append(Image.fromarray(image))
        mask_images.append(Image.fromarray(mask))
        labels.append(int(rng.integers(len(classes))))
    columns = {'image': images, 'label': labels}
    features = {'image': datasets.Image(), 'label': datasets.ClassLabel(names=classes)}
    if masks:
        columns['mask'] = mask_images
        features['mask'] = datasets.Image()
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


# ----------------------------------------------------------------------------------------------
# Curve and AUC math


def test_removal_counts_are_symmetric_and_run_from_none_to_all():
    assert fa.removal_counts(64, 8).tolist() == [0, 8, 16, 24, 32, 40, 48, 56, 64]
    assert fa.removal_counts(10, 4).tolist() == [0, 2, 5, 8, 10]
    for patches, steps in ((7, 2), (7, 3), (196, 10), (5, 5)):
        counts = fa.removal_counts(patches, steps)
        assert counts[0] == 0 and counts[-1] == patches
        assert (counts.diff() > 0).all()
        symmetric = counts + counts.flip(0) == patches  # n_{K-k} = P - n_k
        if patches % 2 and steps % 2 == 0:
            symmetric[steps // 2] = True  # the middle step of an odd number of patches cannot be
        assert symmetric.all()


def auc(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Area under ``[..., K + 1]`` curves over the fractions ``[K + 1]`` (trapezoid rule)."""
    return torch.trapezoid(curves.float(), fractions.float().to(curves.device), dim=-1)


def test_auc_and_statistics_of_hand_made_curves():
    fractions = torch.tensor([0.0, 0.5, 1.0])
    curves = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert auc(curves, fractions).tolist() == pytest.approx([1.0, 0.5, 0.25])
    assert auc(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.2, 1.0])).item() == pytest.approx(0.1)

    stats = mean_se([1.0, 2.0, 3.0, 4.0])
    assert stats['mean'] == pytest.approx(2.5) and stats['num_images'] == 4
    assert stats['se'] == pytest.approx(math.sqrt(5 / 3) / 2)  # sample std / sqrt(n)
    assert mean_se([0.3])['se'] is None
    assert mean_se([1.0, float('nan'), 3.0])['mean'] == pytest.approx(2.0)

    deletion = np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 0.0]])  # AUC 0.5, 0.75
    insertion = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])  # AUC 0.75, 0.25
    scores = fa.method_scores(deletion, insertion, np.array([0.0, 0.5, 1.0]))
    assert scores['deletion_auc']['mean'] == pytest.approx(0.625)
    assert scores['insertion_auc']['mean'] == pytest.approx(0.5)
    assert scores['difference']['mean'] == pytest.approx(-0.125)
    assert scores['difference']['se'] == pytest.approx(np.std([0.25, -0.5], ddof=1) / math.sqrt(2))
    assert scores['deletion_curve'] == pytest.approx([1.0, 0.75, 0.0])


def removed_share_model(x: torch.Tensor) -> torch.Tensor:
    """Class 0's probability is the share of pixels that are not 0 (the baseline), class 1's the rest."""
    removed = (x == 0).all(dim=1).float().mean(dim=(1, 2))  # [n]
    return torch.stack([torch.log(1 - removed + 1e-9), torch.log(removed + 1e-9)], dim=-1)


def test_curves_show_exactly_the_scheduled_number_of_patches():
    images = torch.rand(3, 3, 16, 16) + 0.5
    order = fa.perturbation_order(torch.rand(3, 4, LAYOUT.num_patches))
    deletion, insertion = fa.perturbation_curves(removed_share_model, images, torch.zeros_like(images), order,
                                                 torch.zeros(3, dtype=torch.long), LAYOUT, steps=4, batch_size=7)
    share = fa.removal_counts(16, 4).float() / 16  # removed (deletion) / shown (insertion) at each step
    assert deletion.shape == insertion.shape == (3, 4, 5)
    assert torch.allclose(deletion, (1 - share).expand(3, 4, 5), atol=1e-6)
    assert torch.allclose(insertion, share.expand(3, 4, 5), atol=1e-6)


def test_insertion_of_an_order_is_deletion_of_the_reversed_order_read_backwards():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)
    order = fa.perturbation_order(torch.rand(2, 3, 16))
    target = torch.tensor([0, 2])
    baseline = torch.full_like(images, 0.3)
    _, insertion = fa.perturbation_curves(model, images, baseline, order, target, LAYOUT, 4, 16)
    deletion_reversed, _ = fa.perturbation_curves(model, images, baseline, order.flip(-1), target, LAYOUT, 4, 16)
    assert torch.allclose(insertion, deletion_reversed.flip(-1), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# A hand-built model whose prediction depends only on known patches


KNOWN_PATCHES = [1, 6, 12]  # of the 4 x 4 grid (not all central: the centre prior is another map)


class KnownPatchesModel(torch.nn.Module):
    """Logit of class 0 = 4 * mean of channel 0 over the known patches; class 1 = 0."""

    def forward(self, x):
        inside = fa.patches_to_pixels(torch.isin(torch.arange(16), torch.tensor(KNOWN_PATCHES)).float()[None], LAYOUT)
        value = (x[:, :1] * inside).sum(dim=(1, 2, 3)) / inside.sum()
        return torch.stack([4 * value, torch.zeros_like(value)], dim=-1)


def test_the_oracle_map_has_the_lowest_deletion_auc_and_the_reversed_one_the_highest():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 16, 16) + 0.5  # class 0 predicted everywhere, from the known patches only
    oracle = torch.zeros(16)
    oracle[KNOWN_PATCHES] = 1.0
    maps = torch.stack([oracle, 1 - oracle, fa.centre_prior(LAYOUT)]).expand(5, 3, 16)  # [B, M, P]
    maps = torch.cat([maps, torch.rand(5, 1, 16)], dim=1)  # + a random map
    order = fa.perturbation_order(maps, tiebreak=torch.rand(5, 16))
    target = KnownPatchesModel()(images).argmax(-1)
    assert (target == 0).all()
    deletion, insertion = fa.perturbation_curves(KnownPatchesModel(), images, torch.zeros_like(images), order, target,
                                                 LAYOUT, steps=8, batch_size=32)
    fractions = fa.removal_counts(16, 8).float() / 16
    deletion_auc, insertion_auc = auc(deletion, fractions), auc(insertion, fractions)  # [B, M]
    assert (deletion_auc.argmin(dim=1) == 0).all() and (deletion_auc.argmax(dim=1) == 1).all()
    assert (insertion_auc.argmax(dim=1) == 0).all() and (insertion_auc.argmin(dim=1) == 1).all()
    # the oracle removes all three known patches within the first two steps: chance level from there on
    assert torch.allclose(deletion[:, 0, 2:], torch.full_like(deletion[:, 0, 2:], 0.5), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradient-weighted rollout


def test_gradient_rollout_of_a_two_layer_toy_equals_the_hand_computation():
    """N = 3 tokens (CLS + 2 patches), 2 heads.

    Layer 1: head 0 has gradient 2 and head 1 gradient -1 (clamped away), so cam1 = mean(2 A, 0) = A_head0,
    whose CLS row is [.5, .3, .2]: R1 = I + cam1 has CLS row [1.5, .3, .2], patch rows 2 e_p.
    Layer 2: gradient 1, heads' CLS rows [.2, .8, 0] and [.2, .2, .6] -> cam2 CLS row [.2, .5, .3], patch rows e_p.
    CLS row of R2 = R1 + cam2 @ R1 = [1.5, .3, .2] + [.2 * 1.5, .2 * .3 + .5 * 2, .2 * .2 + .3 * 2]
                                  = [1.8, 1.36, 0.84]  -> patches [1.36, 0.84].
    """
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(1, 2), patch_size=(4, 4))
    eye = torch.eye(3)

    def attention(cls_rows):
        return torch.stack([torch.cat([torch.tensor([row]), eye[1:]]) for row in cls_rows])[None]  # [1, 2, 3, 3]

    a1 = attention([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    g1 = torch.stack([torch.full((3, 3), 2.0), torch.full((3, 3), -1.0)])[None]
    a2 = attention([[0.2, 0.8, 0.0], [0.2, 0.2, 0.6]])
    g2 = torch.ones(1, 2, 3, 3)
    relevance = fa.gradient_rollout([a1, a2], [g1, g2], layout)
    assert torch.allclose(relevance, torch.tensor([[1.36, 0.84]]), atol=1e-6)


def test_target_class_changes_the_gradient_weighted_map_but_not_rollout():
    model = tiny_vit(seed=3)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 16, 16)
    layout = model.token_layout
    maps = {}
    for target in (0, 1):
        names, relevance, _, used = fa.relevance_maps(model.timm_model, pixels, layout, image_ids=[0, 1], seed=0,
                                                      target=torch.tensor([target, target]))
        assert used.tolist() == [target, target]
        maps[target] = dict(zip(names, relevance.unbind(dim=1)))
    assert torch.allclose(maps[0]['rollout'], maps[1]['rollout'])
    assert torch.allclose(maps[0]['layer_1'], maps[1]['layer_1'])
    assert not torch.allclose(maps[0]['gradient_rollout'], maps[1]['gradient_rollout'], atol=1e-4)


def test_each_image_gets_its_own_gradient_in_a_batch():
    model = tiny_vit(seed=4)
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 16, 16)
    layout = model.token_layout
    _, together, logits, target = fa.relevance_maps(model.timm_model, pixels, layout, image_ids=[0, 1, 2], seed=0)
    assert target.tolist() == logits.argmax(-1).tolist()
    for i in range(3):
        _, alone, _, _ = fa.relevance_maps(model.timm_model, pixels[i:i + 1], layout, image_ids=[i], seed=0)
        assert torch.allclose(together[i], alone[0], atol=1e-5)
    assert model.timm_model.blocks[0].attn.fused_attn  # the eager path was switched on for the pass only


# ----------------------------------------------------------------------------------------------
# Maps, baselines, background share


def test_random_map_depends_on_the_image_not_the_batch():
    a = fa.seeded_uniform([3, 7], 16, seed=0)
    b = fa.seeded_uniform([7], 16, seed=0)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(fa.seeded_uniform([7], 16, seed=1)[0], b[0])


def test_centre_prior_ranks_the_middle_patches_first():
    prior = fa.centre_prior(LAYOUT)
    assert set(prior.topk(4).indices.tolist()) == {5, 6, 9, 10}
    assert prior[[5, 6, 9, 10]].unique().numel() == 1 and prior[[0, 3, 12, 15]].tolist() == [0.0] * 4


def test_baseline_images():
    config = {'mean': [0.5, 0.4, 0.3], 'std': [0.25, 0.2, 0.1]}
    pixels = torch.randn(2, 3, 16, 16)
    black = fa.baseline_images(pixels, 'black', LAYOUT, data_config=config)
    assert torch.allclose(black[0, :, 0, 0], torch.tensor([-2.0, -2.0, -3.0]))
    mean = fa.baseline_images(pixels, 'mean', LAYOUT, data_config=config, dataset_mean=torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(mean[1, :, 5, 5], torch.tensor([1.0, 2.0, 3.0]))
    flat = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(fa.baseline_images(flat, 'blur', LAYOUT, data_config=config), flat, atol=1e-6)
    blurred = fa.baseline_images(pixels, 'blur', LAYOUT, data_config=config)
    assert blurred.std() < 0.5 * pixels.std()
    with pytest.raises(ValueError, match='mean, black, blur'):
        fa.baseline_images(pixels, 'grey', LAYOUT, data_config=config)


def test_background_share_by_hand():
    relevance = torch.tensor([[[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]]])  # [1, 2 maps, 4 patches]
    fg = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    order = fa.perturbation_order(relevance)
    share = fa.background_share(relevance, order, fg, top_fraction=0.5)  # top 2 patches
    # map 0: patches 0 (r 4, bg 0) and 1 (r 3, bg 1) -> 3 / 7; map 1 (ties by index): patches 0, 1 -> 1 / 2
    assert share[0].tolist() == pytest.approx([3 / 7, 0.5])


# ----------------------------------------------------------------------------------------------
# The study on a dataset split


@pytest.fixture(scope='module')
def shuffled_label_model():
    """A tiny ViT trained for a few steps on labels drawn at random: nothing to explain, outputs not constant."""
    from analysis.modeling.transforms import eval_transform, model_data_config
    model = tiny_vit(seed=5)
    split = tiny_split(64, seed=1)
    transform = eval_transform(model_data_config(model.timm_model))
    pixels = torch.stack([transform(image.convert('RGB')) for image in split['image']])
    labels = torch.randint(len(CLASSES), (len(pixels),), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model.timm_model(pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope='module')
def study(shuffled_label_model):
    split = tiny_split(72, seed=2)
    return fa.faithfulness_study(shuffled_label_model, split, max_images=64, steps=4, batch_size=128, seed=0,
                                 progress=False, model_id='tiny')


def test_random_map_deletion_and_insertion_agree_within_two_standard_errors(study):
    random = study['methods']['random']
    difference = random['difference']
    assert random['deletion_auc']['num_images'] == 64
    # a random order removes (deletion, step k) and shows (insertion, step K - k) equally many random patches,
    # so the two AUCs agree in expectation; a 2-SE test still fails for about 1 seed in 20 by chance
    assert abs(difference['mean']) <= 2 * difference['se']
    # the probabilities do move under perturbation (not a constant model)
    curve = np.array(random['deletion_curve'])
    assert curve.max() - curve.min() > 0.02


def test_study_schema(study):
    assert list(study['methods']) == ['layer_1', 'layer_2', 'rollout', 'gradient_rollout', 'random', 'centre', 'mask']
    assert study['fractions'] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert study['forwards_per_image'] == 2 * 7 * 3 + 2
    for name, entry in study['methods'].items():
        assert len(entry['deletion_curve']) == len(entry['insertion_curve']) == 5
        outcome = entry['by_outcome']
        assert outcome['correct']['deletion_auc']['num_images'] + outcome['wrong']['deletion_auc']['num_images'] == 64
        assert entry['background_share']['num_images'] == 64
    assert study['num_correct'] == study['methods']['rollout']['by_outcome']['correct']['deletion_auc']['num_images']
    assert len(study['fg_lift']) == 2 and study['highest_fg_lift_layer'] in (0, 1)
    best = study['most_faithful']
    assert best['method'] in ('layer_1', 'layer_2', 'rollout', 'gradient_rollout')
    assert best['method'] == max(best['layer_ranking'] + ['rollout', 'gradient_rollout'],
                                 key=lambda n: study['methods'][n]['difference']['mean'])
    # the ends of every curve are the same images for every map
    assert len({round(e['deletion_curve'][0], 6) for e in study['methods'].values()}) == 1
    assert study['methods']['mask']['background_share']['mean'] < 0.2  # the mask's top patches are flower
    json.dumps(study)  # JSON-serialisable as it is


def test_a_split_without_masks_skips_the_mask_map_and_says_so(shuffled_label_model):
    result = fa.faithfulness_study(shuffled_label_model, tiny_split(4, masks=False), steps=2, progress=False)
    assert 'mask' not in result['methods'] and 'background_share' not in result['methods']['rollout']
    assert 'no flower masks' in result['omitted']['mask']
    assert any('No flower-mask reference' in s for s in findings.faithfulness_sentences(result))


def test_a_model_of_other_classes_has_no_correct_wrong_split(shuffled_label_model):
    other = tiny_split(4, classes=['x', 'y', 'z'])
    result = fa.faithfulness_study(shuffled_label_model, other, steps=2, progress=False, baseline='black')
    assert 'by_outcome' not in result['methods']['rollout'] and 'by_outcome' in result['omitted']


def test_an_unlabeled_split_has_no_correct_wrong_split(shuffled_label_model):
    unlabeled = tiny_split(4).map(lambda row: {'label': -1})
    result = fa.faithfulness_study(shuffled_label_model, unlabeled, steps=2, progress=False)
    assert 'by_outcome' not in result['methods']['rollout'] and result['num_correct'] is None
    assert 'unlabeled' in result['omitted']['by_outcome']


@pytest.mark.parametrize('kwargs, message', [
    ({'steps': 1}, 'at least 2'),
    ({'steps': 17}, 'more than the 16 patches'),
    ({'max_images': 1}, 'at least 2'),
    ({'baseline': 'grey'}, 'mean, black, blur'),
])
def test_bad_options_are_refused(shuffled_label_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fa.faithfulness_study(shuffled_label_model, tiny_split(4), progress=False, **kwargs)


def test_a_split_of_one_image_is_refused(shuffled_label_model):
    with pytest.raises(ValueError, match='at least 2 images for a standard error'):
        fa.faithfulness_study(shuffled_label_model, tiny_split(1), max_images=None, progress=False)


# ----------------------------------------------------------------------------------------------
# Sentences, figure, report and card


def hand_made(difference=None, share=None):
    """A faithfulness.json with known numbers: layer_2 best, rollout runner-up within 2 SE; layer_1 highest fg_lift."""
    difference = difference or {'layer_1': 0.10, 'layer_2': 0.30, 'rollout': 0.28, 'gradient_rollout': 0.20,
                                'random': 0.0}
    share = share or {name: 0.6 for name in difference}

    def entry(name):
        d = difference[name]
        stats = {'deletion_auc': {'mean': 0.5 - d / 2, 'se': 0.01, 'num_images': 50},
                 'insertion_auc': {'mean': 0.5 + d / 2, 'se': 0.01, 'num_images': 50},
                 'difference': {'mean': d, 'se': 0.02, 'num_images': 50},
                 'deletion_curve': [1.0, 0.5 - d, 0.1], 'insertion_curve': [0.1, 0.5 + d, 1.0]}
        return {'kind': fa.method_kind(name), **stats, 'background_share': {'mean': share[name], 'se': 0.01},
                'by_outcome': {'correct': stats, 'wrong': stats}}

    methods = {name: entry(name) for name in difference}
    return {'methods': methods, 'ranking': sorted(methods, key=lambda n: -difference[n]),
            'most_faithful': {'method': 'layer_2', 'runner_up': 'rollout',
                              'margin': {'mean': 0.02, 'se': 0.015, 'num_images': 50},
                              'vs_random': {'mean': 0.30, 'se': 0.03, 'num_images': 50},
                              'background_vs_random': {'mean': share['layer_2'] - share['random'], 'se': 0.01},
                              'best_layer': 'layer_2', 'layer_ranking': ['layer_2', 'layer_1']},
            'fractions': [0.0, 0.5, 1.0], 'steps': 2, 'num_patches': 16, 'baseline': 'mean',
            'baseline_rgb': [0.5, 0.4, 0.3], 'num_images': 50, 'num_correct': 40, 'top_fraction': 0.25,
            'split': 'test', 'background_area': 0.7, 'fg_lift': [1.5, 1.2], 'highest_fg_lift_layer': 0,
            'omitted': {}}


def test_sentences_say_which_map_wins_and_how_sure_that_is():
    text = ' '.join(findings.faithfulness_sentences(hand_made()))
    assert 'Most faithful attention map: layer 2' in text
    assert 'beyond it by 2 standard errors' in text  # vs random: 0.30 > 2 x 0.03
    assert 'Runner-up: attention rollout' in text and 'cannot be told apart' in text  # 0.02 < 2 x 0.015
    assert 'highest fg_lift, layer 1, is not the most faithful: it ranks 2 of 2 layers' in text
    assert 'about as much on the background as a random map' in text
    on_flower = hand_made(share={'layer_1': 0.5, 'layer_2': 0.3, 'rollout': 0.5, 'gradient_rollout': 0.5,
                                 'random': 0.7})
    assert 'it favours the flower' in ' '.join(findings.faithfulness_sentences(on_flower))
    # the attention metrics' highest-fg_lift layer takes precedence over the sampled one
    metrics = {'layers': {'fg_lift': {'mean': [1.0, 2.0]}}}
    assert 'layer 2, is also the most faithful map' in ' '.join(findings.faithfulness_sentences(hand_made(), metrics))


def test_figure_report_and_card(tmp_path, study):
    figure = plots.faithfulness_figure(study)
    assert isinstance(figure, Figure) and len(figure.axes) == 3
    assert len(figure.axes[0].get_lines()) == len(study['methods'])

    run = tmp_path / 'run'
    run.mkdir()
    (run / 'all_results.json').write_text(json.dumps({'test_accuracy': 0.5, 'test_macro_f1': 0.5,
                                                      'test_class_names': CLASSES}))
    (run / 'run_config.json').write_text(json.dumps({'model': {'model_name_or_path': 'vit_tiny_patch16_224'},
                                                     'data': {'dataset_name': 'synthetic'}}))
    html = write_report(run, render_figures(run)).read_text()
    assert 'python -m analysis faithfulness --model' in html  # not run yet: says how
    assert 'not measured' in str(build_card(run))

    (run / 'faithfulness.json').write_text(json.dumps(study))
    html = write_report(run, render_figures(run)).read_text()
    section = html[html.index('<section id="faithfulness">'):]
    section = section[:section.index('</section>')]
    best = fa.method_label(study['most_faithful']['method'])
    assert f'Most faithful attention map: {best}' in section and 'gradient-weighted rollout' in section
    assert 'Correctly and wrongly classified images' in section and 'data:image/png;base64,' in section
    assert (run / 'figures' / 'faithfulness.png').is_file()
    card = str(build_card(run))
    assert '## Which attention map explains the decision' in card and f'Most faithful attention map: {best}' in card
    assert '![Deletion and insertion curves' in card


def test_study_summary_for_the_background_study():
    shares = {'layer_1': 0.5, 'layer_2': 0.3, 'rollout': 0.4, 'gradient_rollout': 0.45, 'random': 0.7}
    summary = fa.faithfulness_summary(hand_made(share=shares))
    assert summary == {'most_faithful': 'layer_2', 'difference': 0.30, 'background_share': 0.3,
                       'background_share_random': 0.7, 'background_area': 0.7}


# ----------------------------------------------------------------------------------------------
# The command line, end to end on the tiny run


@pytest.mark.e2e
def test_faithfulness_command(tiny_run, tmp_path, capsys):
    from analysis.cli import main as cli
    run, _ = tiny_run
    out = tmp_path / 'out'
    assert cli(['faithfulness', '--model', str(run), '--output', str(out), '--steps', '2', '--max_images', '6',
                '--batch_size', '32']) == 0
    result = json.loads((out / 'faithfulness.json').read_text())
    assert result['num_images'] == 6 and result['steps'] == 2 and 'mask' in result['methods']
    assert (out / 'figures' / 'faithfulness.png').is_file()

    assert cli(['faithfulness', '--model', str(run), '--steps', '1']) == 1
    assert cli(['faithfulness', '--model', str(run), '--max_images', '1']) == 1
    assert cli(['faithfulness', '--model', str(run), '--baseline', 'grey']) == 1
    err = capsys.readouterr().err
    assert err.count('error:') == 3 and 'Traceback' not in err

    copy = tmp_path / 'run'
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns('checkpoint-*'))
    shutil.copy(out / 'faithfulness.json', copy / 'faithfulness.json')
    assert cli(['report', str(copy)]) == 0
    assert 'Most faithful attention map' in (copy / 'report.html').read_text()
