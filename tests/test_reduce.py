"""The extraction reduces every map as the model computes it: what it keeps must equal what the full maps give."""
import pytest
import torch

from analysis.maps.attention_metrics import distance_sums
from analysis.maps.extract import _Candidates
from analysis.maps.reduce import AttentionReducer
from analysis.maps.rollout import rollout_cls
from analysis.modeling.tokens import TokenLayout
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


@pytest.mark.parametrize('prefix', [1, 5])
def test_distance_sums_equal_a_query_by_query_computation(prefix):
    layout = TokenLayout(prefix, (3, 4), (8, 6))  # a grid that is not square, patches that are not either
    attn = torch.rand(2, 3, layout.num_tokens, layout.num_tokens, generator=torch.Generator().manual_seed(0))
    for ours, theirs in zip(distance_sums(attn, layout), _by_hand_distance_sums(attn, layout)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('reg_tokens, dtype', [(0, torch.float32), (4, torch.float32), (0, torch.bfloat16)])
def test_reduced_maps_equal_those_of_the_full_maps(reg_tokens, dtype):
    """Batches of 3, 5, then 2 images (the reducer's buffer grows once, then serves a smaller batch): CLS rows,
    distance sums and rollout equal those computed from the maps of ``output_attentions``, and so do the logits.
    The rollout's own math (normalising every factor) is checked against the whole product in test_rollout."""
    model = tiny_vit(['a', 'b'], reg_tokens=reg_tokens, depth=3, random_head=True).to(dtype).eval()
    layout = model.token_layout
    reducer = AttentionReducer(layout, model.num_blocks)
    generator = torch.Generator().manual_seed(1)
    close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for batch_size in (3, 5, 2):
        x = torch.randn(batch_size, 3, 32, 32, generator=generator).to(dtype)
        with torch.no_grad():
            full = model(x, output_attentions=True)
            with reducer.capture(model.timm_model):
                logits = model(x).logits
        maps = reducer.result()
        attentions = full.attentions  # L x [B, H, N, N]
        torch.testing.assert_close(logits, full.logits)
        assert maps.cls_query.shape == (batch_size, 3, 3, 1, layout.num_tokens)
        torch.testing.assert_close(layout.cls_to_patches(maps.cls_query),
                                   torch.stack([layout.cls_to_patches(a) for a in attentions], 1))
        torch.testing.assert_close(layout.cls_to_prefix(maps.cls_query),
                                   torch.stack([layout.cls_to_prefix(a) for a in attentions], 1))
        for layer, attn in enumerate(attentions):
            for ours, theirs in zip(maps.distances, _by_hand_distance_sums(attn.float(), layout)):
                torch.testing.assert_close(ours[:, layer], theirs, **close)
        torch.testing.assert_close(maps.rollout, rollout_cls(attentions, layout=layout), **close)


def test_a_pass_with_another_number_of_maps_is_refused():
    model = tiny_vit(['a', 'b'], depth=2).eval()
    reducer = AttentionReducer(model.token_layout, 3)  # the model has 2 blocks
    with torch.no_grad(), reducer.capture(model.timm_model):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match='2 attention maps from 3 blocks'):
        reducer.result()
    with torch.no_grad(), reducer.capture(model.timm_model), pytest.raises(RuntimeError, match='more attention maps'):
        model(torch.randn(1, 3, 32, 32))  # two passes in one capture: 4 maps for 3 blocks
        model(torch.randn(1, 3, 32, 32))


class _Part:
    """What `_Candidates` writes to: the rows it appends, by name."""

    def __init__(self):
        self.rows = {}

    def append(self, name, rows):
        self.rows.setdefault(name, []).append(rows)


def test_candidates_take_the_first_of_each_kind_while_they_have_room():
    """Batch by batch, the images taken are those a selection of 2 per kind takes one image at a time."""
    candidates = _Candidates(_Part(), 'full_', 2, {})
    batches = [[True, True, True, False], [False, True, False, False, True]]
    by_hand = [[0, 1, 3], [0]]  # batch 1: 2 correct (no room for the 3rd), 1 wrong; batch 2: the 2nd wrong only
    start = 0
    for correct, expected in zip(batches, by_hand):
        taken = candidates.taken_of(correct)
        assert taken == expected
        for i in taken:
            candidates.add(start + i, correct[i], {})
        start += len(correct)
    assert candidates.taken_of([True, False]) == []
    assert torch.cat(candidates.part.rows['full_indices'][1:]).tolist() == [0, 1, 3, 4]


def test_distance_sums_reached_first_in_inference_mode_still_serve_autograd():
    """The distance weights are cached per layout: made in inference mode, they must not break a later backward."""
    layout = TokenLayout(1, (2, 3), (4, 4))
    with torch.inference_mode():
        distance_sums(torch.rand(1, 1, 7, 7), layout)
    attn = torch.rand(1, 1, 7, 7, requires_grad=True)
    distance_sums(attn, layout)[0].sum().backward()
    assert attn.grad[0, 0, 1:, 1:].abs().sum() > 0
