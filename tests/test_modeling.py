"""The model wrapper: attentions, fused vs eager, the checkpoint and its four loaders."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

from analysis.modeling.timm_internals import capture_attentions, vit_attention_modules
from analysis.modeling.transforms import eval_transform, model_data_config
from analysis.modeling.vit import TimmViTForImageClassification
from conftest import TINY_VIT, tiny_vit

TINY = TINY_VIT
CLASSES = ['daisy', 'tulip', 'rose']


@pytest.fixture(scope='module')
def tiny_model():
    return tiny_vit(CLASSES)


@pytest.mark.parametrize('name,extra', [
    ('vit_tiny_patch16_224', {}),
    ('deit_tiny_distilled_patch16_224', {}),        # two prefix tokens
    ('vit_small_patch16_224', {'reg_tokens': 2, 'class_token': True}),  # registers
])
def test_attentions_match_qkv_computation(name, extra):
    """output_attentions equals softmax(q k^T / sqrt(d)) computed independently from the qkv weights."""
    torch.manual_seed(0)
    model = TimmViTForImageClassification.from_timm(
        name, pretrained=False, label_names=CLASSES, model_args={**TINY, **extra}).eval()
    vit = model.timm_model
    block_inputs = []
    hooks = [blk.norm1.register_forward_hook(lambda m, i, o: block_inputs.append(o)) for blk in vit.blocks]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, output_attentions=True)
    for h in hooks:
        h.remove()
    layout = model.token_layout
    assert len(out.attentions) == len(vit.blocks)
    for blk, normed, attn in zip(vit.blocks, block_inputs, out.attentions):
        B, N, C = normed.shape
        heads = blk.attn.num_heads
        qkv = normed @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # [B, N, 3C]
        q, k, _ = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # [B, h, N, d] each
        expected = torch.softmax(q @ k.transpose(-2, -1) / (C // heads) ** 0.5, dim=-1)
        assert attn.shape == (2, heads, layout.num_tokens, layout.num_tokens)
        assert torch.allclose(attn, expected, atol=1e-5)


def test_fused_and_eager_logits_agree(tiny_model):
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fused = tiny_model(x).logits
        modules = vit_attention_modules(tiny_model.timm_model)
        for _, attn in modules:
            attn.fused_attn = False
        try:
            eager = tiny_model(x).logits
        finally:
            for _, attn in modules:
                attn.fused_attn = True
    assert torch.allclose(fused, eager, atol=1e-5)


def test_capture_leaves_no_hooks_or_flags(tiny_model):
    modules = vit_attention_modules(tiny_model.timm_model)
    before = [attn.fused_attn for _, attn in modules]
    assert all(before), 'timm should run fused SDPA by default here'
    with pytest.raises(RuntimeError):
        with capture_attentions(tiny_model.timm_model):
            raise RuntimeError('boom')
    tiny_model(torch.randn(1, 3, 32, 32), output_attentions=True)
    assert [attn.fused_attn for _, attn in modules] == before
    assert all(not attn.attn_drop._forward_pre_hooks for _, attn in modules)
    assert tiny_model(torch.randn(1, 3, 32, 32)).attentions is None


def test_attentions_have_gradients_in_training_mode(tiny_model):
    tiny_model.train()
    try:
        out = tiny_model(torch.randn(2, 3, 32, 32), output_attentions=True)
        out.attentions[0][:, :, 0].sum().backward()
        assert tiny_model.timm_model.blocks[0].attn.qkv.weight.grad is not None
        assert all(torch.isfinite(a).all() for a in out.attentions)
    finally:
        tiny_model.zero_grad()
        tiny_model.eval()


def test_non_vit_model_is_a_clear_error():
    with pytest.raises(ValueError, match='transformer blocks'):
        vit_attention_modules(timm.create_model('resnet18', pretrained=False, num_classes=2))


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match='not a timm model name'):
        TimmViTForImageClassification.from_pretrained('no_such_model_xyz', pretrained=False)


@pytest.mark.parametrize('registers', [0, 4])
def test_four_loaders_agree(tiny_model, tmp_path, registers):
    if registers:
        tiny_model = tiny_vit(CLASSES, reg_tokens=registers)
    tiny_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'model.safetensors']
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = tiny_model(x).logits
        by_timm = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()(x)
        by_auto = AutoModelForImageClassification.from_pretrained(tmp_path).eval()(x).logits
        by_ours = TimmViTForImageClassification.from_pretrained(tmp_path).eval()(x).logits
    for logits in (by_timm, by_auto, by_ours):
        assert torch.allclose(logits, ref, atol=1e-4)

    # pipeline: its own preprocessing (from config.json) must give the scores of timm's eval transform
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    classifier = pipeline('image-classification', model=str(tmp_path))
    scores = {r['label']: r['score'] for r in classifier(image, top_k=len(CLASSES))}
    pixels = eval_transform(model_data_config(tiny_model.timm_model))(image)[None]
    with torch.no_grad():
        probs = tiny_model(pixels).logits.softmax(-1)[0]
    assert set(scores) == set(CLASSES)
    for i, name in enumerate(CLASSES):
        assert scores[name] == pytest.approx(probs[i].item(), abs=1e-4)


def test_images_must_tile_the_patch_grid(tiny_model):
    from analysis.maps.extract import check_input_size
    check_input_size(torch.zeros(1, 3, 32, 32), tiny_model.token_layout)
    with pytest.raises(ValueError, match='eval transform'):
        check_input_size(torch.zeros(1, 3, 40, 32), tiny_model.token_layout)


def test_model_without_cls_token_is_refused():
    model = TimmViTForImageClassification.from_timm(
        'vit_tiny_patch16_224', label_names=CLASSES, model_args={**TINY, 'class_token': False, 'global_pool': 'avg'})
    with pytest.raises(ValueError, match='no CLS token'):
        model.token_layout


def test_label_style_masks_are_scaled():
    from analysis.modeling.transforms import mask_to_tensor
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 1
    as_label = mask_to_tensor(Image.fromarray(labels), lambda m: m)
    as_l = mask_to_tensor(Image.fromarray(labels * 255), lambda m: m)
    assert torch.equal(as_label, as_l) and as_l.sum() == 16


def test_save_pretrained_refuses_what_it_cannot_write_as_asked(tiny_model, tmp_path):
    """One safetensors file or an error: no pickled weights, no silent single file past max_shard_size."""
    from data_scripts.errors import UserError
    with pytest.raises(UserError, match='safetensors only'):
        tiny_model.save_pretrained(tmp_path / 'pickled', safe_serialization=False)
    with pytest.raises(UserError, match='more than max_shard_size=1KB'):
        tiny_model.save_pretrained(tmp_path / 'sharded', max_shard_size='1KB')
    assert not (tmp_path / 'sharded' / 'model.safetensors').exists()
    tiny_model.save_pretrained(tmp_path / 'fits', max_shard_size='5GB')
    assert (tmp_path / 'fits' / 'model.safetensors').is_file()
