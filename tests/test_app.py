"""The app (`analysis.app`): what one request computes, on a tiny model and images made here, without a server."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.app import Lens, run_examples
from analysis.maps.attention_metrics import fg_ratio
from analysis.modeling.transforms import eval_geometry, eval_transform, mask_to_tensor
from analysis.studies.faithfulness import attention_gradients, gradient_rollout
from data_scripts.errors import UserError
from tests.conftest import tiny_vit

CLASSES = ['daisy', 'tulip', 'rose']


def asymmetric_picture(height: int = 48, width: int = 40) -> Image.Image:
    """A picture whose every rotation or mirror differs: a gradient plus a red corner block."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 60)], axis=-1).astype(np.uint8)
    pixels[:height // 3, :width // 4] = [255, 0, 0]
    return Image.fromarray(pixels)


@pytest.fixture(scope='module')
def lens(tmp_path_factory):
    """A Lens on a tiny random ViT, with one example whose mask is its left half."""
    folder = tmp_path_factory.mktemp('app')
    tiny_vit(CLASSES, random_head=True).save_pretrained(folder / 'model')
    example = folder / 'example.png'
    asymmetric_picture().save(example)
    mask = np.zeros((48, 40), dtype=np.uint8)
    mask[:, :20] = 255
    return Lens(str(folder / 'model'), examples=[(str(example), Image.fromarray(mask))])


def test_exif_orientation_is_applied(lens, tmp_path):
    """A photo stored sideways with an EXIF orientation tag is analysed upright, as its viewer shows it."""
    upright = asymmetric_picture()
    upright.save(tmp_path / 'upright.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels are the upright picture turned 90 degrees CCW
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / 'sideways.png', exif=exif)
    as_shown = lens.analyse(str(tmp_path / 'upright.png'))['crop'].astype(int)
    sideways = lens.analyse(str(tmp_path / 'sideways.png'))['crop'].astype(int)
    np.testing.assert_array_equal(sideways, as_shown)
    ignored = eval_transform(lens.data_config)(upright.transpose(Image.Transpose.ROTATE_90))  # what no transpose sees
    assert not torch.allclose(ignored, eval_transform(lens.data_config)(upright))


@pytest.mark.parametrize('kind', ['cmyk', '16-bit', 'palette', 'large'])
def test_any_mode_and_size_is_analysed(lens, tmp_path, kind):
    picture = asymmetric_picture()
    path = tmp_path / ('photo.jpg' if kind == 'cmyk' else 'photo.png')
    if kind == 'cmyk':
        picture.convert('CMYK').save(path, quality=95)
    elif kind == '16-bit':
        Image.fromarray((np.asarray(picture.convert('L')).astype(np.uint16) * 257)).save(path)
        assert Image.open(path).mode.startswith('I')
    elif kind == 'palette':
        picture.convert('P', palette=Image.Palette.ADAPTIVE).save(path)
    else:
        picture.resize((6000, 4500)).save(path)
    analysis = lens.analyse(str(path))
    assert analysis['crop'].shape == (32, 32, 3) and analysis['probs'].sum() == pytest.approx(1, abs=1e-5)


def test_a_file_that_is_not_an_image_is_a_user_error(lens, tmp_path):
    (tmp_path / 'notes.png').write_text('not an image')
    with pytest.raises(UserError, match='not a readable image'):
        lens.analyse(str(tmp_path / 'notes.png'))


def test_the_single_map_is_the_chosen_layer_and_head(lens, tmp_path):
    asymmetric_picture().save(tmp_path / 'photo.png')
    analysis = lens.analyse(str(tmp_path / 'photo.png'))
    cls_attention = analysis['cls_attention']  # [L, H, P]
    shown = {}
    for layer in range(lens.num_layers):
        for head in ['mean'] + list(range(lens.num_heads)):
            values = cls_attention[layer].mean(axis=0) if head == 'mean' else cls_attention[layer, head]
            picture = lens.single_map(analysis, layer, head)
            np.testing.assert_array_equal(picture, lens.picture(analysis['crop'], values))
            shown[layer, head] = picture
    assert not np.array_equal(shown[0, 'mean'], shown[1, 'mean']) and not np.array_equal(shown[2, 0], shown[2, 1])


def test_gradient_rollout_follows_the_chosen_class(lens, tmp_path):
    asymmetric_picture().save(tmp_path / 'photo.png')
    pixels = eval_transform(lens.data_config)(asymmetric_picture())[None]
    maps = {}
    for target in (0, 2):
        _, attentions, gradients, _ = attention_gradients(lens.model.timm_model, pixels, torch.tensor([target]))
        maps[target] = lens.gradient_map(str(tmp_path / 'photo.png'), target)
        np.testing.assert_allclose(maps[target], gradient_rollout(attentions, gradients, lens.layout)[0].numpy(),
                                   rtol=1e-5, atol=1e-7)
    assert not np.allclose(maps[0], maps[2])


def test_an_example_gets_its_flower_numbers_and_an_upload_none(lens, tmp_path):
    example = lens.example_paths[0]
    analysis = lens.analyse(example)
    mask = np.zeros((48, 40), dtype=np.uint8)
    mask[:, :20] = 255
    fg = lens.layout.patch_fraction(mask_to_tensor(Image.fromarray(mask), eval_geometry(lens.data_config)))
    maps = torch.from_numpy(analysis['cls_attention']).mean(dim=1)  # [L, P]
    expected = fg_ratio(maps[None], fg[None])[0]
    table = lens.numbers(analysis)
    assert '| 1 | ' in table and f'{expected[0]:.3f}' in table.splitlines()[2]
    other = tmp_path / 'other.png'
    asymmetric_picture(40, 48).save(other)
    assert 'fg_ratio' not in lens.numbers(lens.analyse(str(other))).splitlines()[0]


def test_a_model_that_is_not_a_run_has_no_examples(tmp_path):
    assert run_examples('vit_tiny_patch16_224', tmp_path) == []


def test_building_the_page_writes_nothing_into_the_package(lens):
    """Gradio writes a .pyi stub beside any component subclass: the app uses gradio's own components only."""
    import analysis
    from analysis.app import build_app
    package = Path(analysis.__file__).parent
    before = sorted(p.relative_to(package) for p in package.rglob('*') if '__pycache__' not in p.parts)
    build_app(lens)
    assert sorted(p.relative_to(package) for p in package.rglob('*') if '__pycache__' not in p.parts) == before
