"""The extraction reduces every map as the model computes it: what it keeps must equal what the full maps give."""
import pytest
import torch

from analysis.maps.attention_metrics import distance_sums
from analysis.maps.reduce import AttentionReducer
from analysis.maps.rollout import rollout_cls
from conftest import tiny_vit


def _by_hand_distance_sums(attn, layout):
    """``sum_k a_qk d_qk`` and ``sum_k a_qk`` over the patch keys of every patch query, one query at a time."""
    p, centers = layout.num_prefix_tokens, layout.patch_centers()
    numerator = torch.zeros(*attn.shape[:2], layout.num_patches)
    denominator = torch.zeros_like(numerator)
    for q in range(layout.num_patches):
        row = attn[:, :, p + q, p:]  # [B, H, P]
        numerator[..., q] = (row * (centers - centers[q]).norm(dim=-1)).sum(-1)
        denominator[..., q] = row.sum(-1)
    return numerator, denominator


@pytest.mark.parametrize('reg_tokens', [0, 4])
def test_distance_sums_equal_a_query_by_query_computation(reg_tokens):
    model = tiny_vit(['a', 'b'], reg_tokens=reg_tokens, depth=1)
    layout = model.token_layout
    attn = torch.rand(2, 3, layout.num_tokens, layout.num_tokens, generator=torch.Generator().manual_seed(0))
    for ours, theirs in zip(distance_sums(attn, layout), _by_hand_distance_sums(attn, layout)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('reg_tokens', [0, 4])
def test_reduced_maps_equal_those_of_the_full_maps(reg_tokens):
    """Two batches, the second smaller (the reducer's buffer is reused): CLS rows, distance sums and rollout
    equal those computed from the maps of ``output_attentions``, and the predictions are the same."""
    model = tiny_vit(['a', 'b'], reg_tokens=reg_tokens, depth=3, random_head=True).eval()
    layout = model.token_layout
    reducer = AttentionReducer(layout, model.num_blocks)
    generator = torch.Generator().manual_seed(1)
    for batch_size in (5, 3):
        x = torch.randn(batch_size, 3, 32, 32, generator=generator)
        with torch.no_grad():
            full = model(x, output_attentions=True)
            with reducer.capture(model.timm_model) as layers:
                logits = model(x).logits
        maps = reducer.result(layers)
        attentions = full.attentions  # L x [B, H, N, N]
        torch.testing.assert_close(logits, full.logits)
        assert maps.cls_query.shape == (batch_size, 3, 3, 1, layout.num_tokens)
        torch.testing.assert_close(layout.cls_to_patches(maps.cls_query),
                                   torch.stack([layout.cls_to_patches(a) for a in attentions], 1))
        torch.testing.assert_close(layout.cls_to_prefix(maps.cls_query),
                                   torch.stack([layout.cls_to_prefix(a) for a in attentions], 1))
        for layer, attn in enumerate(attentions):
            for ours, theirs in zip(maps.distances, _by_hand_distance_sums(attn, layout)):
                torch.testing.assert_close(ours[:, layer], theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(maps.rollout, rollout_cls(attentions, layout=layout), rtol=1e-5, atol=1e-6)


def test_a_pass_that_misses_blocks_is_refused():
    model = tiny_vit(['a', 'b'], depth=2).eval()
    reducer = AttentionReducer(model.token_layout, 3)  # the model has 2 blocks
    with torch.no_grad(), reducer.capture(model.timm_model) as layers:
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match='2 attention maps from 3 blocks'):
        reducer.result(layers)
