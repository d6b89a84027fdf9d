"""`python -m analysis <command>` end to end on a tiny real run, and the published folder's loaders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.cli import main as cli
from analysis.maps.summary import load_summary
from conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def test_extract_matches_output_attentions(tiny_run, tmp_path):
    """The summary's CLS rows equal what output_attentions=True returns for the same images."""
    from analysis.modeling.transforms import eval_transform, model_data_config
    from analysis.modeling.vit import TimmViTForImageClassification
    from data_scripts import DataArguments, load_flower_dataset, to_rgb
    run, _ = tiny_run
    out = tmp_path / 's.safetensors'
    assert cli(['extract', '--model', str(run), '--split', 'test', '--output', str(out), '--full_maps', '2',
                '--batch_size', '8']) == 0
    tensors, meta = load_summary(out)
    assert meta['num_images'] == len(tensors['labels']) == 20 and meta['has_masks']
    assert tensors['full_attention'].shape[0] == 2
    metrics = json.loads((tmp_path / 'attention_metrics.json').read_text())
    assert len(metrics['layers']['fg_lift']['mean']) == meta['num_layers'] == 2

    model = TimmViTForImageClassification.from_pretrained(run).eval()
    config = json.loads((run / 'run_config.json').read_text())['data']
    split = load_flower_dataset(DataArguments(**config))['test']
    tf = eval_transform(model_data_config(model.timm_model))
    pixels = torch.stack([tf(to_rgb(split[i]['image'])) for i in range(3)])
    with torch.no_grad():
        out = model(pixels, output_attentions=True)
    layout = model.token_layout
    expected = torch.stack([layout.cls_to_patches(a) for a in out.attentions], dim=1)  # [3, L, H, P]
    assert torch.allclose(tensors['cls_attention'][:3].float(), expected, atol=1e-3)  # float16 storage
    assert torch.equal(tensors['predictions'][:3], out.logits.argmax(-1))
    full = tensors['full_indices'].tolist()  # a correct and a wrong prediction where there are both
    with torch.no_grad():
        out = model(torch.stack([tf(to_rgb(split[i]['image'])) for i in full]), output_attentions=True)
    assert torch.allclose(tensors['full_attention'].float(), torch.stack(out.attentions, 1), atol=1e-3)


@pytest.mark.e2e
def test_heatmaps_image_report(tiny_run, tmp_path):
    run, _ = tiny_run
    assert cli(['heatmaps', str(run / 'attentions.safetensors'), '--output', str(tmp_path / 'figs')]) == 0
    assert {'layer_grid.png', 'class_maps.png', 'depth_curves.png'} <= {p.name for p in (tmp_path / 'figs').iterdir()}

    img = tmp_path / 'flower.jpg'
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(img)
    gray = tmp_path / 'gray.png'
    Image.fromarray((np.random.default_rng(1).random((40, 40)) * 255).astype(np.uint8)).save(gray)
    assert cli(['image', f'--model={run}', '--output', str(tmp_path / 'img'), str(img), str(gray)]) == 0
    assert (tmp_path / 'img' / 'layer_grid.png').is_file()

    assert cli(['report', str(run)]) == 0
    html = (run / 'report.html').read_text()
    assert 'data:image/png;base64,' in html and 'fg_lift' in html


def test_user_errors_are_one_line(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    junk = tmp_path / 'junk.safetensors'
    junk.write_bytes(b'not a summary')
    assert cli(['heatmaps', str(junk), '--output', str(tmp_path / 'x')]) == 1
    assert cli(['image', '--model', str(run), str(junk)]) == 1
    assert cli(['report', str(tmp_path)]) == 1
    assert cli(['extract', '--model', str(tmp_path / 'nowhere'), '--output', str(tmp_path / 'o')]) == 1
    err = capsys.readouterr().err
    assert err.count('error:') == 4 and 'Traceback' not in err


@pytest.mark.e2e
def test_background_and_importance_commands(tiny_run, tmp_path):
    run, _ = tiny_run
    assert cli(['background', '--model', str(run), '--split', 'test', '--output', str(tmp_path), '--batch_size', '8']) == 0
    background = json.loads((tmp_path / 'background.json').read_text())
    assert set(background['variants']) == {'original', 'only_fg', 'no_fg', 'only_bg_t', 'mixed_same', 'mixed_rand'}
    gap = background['variants']['mixed_same']['accuracy'] - background['variants']['mixed_rand']['accuracy']
    assert background['bg_gap'] == pytest.approx(gap)
    assert cli(['importance', '--model', str(run), '--output', str(tmp_path), '--batch_size', '8']) == 0
    importance = json.loads((tmp_path / 'importance.json').read_text())
    assert len(importance['probe_accuracy']) == len(importance['layer_skip_accuracy']) == 2


@pytest.mark.e2e
def test_dry_run_folder_loads_with_every_loader(tiny_run, tmp_path):
    """What `push --dry_run` writes loads with the same logits through timm, transformers, pipeline and
    this project, from the folder and, laid out as a Hub cache, through hf-hub: / a repo id (offline)."""
    run, _ = tiny_run
    folder = tmp_path / 'upload'
    assert cli(['push', str(run), '--repo_id', 'someone/flower-vit', '--dry_run', str(folder)]) == 0
    names = {str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file()}
    assert {'config.json', 'model.safetensors', 'README.md', 'report.html', 'all_results.json'} <= names
    assert not any(n.startswith('checkpoint') or n.endswith(('.bin', '.pt', '.pth')) for n in names)

    # the same files as a Hub snapshot in a fresh cache; HF_HUB_OFFLINE makes every loader resolve from it
    snapshot = tmp_path / 'hf' / 'hub' / 'models--someone--flower-vit' / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    for name in ('config.json', 'model.safetensors'):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('0' * 40)

    code = f'''
import json, sys, numpy as np, torch, timm
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline
sys.path.insert(0, {str(ROOT)!r})
from analysis.modeling.vit import TimmViTForImageClassification
from analysis.modeling.transforms import eval_transform, model_data_config
image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
logits = {{}}
for where in ({str(folder)!r}, 'someone/flower-vit'):
    ours = TimmViTForImageClassification.from_pretrained(where).eval()
    x = eval_transform(model_data_config(ours.timm_model))(image)[None]
    with torch.no_grad():
        logits[where + ' ours'] = ours(x).logits[0].tolist()
        logits[where + ' auto'] = AutoModelForImageClassification.from_pretrained(where).eval()(x).logits[0].tolist()
        prefix = 'local-dir:' if where.startswith('/') else 'hf-hub:'
        logits[where + ' timm'] = timm.create_model(prefix + where, pretrained=True).eval()(x)[0].tolist()
    scores = pipeline('image-classification', model=where)(image, top_k=None)
    probs = torch.tensor(logits[where + ' ours']).softmax(-1)
    logits[where + ' pipeline'] = [probs[ours.config.label2id[s['label']]].item() - s['score'] for s in scores]
print(json.dumps(logits))
'''
    env = dict(os.environ, HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    env.pop('HF_TOKEN', None)
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = json.loads(result.stdout.strip().splitlines()[-1])
    reference = np.array(logits[f'{folder} ours'])
    for key, value in logits.items():
        if key.endswith('pipeline'):
            assert np.abs(value).max() < 1e-4, key
        else:
            assert np.allclose(value, reference, atol=1e-4), key


def test_wrong_model_and_foreign_summary_are_clear_errors(tiny_run, tmp_path, capsys):
    """A non-ViT model and a summary written by another model: one line each, nothing downloaded."""
    run, _ = tiny_run
    assert cli(['extract', '--model', 'resnet18', '--dataset_name', 'synthetic', '--output',
                str(tmp_path / 's.safetensors')]) == 1
    assert 'transformer blocks' in capsys.readouterr().err
    assert cli(['extract', '--model', 'vit_tiny_patch16_224', '--output', str(tmp_path / 's.safetensors')]) == 1
    assert 'name the dataset' in capsys.readouterr().err  # no silent default dataset

    other = tmp_path / 'other'
    other.mkdir()
    for name in ('all_results.json', 'attention_metrics.json', 'attentions.safetensors', 'run_config.json'):
        (other / name).write_bytes((run / name).read_bytes())
    names = json.loads((run / 'all_results.json').read_text())['test_class_names']
    tiny_vit(names).save_pretrained(other)  # 3 blocks: not the run's model
    assert cli(['report', str(other)]) == 1
    assert 'another model' in capsys.readouterr().err
