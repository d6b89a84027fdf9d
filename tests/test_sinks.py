"""High-norm tokens, attention sinks and registers: known answers on hand-built models and maps."""
import json
import subprocess
import sys

import pytest
import torch

from analysis.maps.attention_metrics import AttentionMetricsAccumulator, fg_ratio
from analysis.maps.extract import extract_to_file
from analysis.maps.sinks import K, SinkAccumulator, flag_high_norm, mean_substitute, norm_threshold, without_flagged
from analysis.modeling.timm_internals import capture_token_norms, edit_block_output
from analysis.modeling.tokens import TokenLayout
from analysis.studies.sinks import sink_layer, summary_sinks, sinks_study
from tests.conftest import TINY_DATA, tiny_vit

SINK_BLOCK, SINK_TOKEN, DEPTH = 2, 5, 4


@pytest.fixture(scope='module')
def flowers(tmp_path_factory):
    """Synthetic flowers at 32 px with masks, 2 classes, 8 test images."""
    from data_scripts import DataArguments, load_flower_dataset
    return load_flower_dataset(DataArguments(
        synthetic_num_classes=2, synthetic_image_size=32, synthetic_train_per_class=2,
        synthetic_validation_per_class=1, synthetic_test_per_class=4, cache_dir=str(tmp_path_factory.mktemp('cache'))))


def planted_sink_vit(block: int = SINK_BLOCK, token: int = SINK_TOKEN, depth: int = DEPTH):
    """A tiny ViT (4 x 4 patches) whose patch token ``token`` gets a large norm at block ``block`` and keeps it.

    Every image gives the same tokens (the patch embedding is zero: a token is its position
    embedding). Only ``token`` carries a marker in channel 0, too small to make it an outlier; every
    block adds nothing (attention and MLP outputs zero), except the MLP of ``block``, whose neuron 0
    fires on the marker alone and writes a large vector into that token (the mechanism of Jiang et
    al. 2025). The attention maps stay those of random weights.
    """
    model = tiny_vit(['a', 'b'], depth=depth)
    vit = model.timm_model
    with torch.no_grad():
        vit.patch_embed.proj.weight.zero_()
        vit.patch_embed.proj.bias[0] = 0
        vit.pos_embed[..., 0] = 0
        vit.cls_token[..., 0] = 0
        vit.pos_embed[0, vit.num_prefix_tokens + token, 0] = 0.1
        for b in vit.blocks:
            for linear in (b.attn.proj, b.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        mlp = vit.blocks[block].mlp
        mlp.fc1.weight[0] = 0
        mlp.fc1.weight[0, 0], mlp.fc1.bias[0] = 20.0, -15.0
        mlp.fc2.weight[:, 0] = 3.0
    return model


def cls_attention_by_hand(model, pixel_values):
    """Per block, the CLS row of softmax(q k^T * scale), computed from the block's input: ``[B, L, H, N]``."""
    inputs = []
    vit = model.timm_model
    handles = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in vit.blocks]
    try:
        with torch.no_grad():
            model(pixel_values)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for block, x in zip(vit.blocks, inputs):
        attn = block.attn
        B, N, D = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]  # [B, H, N, d]
        scores = (q[:, :, :1] @ k.transpose(-2, -1)) * attn.scale  # the CLS query only: [B, H, 1, N]
        rows.append(scores.softmax(-1)[:, :, 0])
    return torch.stack(rows, dim=1)


def test_threshold_is_median_plus_k_mad():
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, MAD 1
    assert norm_threshold(norms).item() == pytest.approx(3 + K)
    assert flag_high_norm(norms).tolist() == [False, False, False, False, True]
    assert K == pytest.approx(3.5 / 0.6745)


def test_planted_sink_is_flagged_from_its_block_and_its_sink_share_is_the_cls_attention_by_hand(tmp_path, flowers):
    model = planted_sink_vit()
    split = flowers['test']
    summary = tmp_path / 'attentions.safetensors'
    extract_to_file(model, split, summary, batch_size=8, progress=False)
    table = summary_sinks(summary)
    P = model.token_layout.num_patches
    for layer, entry in enumerate(table['layers']):
        expected = 1 / P if layer >= SINK_BLOCK else 0.0
        assert entry['flagged_share']['mean'] == pytest.approx(expected, abs=1e-9), layer
        assert entry['images_with_flagged'] == (1.0 if layer >= SINK_BLOCK else 0.0)
    # which token: flags of the first images, straight from the accumulator
    with capture_token_norms(model.timm_model) as norms, torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    flags = flag_high_norm(torch.stack(norms, 1)[..., 1:])  # [B, L, P]
    assert flags[:, :SINK_BLOCK].sum() == 0
    assert flags[:, SINK_BLOCK:].nonzero()[:, 2].unique().tolist() == [SINK_TOKEN]

    by_hand = cls_attention_by_hand(model, torch.randn(2, 3, 32, 32))  # the same for every image (tokens fixed)
    on_token = by_hand[0, :, :, model.token_layout.num_prefix_tokens + SINK_TOKEN]  # [L, H]
    for layer in range(SINK_BLOCK, DEPTH):
        entry = table['layers'][layer]
        assert entry['sink_share']['mean'] == pytest.approx(on_token[layer].mean().item(), abs=2e-3)  # float16 rows
        assert entry['sink_share_heads'] == pytest.approx(on_token[layer].tolist(), abs=2e-3)
        assert entry['cls_self_share']['mean'] == pytest.approx(by_hand[0, layer, :, 0].mean().item(), abs=2e-3)
    assert sink_layer(table) >= SINK_BLOCK


def test_fg_ratio_without_flagged_tokens_by_hand():
    # one image, one layer, 4 patches: attention 0.1, 0.2, 0.3, 0.4 (the rest on CLS); flower on patches 0 and 3
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])  # [B=1, L=1, P=4]
    fg = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    flags = torch.tensor([[[False, False, True, False]]])  # patch 2 flagged
    ratio, area = without_flagged(attention, flags, fg)
    assert ratio.item() == pytest.approx((0.1 * 1 + 0.4 * 0.5) / (0.1 + 0.2 + 0.4))
    assert area.item() == pytest.approx((1 + 0 + 0.5) / 3)
    assert fg_ratio(attention, fg).item() == pytest.approx((0.1 + 0.2) / 1.0)
    uniform_ratio, uniform_area = without_flagged(torch.full((1, 1, 4), 0.2), flags, fg)
    assert uniform_ratio.item() == pytest.approx(uniform_area.item())  # uniform attention: fg_lift 1


def test_mean_substitution_replaces_by_the_mean_of_the_pool():
    tokens = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    replace = torch.tensor([[False, True, False, False]])
    pool = torch.tensor([[False, False, True, True]])
    out = mean_substitute(tokens, replace, pool)
    assert out[0, 1].tolist() == ((tokens[0, 2] + tokens[0, 3]) / 2).tolist()
    assert torch.equal(out[0, [0, 2, 3]], tokens[0, [0, 2, 3]])


def _identity_after(model, layer):
    """The blocks after ``layer`` add nothing and the final norms are the identity: the head reads block ``layer``."""
    vit = model.timm_model
    with torch.no_grad():
        for block in vit.blocks[layer + 1:]:
            for linear in (block.attn.proj, block.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    vit.norm, vit.fc_norm = torch.nn.Identity(), torch.nn.Identity()
    return model


@pytest.mark.parametrize('global_pool', ['token', 'avg'])
def test_mean_substitution_changes_the_logit_by_the_known_amount(global_pool):
    layer = 1
    model = _identity_after(tiny_vit(['a', 'b'], random_head=True, global_pool=global_pool, depth=3), layer)
    x = torch.randn(2, 3, 32, 32)
    p = model.token_layout.num_prefix_tokens
    outputs = []
    handle = model.timm_model.blocks[layer].register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad():
        before = model(x).logits
    handle.remove()
    tokens = outputs[0]  # [B, N, D]
    replace = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    replace[:, p + 3] = True
    pool = torch.zeros_like(replace)
    pool[:, p:] = True
    pool[:, p + 3] = False
    with torch.no_grad(), edit_block_output(model, layer, lambda t: mean_substitute(t, replace, pool)):
        after = model(x).logits
    if global_pool == 'token':  # the head reads CLS only, and nothing after the layer mixes the tokens
        torch.testing.assert_close(after, before)
    else:  # the head reads the mean of the patch tokens: token 3 moves to the others' mean
        others = tokens[:, p:][:, [i for i in range(tokens.shape[1] - p) if i != 3]].mean(1)  # [B, D]
        shift = (others - tokens[:, p + 3]) / (tokens.shape[1] - p)
        expected = shift @ model.timm_model.head.weight.T
        torch.testing.assert_close(after - before, expected, atol=1e-5, rtol=1e-4)


def test_register_model_metrics_equal_those_with_the_register_rows_dropped_by_hand():
    """Every metric of a model with 4 registers equals that of its maps with the register rows and columns dropped."""
    model = tiny_vit(['a', 'b'], reg_tokens=4, depth=2)
    layout = model.token_layout
    assert layout.num_prefix_tokens == 5
    x = torch.randn(3, 3, 32, 32)
    fg = torch.rand(3, layout.num_patches)
    labels = torch.tensor([0, 1, 0])
    with capture_token_norms(model.timm_model) as norms, torch.no_grad():
        attentions = model(x, output_attentions=True).attentions
    keep = [0] + list(range(5, layout.num_tokens))  # CLS and the patches
    dropped = [a[:, :, keep][:, :, :, keep] for a in attentions]  # rows no longer sum to 1: metrics renormalise
    plain = TokenLayout(1, layout.grid_size, layout.patch_size)

    def metrics(maps, lay):
        acc = AttentionMetricsAccumulator(lay, 2, 3, ['a', 'b'])
        acc.update(maps, torch.stack([lay.cls_to_patches(a) for a in maps], 1), labels, fg)
        return acc.compute()

    with_registers, by_hand = metrics(attentions, layout), metrics(dropped, plain)
    for name in ('fg_ratio', 'fg_lift', 'pointing_game', 'entropy', 'mean_attention_distance'):
        for what in ('mean', 'per_head'):
            torch.testing.assert_close(torch.tensor(with_registers['layers'][name][what]),
                                       torch.tensor(by_hand['layers'][name][what]), rtol=1e-5, atol=1e-7, msg=name)

    norms = torch.stack(norms, 1)  # [B, L, N]
    norms[..., 1:5] = 100.0  # registers of high norm, as in DINOv2-reg: never flagged, never patches
    norms[..., 5 + 3] = 50.0  # patch 3: the one outlier among the patches
    sinks = SinkAccumulator(layout, 2, 3)
    sinks.update(norms, torch.stack([layout.cls_to_patches(a) for a in attentions], 1),
                 torch.stack([layout.cls_to_prefix(a) for a in attentions], 1), fg)
    table = sinks.compute()
    plain_sinks = SinkAccumulator(plain, 2, 3)
    plain_sinks.update(norms[..., keep], torch.stack([plain.cls_to_patches(a) for a in dropped], 1),
                       torch.stack([plain.cls_to_prefix(a) for a in dropped], 1), fg)
    plain_table = plain_sinks.compute()
    for layer in range(2):
        ours, theirs = table['layers'][layer], plain_table['layers'][layer]
        for name in ('flagged_share', 'sink_share', 'cls_self_share', 'fg_lift', 'fg_lift_without'):
            assert ours[name]['mean'] == pytest.approx(theirs[name]['mean'], rel=1e-5), name
        assert ours['flagged_share']['mean'] == pytest.approx(1 / 16)  # patch 3 alone
        on_patch_3 = torch.stack([a[:, :, 0, 5 + 3] for a in attentions], 1)[:, layer].mean()
        assert ours['sink_share']['mean'] == pytest.approx(on_patch_3.item(), rel=1e-5)
        registers = torch.stack([a[:, :, 0, 1:5].sum(-1) for a in attentions], 1)[:, layer].mean()  # [B, L, H]
        assert ours['register_share']['mean'] == pytest.approx(registers.item(), rel=1e-5)
        assert 'register_share' not in theirs
    assert table['num_registers'] == 4


def test_causal_check_on_the_planted_sink(flowers):
    """The head reads the mean patch token: replacing the planted token (huge) moves the logit far more than a
    random background token (which is replaced by nearly itself)."""
    model = _identity_after(planted_sink_vit(), DEPTH - 1)
    model.timm_model.global_pool = 'avg'
    torch.nn.init.normal_(model.timm_model.head.weight, std=0.5)
    result = sinks_study(model, _summary(model, flowers), flowers['test'], causal_images=8, batch_size=4)
    causal = result['causal']
    assert causal['layer'] == result['sink_layer'] >= SINK_BLOCK
    assert causal['images_with_flagged'] == 8
    assert abs(causal['sinks']['mean']) > 100 * abs(causal['random']['mean'])


def _summary(model, flowers):
    import tempfile
    from pathlib import Path
    path = Path(tempfile.mkdtemp()) / 'attentions.safetensors'
    extract_to_file(model, flowers['test'], path, batch_size=8, progress=False)
    return path


@pytest.mark.e2e
def test_sinks_command_flags_the_planted_token(tmp_path):
    model = planted_sink_vit()
    model.save_pretrained(tmp_path / 'model')
    out = tmp_path / 'out'
    subprocess.run([sys.executable, '-m', 'analysis', 'sinks', '--model', str(tmp_path / 'model'), '--output', str(out),
                    '--dataset_name', 'synthetic', *TINY_DATA, '--synthetic_num_classes', '2',
                    '--cache_dir', str(tmp_path / 'cache'), '--max_images', '6', '--causal_images', '4'],
                   check=True, capture_output=True, text=True)
    result = json.loads((out / 'sinks.json').read_text())
    shares = [layer['flagged_share']['mean'] for layer in result['layers']]
    assert shares == pytest.approx([0, 0, 1 / 16, 1 / 16])
    assert (out / 'figures' / 'sinks.png').is_file()


@pytest.mark.e2e
def test_a_register_model_trains_extracts_analyses_compresses_and_reports(tmp_path, capsys):
    """A ViT with 2 register tokens through the whole job, the studies, the image command and compression."""
    import train_hf
    from analysis.cli import main
    from analysis.maps.summary import load_summary
    from tests.conftest import TINY_VIT, tiny_args
    out = tmp_path / 'run'
    train_hf.main(tiny_args(out, '--max_steps', '3', '--model_args', json.dumps({**TINY_VIT, 'depth': 2, 'reg_tokens': 2})))
    tensors, meta = load_summary(out / 'attentions.safetensors')
    assert meta['layout']['num_prefix_tokens'] == 3
    assert tensors['cls_attention'].shape[-1] == 16 and tensors['prefix_attention'].shape[1:] == (2, 3, 3)
    sinks = json.loads((out / 'sinks.json').read_text())
    assert sinks['num_registers'] == 2 and sinks['causal']['images_with_flagged'] >= 0
    registers = tensors['prefix_attention'].float()[..., 1:].sum(-1).mean(dim=(0, 2))  # [L]
    for layer, entry in enumerate(sinks['layers']):
        assert entry['register_share']['mean'] == pytest.approx(registers[layer].item(), abs=1e-3)
    assert 'register share' in (out / 'report.html').read_text()
    assert 'register tokens' in (out / 'README.md').read_text()
    for command in (['background'], ['importance', '--max_images', '8'],
                    ['faithfulness', '--max_images', '4', '--steps', '2']):
        assert main([command[0], '--model', str(out), '--output', str(tmp_path / command[0]), *command[1:]]) == 0
    assert json.loads((tmp_path / 'background' / 'background.json').read_text())['variants']['original']['fg_lift']
    asymmetric = tmp_path / 'photo.png'
    from PIL import Image
    Image.new('RGB', (40, 30), (200, 40, 90)).save(asymmetric)
    assert main(['image', '--model', str(out), '--output', str(tmp_path / 'image'), str(asymmetric)]) == 0
    assert main(['compress', '--model', str(out), '--output_dir', str(tmp_path / 'small'), '--max_accuracy_drop', '0.99',
                 '--speed_rounds', '1', '--selection_images', '16', '--max_steps', '2',
                 '--per_device_train_batch_size', '8']) == 0
    small = json.loads((tmp_path / 'small' / 'config.json').read_text())
    assert small['model_args']['reg_tokens'] == 2 and small['model_args']['depth'] == 1


def test_cli_defaults_are_the_module_defaults():
    from analysis.cli import SinksFlags
    from analysis.studies.sinks import CAUSAL_IMAGES, SINKS_MAX_IMAGES
    assert SinksFlags.__dataclass_fields__['max_images'].default == SINKS_MAX_IMAGES
    assert SinksFlags.__dataclass_fields__['causal_images'].default == CAUSAL_IMAGES


def _layer(share, se, flagged, ratio=1.5):
    return {'sink_share': {'mean': share, 'se': se}, 'flagged_share': {'mean': flagged}, 'norm_ratio': {'mean': ratio}}


@pytest.mark.parametrize('layers, expected', [
    ([_layer(0.05, 0.01, 0.01), _layer(0.08, 0.02, 0.02)], 'No layer has attention sinks'),
    ([_layer(0.05, 0.01, 0.01), _layer(0.5, 0.02, 0.02, ratio=12.0)], 'Attention sinks at layer 2 ('),
    ([_layer(0.2, 0.01, 0.15), _layer(0.14, 0.01, 0.02)], 'Attention sinks at layer 2 ('),  # layer 1: < 2x its share
    ([_layer(0.13, 0.02, 0.01), _layer(0.3, 0.01, 0.02)], 'Attention sinks at layer 2 ('),  # layer 1: 0.13 - 2 SE < 0.1
])
def test_the_sink_rule_in_words(layers, expected):
    from analysis.render.findings import sink_sentences
    first = sink_sentences({'layers': layers})[0]
    assert first.startswith(expected)
    assert ('far from the ~10x' in first) == (expected.startswith('Attention') and layers[1]['norm_ratio']['mean'] < 3)
