"""Layer skipping, head ablation and probes on a tiny random ViT; the importance study's JSON schema."""
import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from analysis.modeling.timm_internals import ablate_heads, skip_blocks
from analysis.studies import importance
from analysis.studies.importance import cls_features, greedy_pruning, image_tensors, importance_study, linear_probe
from conftest import tiny_vit

CLASSES = ['a', 'b', 'c']
DEPTH, HEADS, WIDTH = 3, 3, 48


@pytest.fixture(scope='module')
def model():
    # timm zero-initialises the head; random weights make every logit depend on the features
    return tiny_vit(CLASSES, random_head=True, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)


@pytest.fixture(scope='module')
def pixels():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _logits(model, x):
    with torch.inference_mode():
        return model.timm_model(x)


def test_skipping_a_block_changes_the_output_and_is_undone(model, pixels):
    before = _logits(model, pixels)
    with skip_blocks(model, [1]):
        assert isinstance(model.timm_model.blocks[1], torch.nn.Identity)
        skipped = _logits(model, pixels)
    assert not torch.allclose(before, skipped, atol=1e-4)
    torch.testing.assert_close(_logits(model, pixels), before)


def test_skipping_all_blocks_gives_the_patch_embedding_only_answer(model, pixels):
    vit = model.timm_model
    with torch.inference_mode():  # timm's forward with no blocks, step by step
        x = vit.patch_embed(pixels)  # [B, P, D]
        x = vit._pos_embed(x)  # [B, 1 + P, D]: CLS prepended, position embedding added
        x = vit.norm_pre(vit.patch_drop(x))
        x = vit.norm(x)
        expected = vit.head(vit.head_drop(vit.fc_norm(x[:, 0])))  # CLS pooling
    with skip_blocks(model, range(DEPTH)):
        got = _logits(model, pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(model, pixels), expected, atol=1e-4)


def test_blocks_and_hooks_are_restored_after_an_exception(model, pixels):
    before = _logits(model, pixels)
    block = model.timm_model.blocks[0]
    with pytest.raises(RuntimeError):
        with skip_blocks(model, [0]):
            raise RuntimeError('boom')
    assert model.timm_model.blocks[0] is block
    with pytest.raises(RuntimeError):
        with ablate_heads(model, [(0, 0), (2, 1)]):
            raise RuntimeError('boom')
    assert not model.timm_model.blocks[0].attn.proj._forward_pre_hooks
    torch.testing.assert_close(_logits(model, pixels), before)


def test_ablating_a_head_changes_the_output_and_ablating_none_does_not(model, pixels):
    before = _logits(model, pixels)
    with ablate_heads(model, []):
        torch.testing.assert_close(_logits(model, pixels), before)
    with ablate_heads(model, [(1, 2)]):
        ablated = _logits(model, pixels)
    assert not torch.allclose(before, ablated, atol=1e-4)


def test_ablating_a_head_zeroes_exactly_its_slice_of_the_projection_input(model):
    attn = model.timm_model.blocks[0].attn
    d = attn.head_dim
    x = torch.randn(2, 5, HEADS * d)  # [B, N, H*d], concatenated head outputs
    zeroed = x.clone()
    zeroed[..., d:2 * d] = 0  # head 1
    with torch.inference_mode(), ablate_heads(model, [(0, 1)]):
        out = attn.proj(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(zeroed, attn.proj.weight, attn.proj.bias))


def test_bad_layer_or_head_is_a_value_error(model):
    with pytest.raises(ValueError, match='layer 3'):
        with skip_blocks(model, [3]):
            pass
    with pytest.raises(ValueError, match='head 3'):
        with ablate_heads(model, [(0, 3)]):
            pass


def test_cls_features_are_the_normed_cls_token_after_each_block(model, pixels):
    feats = cls_features(model, pixels, batch_size=3)
    assert feats.shape == (DEPTH, len(pixels), WIDTH)
    vit = model.timm_model
    with torch.inference_mode():
        last = vit.forward_features(pixels)[:, 0]  # final block, after the final norm
    torch.testing.assert_close(feats[-1], last, atol=1e-5, rtol=1e-5)


def test_linear_probe_separates_separable_features_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    noise = rng.normal(size=(2, 60, 5)).astype(np.float32)
    signal = noise.copy()
    signal[1, :, 0] += 10 * labels  # layer 1 carries the class, layer 0 does not
    test_labels = np.repeat(np.arange(3), 10)
    test = rng.normal(size=(2, 30, 5)).astype(np.float32)
    test[1, :, 0] += 10 * test_labels
    accs = linear_probe(torch.from_numpy(signal), torch.from_numpy(labels), torch.from_numpy(test),
                        torch.from_numpy(test_labels))
    assert len(accs) == 2 and accs[1] == 1.0 and accs[0] < 0.7


def _scripted_accuracy(monkeypatch, by_call):
    """Replaces the model's accuracy with ``by_call(ablated heads, skipped blocks)``; the model never runs."""
    def fake_accuracy(model, pixel_values, labels, batch_size=128):
        vit = model.timm_model
        skipped = [i for i, block in enumerate(vit.blocks) if isinstance(block, torch.nn.Identity)]
        ablated = sum(len(b.attn.proj._forward_pre_hooks) for b in vit.blocks if not isinstance(b, torch.nn.Identity))
        return by_call(ablated, skipped)
    monkeypatch.setattr(importance, 'accuracy', fake_accuracy)


def test_layer_skip_accuracy_skips_each_block_in_turn(model, pixels, monkeypatch):
    _scripted_accuracy(monkeypatch, lambda ablated, skipped: 1.0 - 0.1 * skipped[0] if len(skipped) == 1 else -1.0)
    assert importance.layer_skip_accuracy(model, pixels, torch.zeros(len(pixels))) == pytest.approx([1.0, 0.9, 0.8])


def test_greedy_pruning_counts_heads_within_tolerance(model, pixels, monkeypatch):
    # Accuracy after 1, 2, ... heads removed (scripted); baseline 0.90, tolerance 1 point -> 0.89 is the floor.
    after = [0.905, 0.895, 0.891, 0.889, 0.893, 0.84, 0.80]
    calls = []

    def ablated_accuracy(model, heads, pixel_values, labels, batch_size):
        calls.append([list(h) for h in heads])
        return after[len(heads) - 1]
    monkeypatch.setattr(importance, '_ablated_accuracy', ablated_accuracy)
    head_acc = [[0.5] * HEADS for _ in range(DEPTH)]
    head_acc[2][1] = 0.9  # least important: goes first
    head_acc[0][2] = 0.8  # second
    result = greedy_pruning(model, pixels, torch.zeros(len(pixels)), head_acc, baseline=0.90)
    assert result['order'][:2] == [[2, 1], [0, 2]]
    assert [len(c) for c in calls] == [1, 2, 3, 4, 5, 6]  # cumulative; stops below baseline - 5 points
    assert calls[1] == [[2, 1], [0, 2]] and calls[5][:2] == [[2, 1], [0, 2]]
    assert result['accuracy'] == after[:6] and result['stopped'] == 'accuracy'
    assert result['num_prunable'] == 3  # 0.889 < 0.89 ends the prunable prefix, though 0.893 comes back
    assert result['num_heads'] == DEPTH * HEADS and result['tolerance'] == 0.01


def test_truncating_the_last_blocks_gives_the_probe_features_of_an_earlier_block(model, pixels):
    # truncate_accuracy[k] is the probe after block L-1-k: the model without its last k blocks sees exactly
    # the (normed) CLS token after block L-1-k.
    full = cls_features(model, pixels)
    for k in range(1, DEPTH):
        with skip_blocks(model, range(DEPTH - k, DEPTH)):
            truncated = cls_features(model, pixels)[-1]
        torch.testing.assert_close(truncated, full[DEPTH - 1 - k], atol=1e-5, rtol=1e-5)


def test_truncate_accuracy_reads_the_probe_backwards(model, monkeypatch):
    monkeypatch.setattr(importance, 'linear_probe', lambda *a, **k: [0.4, 0.7, 0.95])
    data = datasets.DatasetDict({'train': _tiny_dataset(6, 0), 'test': _tiny_dataset(3, 1)})
    result = importance_study(model, data, batch_size=4, pruning_seconds=0)
    assert result['truncate_accuracy'] == [0.95, 0.7, 0.4]  # 0 blocks removed = the full model's probe


def _tiny_dataset(n, seed):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({'image': images, 'label': [i % 3 for i in range(n)]}, features=features)


def test_importance_study_schema(model):
    data = datasets.DatasetDict({'train': _tiny_dataset(12, 0), 'test': _tiny_dataset(6, 1)})
    result = importance_study(model, data, batch_size=4, max_test=5)
    for key in ('baseline_accuracy', 'probe_accuracy', 'layer_skip_accuracy', 'truncate_accuracy',
                'head_ablation_accuracy', 'greedy_pruning', 'num_train', 'num_test'):
        assert key in result
    for key in ('probe_accuracy', 'layer_skip_accuracy', 'truncate_accuracy'):
        assert len(result[key]) == DEPTH
    assert result['truncate_accuracy'] == result['probe_accuracy'][::-1]
    # the oracle: the model's own forward on the eval crops of the first 5 test images, scored by hand
    pixel_values, labels = image_tensors(model, data['test'], max_images=5)

    def hand_accuracy(**ablation):
        context = skip_blocks(model, ablation['skip']) if 'skip' in ablation else ablate_heads(model, ablation['heads'])
        with torch.no_grad(), context:
            return (model(pixel_values).logits.argmax(-1) == labels).float().mean().item()
    assert result['baseline_accuracy'] == pytest.approx(hand_accuracy(skip=[]))
    assert result['layer_skip_accuracy'] == pytest.approx([hand_accuracy(skip=[layer]) for layer in range(DEPTH)])
    assert result['head_ablation_accuracy'][1] == pytest.approx([hand_accuracy(heads=[(1, h)]) for h in range(HEADS)])
    assert [len(row) for row in result['head_ablation_accuracy']] == [HEADS] * DEPTH
    pruning = result['greedy_pruning']
    assert set(pruning) >= {'order', 'accuracy', 'num_prunable', 'num_heads', 'tolerance'}
    assert len(pruning['order']) == len(pruning['accuracy']) <= DEPTH * HEADS
    assert result['num_train'] == 12 and result['num_test'] == 5
    assert model.timm_model.blocks[0].attn.proj._forward_pre_hooks == {}
