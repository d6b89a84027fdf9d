"""Attention metrics against a flower mask, on hand-made tensors whose answer is known."""
import json
import math

import pytest
import torch

from analysis.maps.attention_metrics import (
    AttentionMetricsAccumulator,
    attention_entropy,
    fg_lift,
    fg_ratio,
    flower_area,
    mean_attention_distance,
    pointing_game,
)
from analysis.modeling.tokens import TokenLayout

# A 2 x 2 grid of 10 x 10 pixel patches after one CLS token. Patches (row-major):
#   0 1      centres (y, x): 0 (5, 5), 1 (5, 15), 2 (15, 5), 3 (15, 15)
#   2 3
LAYOUT = TokenLayout(1, (2, 2), (10, 10))
TOP_ROW_FLOWER = torch.tensor([1.0, 1.0, 0.0, 0.0])  # flower covers patches 0 and 1, area 0.5


def close(a, b, tol=1e-6):
    """Recursive approximate equality of JSON-like values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, abs_tol=tol)
    return a == b


# ---------------------------------------------------------------- per-image functions

def test_fg_ratio_all_on_flower_is_one():
    cls_attn = torch.tensor([0.3, 0.7, 0.0, 0.0]).expand(2, 3, 2, 4)  # [B, L, H, P]
    fg = TOP_ROW_FLOWER.expand(2, 4)
    ratio = fg_ratio(cls_attn, fg)
    assert ratio.shape == (2, 3, 2)
    assert torch.allclose(ratio, torch.ones(2, 3, 2))


def test_fg_ratio_hand_computed_and_per_image_broadcast():
    cls_attn = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                             [0.1, 0.2, 0.3, 0.4]])
    fg = torch.tensor([[1.0, 0.5, 0.0, 1.0],    # (.1 + .1 + 0 + .4) / 1 = .6
                       [0.0, 0.0, 1.0, 0.0]])   # .3
    assert torch.allclose(fg_ratio(cls_attn, fg), torch.tensor([0.6, 0.3]))
    # Unnormalised rows give the same share.
    assert torch.allclose(fg_ratio(cls_attn * 0.2, fg), torch.tensor([0.6, 0.3]))
    # [B, L, P]: every layer of image b uses mask b.
    stacked = torch.stack([cls_attn, cls_attn], dim=1)  # [2, 2, 4]
    assert torch.allclose(fg_ratio(stacked, fg), torch.tensor([[0.6, 0.6], [0.3, 0.3]]))


def test_uniform_attention_has_lift_one_and_entropy_one():
    fg = torch.tensor([[1.0, 0.5, 0.25, 0.0]])  # area .4375
    uniform = torch.full((1, 2, 3, 4), 0.2)  # [B, L, H, P]; sums to .8 (the rest on CLS)
    assert torch.allclose(flower_area(fg), torch.tensor([0.4375]))
    assert torch.allclose(fg_lift(uniform, fg), torch.ones(1, 2, 3))
    assert torch.allclose(attention_entropy(uniform), torch.ones(1, 2, 3))


def test_fg_lift_above_one_when_flower_favoured():
    cls_attn = torch.tensor([[0.4, 0.4, 0.1, 0.1]])
    assert torch.allclose(fg_lift(cls_attn, TOP_ROW_FLOWER[None]), torch.tensor([0.8 / 0.5]))


def test_one_hot_on_background_misses_and_has_zero_entropy():
    on_background = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    on_flower = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    fg = TOP_ROW_FLOWER[None]
    assert not pointing_game(on_background, fg).item()
    assert pointing_game(on_flower, fg).item()
    assert attention_entropy(on_background).item() == pytest.approx(0.0, abs=1e-7)
    # Half on two patches: entropy log 2 / log 4.
    assert attention_entropy(torch.tensor([0.5, 0.0, 0.0, 0.5])).item() == pytest.approx(0.5)


def test_pointing_game_threshold():
    cls_attn = torch.tensor([[0.1, 0.7, 0.1, 0.1]])
    fg = torch.tensor([[1.0, 0.4, 1.0, 1.0]])  # the top patch is only 40 % flower
    assert not pointing_game(cls_attn, fg).item()
    assert pointing_game(cls_attn, fg, threshold=0.4).item()


def _patch_attention(targets, cls_share=0.0):
    """[N, N] map of LAYOUT where patch query q attends to patch key targets[q] (+ cls_share to CLS)."""
    n = LAYOUT.num_tokens
    attn = torch.zeros(n, n)
    attn[0] = 1.0 / n  # the CLS query has no position; it must not matter
    for q, k in enumerate(targets):
        attn[1 + q, 0] = cls_share
        attn[1 + q, 1 + k] = 1.0 - cls_share
    return attn


def test_mean_attention_distance_hand_made_grid():
    right_neighbour = _patch_attention([1, 0, 3, 2], cls_share=0.5)  # horizontal neighbours, 10 px
    diagonal = _patch_attention([3, 2, 1, 0])  # 10 * sqrt(2) px
    itself = _patch_attention([0, 1, 2, 3], cls_share=0.3)  # 0 px
    attn = torch.stack([right_neighbour, diagonal, itself])[None]  # [1, 3, N, N]
    distance = mean_attention_distance(attn, LAYOUT)
    assert distance.shape == (1, 3)
    assert torch.allclose(distance, torch.tensor([[10.0, 10.0 * math.sqrt(2), 0.0]]), atol=1e-5)
    # Uniform over all 4 patches: from any corner, (0 + 10 + 10 + 10 sqrt 2) / 4.
    uniform = torch.full((1, 1, 5, 5), 0.2)
    assert mean_attention_distance(uniform, LAYOUT).item() == pytest.approx((20 + 10 * math.sqrt(2)) / 4, abs=1e-5)


def test_mean_attention_distance_rejects_wrong_layout():
    with pytest.raises(ValueError, match='layout'):
        mean_attention_distance(torch.full((1, 1, 10, 10), 0.1), LAYOUT)


# ---------------------------------------------------------------- streaming accumulator

def _batch(seed, batch=3, layers=2, heads=2, with_masks=True):
    """Random but valid inputs for the accumulator, like one batch of a real run."""
    g = torch.Generator().manual_seed(seed)
    n = LAYOUT.num_tokens
    attentions = tuple(torch.randn(batch, heads, n, n, generator=g).softmax(-1) for _ in range(layers))
    cls_attention = torch.stack([LAYOUT.cls_to_patches(a) for a in attentions], dim=1)  # [B, L, H, P]
    labels = torch.randint(0, 3, (batch,), generator=g)
    fg = torch.rand(batch, LAYOUT.num_patches, generator=g) if with_masks else None
    rollout = torch.rand(batch, LAYOUT.num_patches, generator=g)
    return attentions, cls_attention, labels, fg, rollout


def _accumulator(layers=2, heads=2):
    return AttentionMetricsAccumulator(LAYOUT, layers, heads, ['rose', 'tulip', 'daisy'])


def test_hand_made_batch_known_metrics():
    # Two images, one layer, two heads. Both images: flower on the top row, except image 1 whose
    # flower covers only patch 0 (area .25).
    fg = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                       [1.0, 0.0, 0.0, 0.0]])
    cls_attention = torch.tensor([
        [[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]],    # image 0: head 0 on flower, head 1 on background
        [[[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]]],  # image 1: head 0 uniform, head 1 background
    ])  # [B=2, L=1, H=2, P=4]
    acc = AttentionMetricsAccumulator(LAYOUT, 1, 2, ['rose', 'tulip'])
    acc.update(None, cls_attention, torch.tensor([0, 1]), fg_fraction=fg)
    m = acc.compute()

    assert m['num_images'] == 2 and m['has_masks'] is True
    assert m['flower_area'] == pytest.approx((0.5 + 0.25) / 2)
    layers = m['layers']
    # per head: head 0 ratios (1, .25) -> .625; head 1 (0, 0) -> 0
    assert close(layers['fg_ratio']['per_head'], [[0.625, 0.0]])
    # head-averaged maps: image 0 [.5, 0, 0, .5] -> .5; image 1 [.125, .125, .625, .125] -> .125
    assert close(layers['fg_ratio']['mean'], [(0.5 + 0.125) / 2])
    # fg_lift is the ratio of means .625 / .375, not the mean of per-image lifts (2 + 1) / 2.
    assert close(layers['fg_lift']['per_head'], [[0.625 / 0.375, 0.0]])
    assert close(layers['fg_lift']['mean'], [0.3125 / 0.375])
    # pointing: head 0 hits on image 0, on image 1 argmax of a tie is patch 0 (flower); head 1 never.
    assert close(layers['pointing_game']['per_head'], [[1.0, 0.0]])
    # head-averaged: image 0 tie between patch 0 and 3 -> patch 0 (hit); image 1 -> patch 2 (miss).
    assert close(layers['pointing_game']['mean'], [0.5])
    # entropy per head: head 0 (0, 1) -> .5; head 1 (0, 0) -> 0. The mean map is not the mean of heads:
    # image 0's averaged map [.5, 0, 0, .5] has entropy .5, not 0.
    assert close(layers['entropy']['per_head'], [[0.5, 0.0]])
    p1 = torch.tensor([0.125, 0.125, 0.625, 0.125])
    entropy1 = (-(p1 * p1.log()).sum() / math.log(4)).item()
    assert close(layers['entropy']['mean'], [(0.5 + entropy1) / 2])
    # per class: one image each, head-averaged map
    assert close(m['per_class'], {
        'rose': {'num_images': 1, 'fg_ratio': [0.5], 'fg_lift': [1.0], 'pointing_game': [1.0]},
        'tulip': {'num_images': 1, 'fg_ratio': [0.125], 'fg_lift': [0.5], 'pointing_game': [0.0]},
    })
    assert 'mean_attention_distance' in m['omitted'] and 'mean_attention_distance' not in layers
    assert 'rollout' in m['omitted'] and 'rollout' not in m


def test_mean_attention_distance_per_head_and_mean():
    right = _patch_attention([1, 0, 3, 2])  # 10 px
    diagonal = _patch_attention([3, 2, 1, 0])  # 10 sqrt 2 px
    attn = torch.stack([right, diagonal])[None]  # [1, 2, N, N]
    acc = AttentionMetricsAccumulator(LAYOUT, 1, 2, ['rose'])
    acc.update((attn,), LAYOUT.cls_to_patches(attn)[:, None], torch.tensor([0]))
    mad = acc.compute()['layers']['mean_attention_distance']
    assert close(mad['per_head'], [[10.0, 10.0 * math.sqrt(2)]], tol=1e-4)
    assert close(mad['mean'], [5.0 + 5.0 * math.sqrt(2)], tol=1e-4)


def test_two_batches_equal_one_batch():
    first, second = _batch(seed=1, batch=3), _batch(seed=2, batch=4)
    streamed = _accumulator()
    streamed.update(*first)
    streamed.update(*second)
    whole = _accumulator()
    whole.update(tuple(torch.cat([a, b]) for a, b in zip(first[0], second[0])),
                 *(torch.cat([a, b]) for a, b in zip(first[1:], second[1:])))
    m_streamed, m_whole = streamed.compute(), whole.compute()
    assert m_streamed['num_images'] == 7
    assert close(m_streamed, m_whole, tol=1e-6)
    # Also independent of batch order.
    reordered = _accumulator()
    reordered.update(*second)
    reordered.update(*first)
    assert close(reordered.compute(), m_whole, tol=1e-6)


def test_per_class_split():
    attentions, cls_attention, _, fg, rollout = _batch(seed=3, batch=3, layers=1)
    labels = torch.tensor([0, 1, 1])  # one rose, two tulips, no daisy
    acc = _accumulator(layers=1)
    acc.update(attentions, cls_attention, labels, fg, rollout)
    per_class = acc.compute()['per_class']
    assert set(per_class) == {'rose', 'tulip'}  # classes without images are left out
    assert per_class['rose']['num_images'] == 1 and per_class['tulip']['num_images'] == 2
    ratio = fg_ratio(cls_attention.mean(dim=2), fg)[:, 0]  # [B], head-averaged map, layer 0
    area = flower_area(fg)
    assert per_class['rose']['fg_ratio'] == pytest.approx([ratio[0].item()])
    assert per_class['tulip']['fg_ratio'] == pytest.approx([ratio[1:].mean().item()])
    assert per_class['tulip']['fg_lift'] == pytest.approx([(ratio[1:].mean() / area[1:].mean()).item()])


def test_rollout_metrics():
    cls_attention = torch.full((2, 1, 1, 4), 0.25)
    fg = TOP_ROW_FLOWER.expand(2, 4)
    rollout = torch.tensor([[0.7, 0.1, 0.1, 0.1],     # ratio .8, hit
                            [0.1, 0.1, 0.1, 0.7]])    # ratio .2, miss
    acc = AttentionMetricsAccumulator(LAYOUT, 1, 1, ['rose'])
    acc.update(None, cls_attention, torch.tensor([0, 0]), fg, rollout)
    r = acc.compute()['rollout']
    assert r['fg_ratio'] == pytest.approx(0.5)
    assert r['fg_lift'] == pytest.approx(1.0)
    assert r['pointing_game'] == pytest.approx(0.5)
    assert r['entropy'] == pytest.approx(attention_entropy(rollout[0]).item())


def test_without_masks_mask_metrics_are_absent():
    acc = _accumulator()
    acc.update(*_batch(seed=4, with_masks=False))
    m = acc.compute()
    assert m['has_masks'] is False
    for key in ('fg_ratio', 'fg_lift', 'pointing_game'):
        assert key not in m['layers'] and key not in m['rollout']
        assert 'no flower masks' in m['omitted'][key]
    assert 'flower_area' not in m and 'per_class' not in m
    assert set(m['layers']) == {'entropy', 'mean_attention_distance'}
    assert set(m['rollout']) == {'entropy'}
    json.dumps(m)  # plain JSON


def test_output_schema_is_plain_json():
    acc = _accumulator(layers=3, heads=2)
    acc.update(*_batch(seed=5, layers=3))
    m = json.loads(json.dumps(acc.compute()))
    assert (m['num_layers'], m['num_heads']) == (3, 2)
    for metric in ('fg_ratio', 'fg_lift', 'pointing_game', 'entropy', 'mean_attention_distance'):
        assert len(m['layers'][metric]['mean']) == 3
        assert [len(row) for row in m['layers'][metric]['per_head']] == [2, 2, 2]
    assert set(m['rollout']) == {'fg_ratio', 'fg_lift', 'pointing_game', 'entropy'}
    assert m['omitted'] == {}


def test_inconsistent_batches_and_bad_shapes_raise():
    acc = _accumulator()
    with pytest.raises(ValueError, match='no images'):
        acc.compute()
    acc.update(*_batch(seed=6))
    with pytest.raises(ValueError, match='masks'):
        acc.update(*_batch(seed=7, with_masks=False))
    attentions, cls_attention, labels, fg, rollout = _batch(seed=8)
    with pytest.raises(ValueError, match='cls_attention'):
        acc.update(attentions, cls_attention[:, :1], labels, fg, rollout)
    with pytest.raises(ValueError, match='labels'):
        acc.update(attentions, cls_attention, labels + 3, fg, rollout)
    with pytest.raises(ValueError, match='fg_fraction'):
        acc.update(attentions, cls_attention, labels, fg[:, :2], rollout)
    with pytest.raises(ValueError, match='one per layer'):
        acc.update(attentions[:1], cls_attention, labels, fg, rollout)
