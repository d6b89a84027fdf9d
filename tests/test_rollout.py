"""Attention rollout on small hand-made maps whose answer is known."""
import pytest
import torch

from analysis.maps.rollout import attention_rollout, discard_weakest, fuse_heads, rollout_cls
from analysis.modeling.tokens import TokenLayout


def random_attentions(num_layers=3, batch=2, heads=4, tokens=5, dtype=torch.float32, seed=0):
    """Softmax rows, like a real ViT: ``num_layers`` maps ``[B, H, N, N]``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, tokens, tokens, generator=g).softmax(-1).to(dtype)
                 for _ in range(num_layers))


@pytest.mark.parametrize('head_fusion', ['mean', 'max', 'min'])
@pytest.mark.parametrize('discard_ratio', [0.0, 0.5, 0.9])
def test_rows_sum_to_one(head_fusion, discard_ratio):
    rollout = attention_rollout(random_attentions(), head_fusion, discard_ratio)
    assert rollout.shape == (2, 5, 5)
    assert rollout.dtype == torch.float32
    assert torch.allclose(rollout.sum(-1), torch.ones(2, 5), atol=1e-5)
    assert (rollout >= 0).all()


def test_float16_maps_give_float32_rollout():
    rollout = attention_rollout(random_attentions(dtype=torch.float16))
    assert rollout.dtype == torch.float32
    assert torch.allclose(rollout.sum(-1), torch.ones(2, 5), atol=1e-3)


def test_hand_computed_two_layers():
    # Layer 1, two heads, fused by the mean:
    #   head0 = [[.2,.8,0],[0,1,0],[.5,0,.5]], head1 = [[.6,0,.4],[0,0,1],[.5,0,.5]]
    #   mean  = [[.4,.4,.2],[0,.5,.5],[.5,0,.5]]
    #   A1' = .5*mean + .5*I = [[.7,.2,.1],[0,.75,.25],[.25,0,.75]]  (rows already sum to 1)
    layer1 = torch.tensor([[[.2, .8, 0], [0, 1, 0], [.5, 0, .5]],
                           [[.6, 0, .4], [0, 0, 1], [.5, 0, .5]]])[None]  # [1, 2, 3, 3]
    # Layer 2, both heads [[0,.5,.5],[1,0,0],[0,1,0]] -> A2' = [[.5,.25,.25],[.5,.5,0],[0,.5,.5]]
    head = torch.tensor([[0, .5, .5], [1, 0, 0], [0, 1, 0]])
    layer2 = torch.stack([head, head])[None]  # [1, 2, 3, 3]
    # R = A2' @ A1':
    #   row0 = .5*[.7,.2,.1] + .25*[0,.75,.25] + .25*[.25,0,.75] = [.4125, .2875, .3]
    #   row1 = .5*[.7,.2,.1] + .5*[0,.75,.25]                    = [.35, .475, .175]
    #   row2 = .5*[0,.75,.25] + .5*[.25,0,.75]                   = [.125, .375, .5]
    expected = torch.tensor([[.4125, .2875, .3], [.35, .475, .175], [.125, .375, .5]])
    rollout = attention_rollout((layer1, layer2))
    assert torch.allclose(rollout[0], expected, atol=1e-6)
    # The layer order matters: A1' @ A2' is a different matrix.
    assert not torch.allclose(attention_rollout((layer2, layer1))[0], expected, atol=1e-3)

    layout = TokenLayout(1, (1, 2), (4, 4))
    assert torch.allclose(rollout_cls((layer1, layer2), layout=layout)[0], torch.tensor([.2875, .3]), atol=1e-6)


def test_hand_computed_discard_renormalises_and_keeps_cls():
    # One layer, one head, N = 3 (CLS + 2 patches). discard_ratio .5 drops int(2 * .5) = 1 patch per row.
    attn = torch.tensor([[.1, .5, .4],    # CLS is the weakest but is kept; patch 2 (.4) goes
                         [.2, .3, .5],    # patch 1 (.3) goes
                         [.3, .6, .1]])   # patch 2 (.1) goes
    # after the drop: [[.1,.5,0],[.2,0,.5],[.3,.6,0]]
    # .5*A + .5*I:    [[.55,.25,0],[.1,.5,.25],[.15,.3,.5]]   row sums .8, .85, .95
    expected = torch.tensor([[.55 / .8, .25 / .8, 0],
                             [.1 / .85, .5 / .85, .25 / .85],
                             [.15 / .95, .3 / .95, .5 / .95]])
    rollout = attention_rollout((attn[None, None],), discard_ratio=0.5)
    assert torch.allclose(rollout[0], expected, atol=1e-6)


def test_identity_attention_gives_identity():
    eye = torch.eye(6).expand(2, 3, 6, 6)
    for head_fusion in ('mean', 'max', 'min'):
        rollout = attention_rollout((eye, eye, eye), head_fusion, discard_ratio=0.5)
        assert torch.allclose(rollout, torch.eye(6).expand(2, 6, 6), atol=1e-6)


def test_discard_never_zeroes_prefix_columns():
    # Make the prefix columns the weakest entries of every row: a naive drop would remove them.
    attn = torch.full((1, 1, 6, 6), 0.2)
    attn[..., :2] = 0.001
    attn = attn / attn.sum(-1, keepdim=True)
    layout = TokenLayout(2, (2, 2), (8, 8))
    dropped = discard_weakest(fuse_heads(attn), 0.75, num_prefix_tokens=2)  # [1, 6, 6]
    assert (dropped[..., :2] > 0).all()
    assert (dropped[..., 2:] == 0).sum(-1).eq(3).all()  # int(4 * .75) = 3 patches dropped per row
    rollout = attention_rollout((attn, attn), discard_ratio=0.75, layout=layout)
    assert (rollout[..., :2] > 0).all()


def test_max_fusion_at_least_min_fusion():
    attn = random_attentions(num_layers=1)[0]  # [B, H, N, N]
    fused_max, fused_mean, fused_min = (fuse_heads(attn, f) for f in ('max', 'mean', 'min'))
    assert (fused_max >= fused_mean - 1e-7).all() and (fused_mean >= fused_min - 1e-7).all()
    assert (fused_max > fused_min).any()
    assert torch.equal(fused_max[0, 1, 2], attn[0, :, 1, 2].max())


def test_rollout_cls_reads_the_cls_row_after_every_prefix_token():
    # CLS + 1 register token, then 2 patches. One layer, both heads the same; CLS row [0.1, 0.2, 0.3, 0.4]:
    # 0.5 A + 0.5 I gives [0.55, 0.1, 0.15, 0.2] (sums to 1), so the patches get 0.15 and 0.2.
    layout = TokenLayout(2, (1, 2), (16, 16))
    attn = torch.full((1, 2, 4, 4), 0.25)
    attn[:, :, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    cls = rollout_cls([attn], layout=layout)
    assert cls.shape == (1, 2)
    torch.testing.assert_close(cls[0], torch.tensor([0.15, 0.2]))


@pytest.mark.parametrize('bad, message', [
    (dict(attentions=()), 'empty'),
    (dict(head_fusion='median'), 'head_fusion'),
    (dict(discard_ratio=1.0), 'discard_ratio'),
    (dict(discard_ratio=-0.1), 'discard_ratio'),
    (dict(attentions=(torch.ones(1, 1, 5, 5) / 5, torch.ones(1, 2, 5, 5) / 5)), 'same attention shape'),
    (dict(attentions=(torch.ones(1, 5, 5) / 5,)), r'\[B, H, N, N\]'),
    (dict(layout=TokenLayout(1, (3, 3), (4, 4))), 'layout'),
])
def test_bad_inputs_raise(bad, message):
    kwargs = dict(attentions=random_attentions(), head_fusion='mean', discard_ratio=0.0, layout=None)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=message):
        attention_rollout(**kwargs)


@pytest.mark.parametrize('head_fusion, discard_ratio, prefix', [('mean', 0.0, 1), ('max', 0.5, 1), ('mean', 0.3, 5)])
def test_rollout_cls_is_the_cls_row_of_the_whole_rollout(head_fusion, discard_ratio, prefix):
    """rollout_cls carries a row vector from the last layer down; the whole product's CLS row must be the same."""
    layout = TokenLayout(prefix, (3, 4), (8, 8))
    attentions = random_attentions(tokens=layout.num_tokens)
    whole = attention_rollout(attentions, head_fusion, discard_ratio, layout=layout)
    torch.testing.assert_close(rollout_cls(attentions, head_fusion, discard_ratio, layout=layout),
                               layout.cls_to_patches(whole), rtol=1e-5, atol=1e-6)
