"""Fine-tuning from a checkpoint: the base cache, backbone loading with a new head, attention before vs after."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_hf
from analysis import cli
from analysis.maps.attention_change import attention_change, compare_runs, js_divergence
from analysis.train import args as train_args
from analysis.train import base as train_base
from analysis.train import job as training
from conftest import TINY_DATA, TINY_MODEL, save_summary, tiny_args, tiny_base_config
from data_scripts.errors import run_main

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ['black-eyed susan', 'star lily', 'round poppy', 'fringed pink', 'spider aster']


base_config = tiny_base_config  # 3 classes, not the 5 the tests fine-tune on


@pytest.fixture(scope='module')
def base(tiny_base):
    return tiny_base


@pytest.fixture(scope='module')
def cache(base_cache):
    return base_cache


def start_model(name, class_names, pretrained=True, **flags):
    model_args, _, _ = train_args.parse_args(['--model_name_or_path', name, '--pretrained', str(pretrained).lower(),
                                            *[str(x) for kv in flags.items() for x in kv]])
    return training.build_model(model_args, class_names, *training.resolve_start(model_args))


def test_base_is_built_once_and_cached_by_its_config(base, cache, monkeypatch):
    name, folder = base
    assert folder.parent == cache / 'bases' and folder.name.startswith('base_tiny-')
    assert (folder / 'model.safetensors').is_file() and not folder.with_name(folder.name + '.partial').exists()
    for produced in ('README.md', 'report.html', 'attention_metrics.json'):  # the base's own card and report
        assert (folder / produced).is_file(), produced
    assert f'<h1>Attention report: {name}</h1>' in (folder / 'report.html').read_text()

    def no_training(*args, **kwargs):
        raise AssertionError('the cached base was trained again')
    monkeypatch.setattr(training, 'run', no_training)
    assert train_base.ensure_base(name, training.run) == folder
    other = Path(name[len('base:'):]).with_name('base_other.json')
    other.write_text(json.dumps(base_config(seed=6)))
    assert train_base.base_cache_dir(f'base:{other}').name.split('-')[-1] != folder.name.split('-')[-1]


def test_the_cache_key_is_the_resolved_arguments_and_the_process_count(tmp_path):
    """A flag written out at its default is the same base; another value, or another process count, is not."""
    from transformers import TrainingArguments
    default_decay = TrainingArguments.__dataclass_fields__['weight_decay'].default  # FlowerTrainingArguments' own
    paths = {}
    for name, changes in (('plain', {}), ('explicit', {'weight_decay': 0.05}), ('other', {'weight_decay': 0.1})):
        config = {k: v for k, v in tiny_base_config(**changes).items()}
        paths[name] = tmp_path / name / 'base_tiny.json'
        paths[name].parent.mkdir()
        paths[name].write_text(json.dumps(config))
    assert 'weight_decay' not in json.loads(paths['plain'].read_text()) and default_decay != 0.05
    key = {name: train_base.base_cache_dir(f'base:{path}').name for name, path in paths.items()}
    assert key['plain'] == key['explicit'] != key['other']  # 0.05 is FlowerTrainingArguments' default
    assert train_base.base_cache_dir(f'base:{paths["plain"]}', 2).name != key['plain']


@pytest.mark.e2e
def test_two_runs_that_need_one_base_at_once_build_it_once(tmp_path):
    """Two processes started together on an empty cache: one builds, the other waits for it and reuses it."""
    config = tmp_path / 'base_shared.json'
    config.write_text(json.dumps(base_config(max_steps=6)))
    env = dict(os.environ, **{train_args.CACHE_ENV: str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1',
                              'PYTHONPATH': str(ROOT)})
    code = (f'from analysis.train import base, job; from analysis.core.run_files import weights_sha256; '
            f'folder = base.ensure_base("base:{config}", job.run); print("BASE", folder, weights_sha256(folder))')
    runs = [subprocess.Popen([sys.executable, '-c', code], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    logs = ''.join(out + err for out, err in outputs)
    assert logs.count('building the base model') == 1 and logs.count('another run is building this base') == 1
    (first,), (second,) = ([line for line in out.splitlines() if line.startswith('BASE ')] for out, _ in outputs)
    assert first == second  # the same folder, the same weights' SHA-256
    entries = sorted(p.name for p in (tmp_path / 'cache' / 'bases').iterdir())
    assert len(entries) == 2 and entries[1] == entries[0] + '.lock'  # one base, no .partial left


def test_backbone_is_the_bases_and_the_head_is_new(base):
    name, folder = base
    model, start = start_model(name, FLOWERS)
    checkpoint = load_file(str(folder / 'model.safetensors'))
    weights = model.timm_model.state_dict()
    assert start['initialised'] == ['head.bias', 'head.weight']
    assert sorted(start['loaded']) == sorted(k for k in checkpoint if not k.startswith('head.'))
    for key in start['loaded']:
        assert torch.equal(weights[key], checkpoint[key]), key
    assert weights['head.weight'].shape == (5, 48) and checkpoint['head.weight'].shape == (3, 48)
    assert model.class_names == FLOWERS
    assert start['weights_sha256'] == hashlib.sha256((folder / 'model.safetensors').read_bytes()).hexdigest()
    assert start['checkpoint'] == str(folder)


def test_as_many_other_classes_get_a_new_head(base):
    """Three classes again, but other ones (or the same in another order): the head's rows would mean other
    classes, so it is initialised anew even though its shape fits."""
    name, folder = base
    base_classes = json.loads((folder / 'config.json').read_text())['label_names']
    checkpoint_head = load_file(str(folder / 'model.safetensors'))['head.weight']
    for classes in (FLOWERS[-3:], base_classes[::-1]):
        assert len(classes) == len(base_classes) and classes != base_classes
        model, start = start_model(name, classes)
        assert start['initialised'] == ['head.bias', 'head.weight'], classes
        assert model.timm_model.head.weight.shape == checkpoint_head.shape
        assert not torch.equal(model.timm_model.head.weight, checkpoint_head)


def test_same_classes_keep_the_head(base):
    name, folder = base
    base_classes = json.loads((folder / 'config.json').read_text())['label_names']
    model, start = start_model(name, base_classes)
    assert start['initialised'] == []
    torch.testing.assert_close(model.timm_model.head.weight, load_file(str(folder / 'model.safetensors'))['head.weight'],
                               rtol=0, atol=0)


def test_not_pretrained_is_the_architecture_with_random_weights(base, monkeypatch):
    name, folder = base
    monkeypatch.setattr(training, 'ensure_base', lambda *a: pytest.fail('no base is needed without --pretrained'))
    model, start = start_model(name, FLOWERS, pretrained=False)
    checkpoint = load_file(str(folder / 'model.safetensors'))
    assert start['loaded'] == [] and len(model.timm_model.blocks) == 2
    assert not torch.equal(model.timm_model.state_dict()['blocks.0.attn.qkv.weight'], checkpoint['blocks.0.attn.qkv.weight'])


def test_a_base_of_another_shape_fails_before_training_with_one_line(base, tmp_path, capsys):
    name, _ = base
    out = tmp_path / 'run'
    wider = json.dumps({**json.loads(TINY_MODEL), 'embed_dim': 96})
    assert run_main(train_hf.main, tiny_args(out, '--model_name_or_path', name, '--pretrained', 'true',
                                             '--model_args', wider, '--max_steps', '1')) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith('error: ') and 'does not fit the model to train' in line
    assert 'shape differs: cls_token [1, 1, 48] vs [1, 1, 96]' in line
    assert not (out / 'model.safetensors').exists() and not list(out.glob('checkpoint-*'))


@pytest.mark.e2e
def test_start_attention_is_the_bases_and_training_records_the_change(base, tmp_path, capsys):
    name, folder = base
    out = tmp_path / 'run'
    train_hf.main(tiny_args(out, '--model_name_or_path', name, '--pretrained', 'true', '--max_steps', '3'))
    run_config = json.loads((out / 'run_config.json').read_text())
    assert run_config['start']['checkpoint'] == str(folder) and run_config['start']['loaded']

    # The start summary equals `python -m analysis extract` on the base checkpoint over the same images.
    # (the base folder's own dataset is the default: name the fine-tuning data's flags explicitly)
    assert cli.main(['extract', '--model', str(folder), '--dataset_name', 'synthetic', *TINY_DATA,
                     '--synthetic_num_classes', '5', '--synthetic_seed', '0',
                     '--output', str(tmp_path / 'base' / 'attentions.safetensors')]) == 0
    ours = json.loads((out / 'attention_metrics_start.json').read_text())
    theirs = json.loads((tmp_path / 'base' / 'attention_metrics.json').read_text())
    assert ours['num_images'] == theirs['num_images'] > 0
    for metric in ('fg_lift', 'pointing_game', 'entropy', 'mean_attention_distance'):
        torch.testing.assert_close(torch.tensor(ours['layers'][metric]['per_head']),
                                   torch.tensor(theirs['layers'][metric]['per_head']), atol=2e-3, rtol=2e-3)

    change = json.loads((out / 'attention_change.json').read_text())
    assert change['num_images'] == ours['num_images'] and len(change['js_divergence']['mean']) == 2
    assert max(change['js_divergence']['mean']) > 0  # three steps of training moved something
    assert (change['start_model'], change['end_model']) == (name, 'run')  # the base, then the fine-tuned model
    assert '<h1>Attention report: run</h1>' in (out / 'report.html').read_text()
    assert 'What training changed in the attention' in (out / 'README.md').read_text()
    assert 'id="change"' in (out / 'report.html').read_text()


@pytest.mark.e2e
def test_a_killed_base_build_leaves_no_cache_entry_and_the_next_build_resumes(tmp_path):
    config = tmp_path / 'base_killed.json'
    config.write_text(json.dumps(base_config(max_steps=40, save_steps=5)))
    env = dict(os.environ, **{train_args.CACHE_ENV: str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1',
                              'PYTHONPATH': str(ROOT)})
    code = f'from analysis.train import base, job; base.ensure_base("base:{config}", job.run)'
    proc = subprocess.Popen([sys.executable, '-c', code], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial_runs = tmp_path / 'cache' / 'bases'
    deadline = time.time() + 240
    while not any(training.last_complete_checkpoint(str(p)) for p in partial_runs.glob('*.partial')):
        assert proc.poll() is None, 'the base build ended before its first checkpoint'
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entries = [p for p in partial_runs.iterdir() if p.suffix != '.lock']
    assert [p.name.endswith('.partial') for p in entries] == [True]  # nothing looks complete

    resumed = subprocess.run([sys.executable, '-c', code], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resuming training from' in resumed.stdout + resumed.stderr
    (entry,) = [p for p in partial_runs.iterdir() if p.suffix != '.lock']
    assert not entry.name.endswith('.partial') and (entry / 'model.safetensors').is_file()


def test_js_divergence_known_values():
    p = torch.tensor([[1.0, 0.0], [0.3, 0.7], [1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0], [0.3, 0.7], [0.5, 0.5]])
    # disjoint -> 1 bit; equal -> 0; [1, 0] vs [.5, .5]: 0.5 log2(4/3) + 0.25 log2(2/3) + 0.25 log2(2) = 0.3113
    torch.testing.assert_close(js_divergence(p, q), torch.tensor([1.0, 0.0, 0.3113]), atol=1e-4, rtol=0)


def test_attention_change_and_run_comparison_on_hand_made_summaries(tmp_path):
    from analysis.maps import summary
    from analysis.modeling.tokens import TokenLayout
    layout = TokenLayout(1, (1, 2), (8, 8))
    fg = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the flower is the left patch of both images
    start = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # [M, P] CLS map of the one layer and head
    end = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    for name, cls in (('start', start), ('end', end)):
        tensors = {'labels': torch.tensor([0, 1]), 'predictions': torch.tensor([0, 1]), 'cls_attention': cls[:, None, None].half(),
                   'rollout': cls.half(), 'fg_fraction': fg.half(), 'example_indices': torch.zeros(0, dtype=torch.long),
                   'example_images': torch.zeros(0, 16, 8, 3, dtype=torch.uint8)}
        meta = {'format': summary.SUMMARY_FORMAT, 'version': summary.SUMMARY_VERSION, 'model_id': name,
                'class_names': ['a', 'b'], 'num_layers': 1, 'num_heads': 1, 'layout': layout.to_dict(),
                'image_size': [8, 16], 'has_masks': True, 'dataset': 'd', 'split': 'test', 'num_images': 2}
        save_summary(tmp_path / f'{name}.safetensors', tensors, meta)
    metrics = {'layers': {'fg_lift': {'mean': [1.0]}}, 'rollout': {}}
    change = attention_change(tmp_path / 'start.safetensors', tmp_path / 'end.safetensors', metrics, metrics)
    # fg_ratio moved from 0.5 to 0.9 and 0.7: mean change 0.3, standard error 0.1 (std 0.1414 / sqrt 2)
    assert change['fg_ratio_change']['mean'] == pytest.approx([0.3], abs=1e-3)
    assert change['fg_ratio_change']['se'] == pytest.approx([0.1], abs=1e-3)
    assert change['js_divergence']['mean'][0] > 0
    off = {'fg_ratio_change': {'mean': [-0.2], 'se': [0.05]}}
    assert compare_runs(off, change)['layers'][0]['verdict'] == 'a moved off the flower more'
    assert compare_runs(change, change)['layers'][0]['verdict'] == 'within noise'
