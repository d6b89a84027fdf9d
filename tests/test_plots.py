"""Tests of analysis.render.plots: known-answer upsampling, panel layout of each figure, PNG writing."""
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from analysis.modeling.tokens import TokenLayout
from analysis.render import plots

# 1 prefix token, 2 x 2 patches of 8 px -> 16 x 16 images, P = 4.
LAYOUT = TokenLayout(num_prefix_tokens=1, grid_size=(2, 2), patch_size=(8, 8))
E, L, H, P = 2, 3, 2, LAYOUT.num_patches


def _image_axes(fig: Figure) -> list:
    """Axes that show an image (colorbars excluded)."""
    return [ax for ax in fig.axes if ax.images and ax.get_label() != '<colorbar>']


def _titles(fig: Figure) -> list:
    return [ax.get_title() for ax in fig.axes]


def _metrics(has_masks: bool, fg_lift=(1.2, 1.5, 0.7)) -> dict:
    def entry(mean):
        return {'mean': list(mean), 'per_head': [[m, m] for m in mean]}
    layers = {'entropy': entry([0.9, 0.8, 0.6]), 'mean_attention_distance': entry([4.0, 6.0, 9.0])}
    out = {'num_images': 6, 'num_layers': L, 'num_heads': H, 'has_masks': has_masks, 'layers': layers,
           'omitted': {}}
    if has_masks:
        out['flower_area'] = 0.3
        layers['fg_ratio'] = entry([0.4, 0.5, 0.2])
        layers['fg_lift'] = entry(fg_lift)
        layers['pointing_game'] = entry([0.5, 0.8, 0.3])
    else:
        out['omitted'] = {m: 'the dataset has no flower masks' for m in ('fg_ratio', 'fg_lift', 'pointing_game')}
    return out


def test_upsample_to_image_puts_each_patch_on_its_pixels():
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(2, 3), patch_size=(2, 1))
    up = plots.upsample_to_image(torch.tensor([1., 2., 3., 4., 5., 6.]), layout)
    expected = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]], dtype=np.float32)
    np.testing.assert_array_equal(up, expected)


def test_as_numpy_turns_json_none_into_nan_and_half_into_float32():
    np.testing.assert_array_equal(np.isnan(plots._as_numpy([1.0, None])), [False, True])
    assert plots._as_numpy(torch.ones(2, dtype=torch.float16)).dtype == np.float32


def _grid_labels(fig: Figure) -> tuple:
    ax = fig.axes[0]
    return [t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()]


def _grid_panel(fig: Figure, row: int, col: int, size: int = 16) -> np.ndarray:
    """Panel (row, col) of a one-picture grid figure; panels of `size` px, `plots.panel_gap` px apart."""
    canvas = np.asarray(fig.axes[0].images[0].get_array())
    step = size + plots.panel_gap(size)
    return canvas[row * step:row * step + size, col * step:col * step + size]


def test_layer_grid_has_one_row_per_image_and_image_layers_rollout_columns(tmp_path):
    images = torch.randint(0, 255, (E, 16, 16, 3), dtype=torch.uint8)
    cls_maps = torch.rand(E, L, P).half()
    rollout = torch.rand(E, P)
    fig = plots.layer_grid(images, cls_maps, rollout, LAYOUT, ['true: a / pred: a \u2713', 'x'])
    assert len(fig.axes) == 1  # one picture, not one axes per map
    gap = plots.panel_gap(16)
    assert fig.axes[0].images[0].get_array().shape == (E * 16 + (E - 1) * gap, (L + 2) * 16 + (L + 1) * gap, 3)
    assert _grid_labels(fig) == (['image', 'L1', 'L2', 'L3', 'rollout'], ['true: a / pred: a \u2713', 'x'])
    pixels = images.numpy()
    np.testing.assert_allclose(_grid_panel(fig, 1, 0), pixels[1] / 255.0, atol=1e-6)
    np.testing.assert_allclose(_grid_panel(fig, 1, 2), plots.panel(pixels[1], cls_maps[1, 1], LAYOUT), atol=1e-6)
    np.testing.assert_allclose(_grid_panel(fig, 0, L + 1), plots.panel(pixels[0], rollout[0], LAYOUT), atol=1e-6)
    path = plots.save_figure(fig, tmp_path / 'sub' / 'grid.png')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert [p.name for p in path.parent.iterdir()] == ['grid.png']  # no temporary file left behind


def test_panel_scales_each_map_to_its_own_maximum_and_blends_it_over_the_image():
    import matplotlib
    cmap = matplotlib.colormaps[plots.ATTENTION_CMAP]
    values = torch.tensor([0.1, 0.4, 0.2, 0.05])  # patch 1 (top right) is the maximum
    alone = plots.panel(None, values, LAYOUT)
    np.testing.assert_allclose(alone, plots.panel(None, 10 * values, LAYOUT))  # scale-free
    np.testing.assert_allclose(alone[0, 8], cmap(1.0)[:3])  # the top patch gets the top colour
    np.testing.assert_allclose(alone[8, 0], cmap(0.5)[:3])  # 0.2 / 0.4
    image = np.full((16, 16, 3), 255, np.uint8)
    over = plots.panel(image, values, LAYOUT)
    np.testing.assert_allclose(over, (1 - plots.OVERLAY_ALPHA) + plots.OVERLAY_ALPHA * alone)


def test_layer_grid_rejects_images_that_do_not_match_the_layout():
    images = np.zeros((1, 20, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match='patch grid covers'):
        plots.layer_grid(images, np.random.rand(1, L, P), np.random.rand(1, P), LAYOUT, ['x'])


def test_layer_grid_rejects_mismatched_counts():
    with pytest.raises(ValueError, match='one of each per example'):
        plots.layer_grid(np.zeros((2, 16, 16, 3), np.uint8), np.random.rand(2, L, P), np.random.rand(2, P),
                         LAYOUT, ['only one title'])


def test_head_maps_has_image_each_head_and_mean():
    fig = plots.head_maps(np.zeros((16, 16, 3), np.uint8), torch.rand(H, P), LAYOUT, layer=2)
    titles = [t for t in _titles(fig) if t]
    assert titles == ['image', 'head 1', 'head 2', 'mean']
    assert 'Layer 2' in fig._suptitle.get_text()


def test_class_mean_maps_has_classes_as_rows_layers_as_columns():
    maps = np.random.rand(3, L, P)
    fig = plots.class_mean_maps(maps, ['a', 'b', 'c'], LAYOUT)
    assert len(fig.axes) == 1
    assert _grid_labels(fig) == (['L1', 'L2', 'L3'], ['a', 'b', 'c'])
    np.testing.assert_allclose(_grid_panel(fig, 2, 1), plots.panel(None, maps[2, 1], LAYOUT), atol=1e-6)
    with pytest.raises(ValueError, match='one name per map'):
        plots.class_mean_maps(np.random.rand(3, L, P), ['a'], LAYOUT)


def _dashed_levels(ax) -> list:
    return [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == '--']


def test_depth_curves_with_masks_draws_four_metrics_with_reference_lines():
    fig = plots.depth_curves(_metrics(has_masks=True))
    titles = _titles(fig)
    assert titles == [plots.DEPTH_METRIC_LABELS[m] for m in
                      ('fg_lift', 'pointing_game', 'entropy', 'mean_attention_distance')]
    assert _dashed_levels(fig.axes[0]) == [1.0]  # no preference
    assert _dashed_levels(fig.axes[1]) == [pytest.approx(0.3)]  # chance = flower area
    # H thin head lines + the thick head-mean line
    mean_line = [line for line in fig.axes[0].get_lines() if line.get_label() == 'head-mean map'][0]
    np.testing.assert_allclose(mean_line.get_ydata(), [1.2, 1.5, 0.7])
    np.testing.assert_array_equal(mean_line.get_xdata(), [1, 2, 3])


def test_depth_curves_without_masks_draws_entropy_and_distance_and_says_why():
    fig = plots.depth_curves(_metrics(has_masks=False))
    drawn = [ax.get_title() for ax in fig.axes if ax.get_lines()]
    assert drawn == [plots.DEPTH_METRIC_LABELS['entropy'], plots.DEPTH_METRIC_LABELS['mean_attention_distance']]
    text = ' '.join(t.get_text() for t in fig.texts)
    assert 'fg_lift omitted: the dataset has no flower masks' in text


def test_depth_curves_accepts_undefined_fg_lift():
    fig = plots.depth_curves(_metrics(has_masks=True, fg_lift=(1.2, None, 0.7)))
    mean_line = [line for line in fig.axes[0].get_lines() if line.get_label() == 'head-mean map'][0]
    assert np.isnan(mean_line.get_ydata()[1])


def test_confusion_matrix_figure_writes_cell_values_and_checks_shape():
    fig = plots.confusion_matrix_figure([[3, 1], [0, 2]], ['daisy', 'rose'])
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ['0', '1', '2', '3']
    with pytest.raises(ValueError, match='2 class names'):
        plots.confusion_matrix_figure([[1, 0, 0]] * 3, ['daisy', 'rose'])


def test_f1_bars_sorts_worst_class_to_the_bottom():
    fig = plots.f1_bars({'rose': 0.9, 'tulip': 0.5, 'daisy': 0.7})
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ['tulip', 'daisy', 'rose']


def test_background_figure_draws_accuracy_bars_and_optional_fg_lift():
    background = {'variants': {'original': {'accuracy': 0.9, 'macro_f1': 0.88, 'fg_lift': [1.1, 1.3, 0.9]},
                               'mixed_rand': {'accuracy': 0.6, 'macro_f1': 0.55, 'fg_lift': [1.0, 1.2, 0.8]}},
                  'bg_gap': 0.21}
    fig = plots.background_figure(background)
    assert len(fig.axes) == 2
    assert 'bg_gap 0.21' in fig.axes[0].get_title()
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([0.9, 0.6, 0.88, 0.55])
    only_acc = plots.background_figure({'variants': {'original': {'accuracy': 0.9}}})
    assert len(only_acc.axes) == 1
    with pytest.raises(ValueError, match='variants'):
        plots.background_figure({})


def test_importance_figure_draws_a_panel_per_key_present():
    full = {'probe_accuracy': [0.3, 0.7, 0.9], 'layer_skip_accuracy': [0.5, 0.85, 0.88],
            'truncate_accuracy': [0.9, 0.7, 0.3], 'head_ablation_accuracy': [[0.89, 0.9]] * L,
            'baseline_accuracy': 0.9,
            'greedy_pruning': {'order': [[0, 1], [2, 0], [1, 1]], 'accuracy': [0.9, 0.9, 0.85],
                               'num_prunable': 2, 'num_heads': 6}}
    fig = plots.importance_figure(full)
    drawn = [ax for ax in fig.axes if ax.axison and ax.get_label() != '<colorbar>']
    assert len(drawn) == 5
    pruning = plots.importance_figure({'greedy_pruning': full['greedy_pruning']})
    # accuracy[i] is measured after removing i + 1 heads
    np.testing.assert_array_equal(pruning.axes[0].get_lines()[0].get_xdata(), [1, 2, 3])
    assert pruning.axes[0].get_xlabel() == 'heads removed (of 6)'
    with pytest.raises(ValueError, match='nothing to draw'):
        plots.importance_figure({'baseline_accuracy': 0.9})


def test_depth_curves_names_every_omitted_metric_with_its_reason():
    metrics = _metrics(has_masks=False)
    del metrics['layers']['mean_attention_distance']
    metrics['omitted']['mean_attention_distance'] = 'no full attention maps were given'
    fig = plots.depth_curves(metrics)
    assert [ax.get_title() for ax in fig.axes] == [plots.DEPTH_METRIC_LABELS['entropy']]
    text = ' '.join(t.get_text() for t in fig.texts)
    assert 'mean_attention_distance omitted: no full attention maps were given' in text
