"""train_hf.py end to end on tiny data: the CLI, resume after a kill, two accelerate processes, bad images."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import train_hf
from analysis.train import args as train_args
from analysis.train import job as training
from conftest import TINY_MODEL, tiny_args

ROOT = Path(__file__).resolve().parents[1]
def subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false')
    env.pop('HF_TOKEN', None)
    return env


@pytest.mark.e2e
def test_cli_end_to_end(tiny_run):
    """The real main() on tiny data leaves every artifact a user reads."""
    out, metrics = tiny_run
    results = json.loads((out / 'all_results.json').read_text())
    names = results['test_class_names']
    assert results['test_accuracy'] == pytest.approx(metrics['test_accuracy'])
    confusion = np.asarray(results['test_confusion_matrix'], dtype=float)  # rows: true class
    per_class = 2 * np.diag(confusion) / np.maximum(confusion.sum(0) + confusion.sum(1), 1)  # F1 = 2TP / (2TP+FP+FN)
    assert results['test_macro_f1'] == pytest.approx(per_class.mean())
    assert [results['test_f1_per_class'][n] for n in names] == pytest.approx(per_class.tolist())
    assert set(results['test_f1_per_class']) == set(names)
    assert np.asarray(results['test_confusion_matrix']).sum() == len(names) * 4
    for name in ('config.json', 'model.safetensors', 'run_config.json', 'data_report.json',
                 'attentions.safetensors', 'attention_metrics.json', 'report.html', 'README.md'):
        assert (out / name).is_file(), name
    run_config = json.loads((out / 'run_config.json').read_text())
    assert run_config['model']['model_args']['depth'] == 2
    assert run_config['training']['seed'] == 1


def test_json_config_and_flag_errors(tmp_path):
    config = tmp_path / 'c.json'
    config.write_text(json.dumps({'output_dir': str(tmp_path / 'o'), 'model_args': TINY_MODEL, 'max_steps': 1}))
    model_args, data_args, training_args = train_args.parse_args([str(config)])
    assert training_args.max_steps == 1 and data_args.dataset_name == 'synthetic'
    assert model_args.timm_kwargs['depth'] == 2
    with pytest.raises(ValueError, match='--model_args'):
        train_args.parse_args(['--model_args', '{not json'])
    # no arguments: the embedded demo, fine-tuning the synthetic-shapes base
    model_args, data_args, training_args = train_args.parse_args([])
    assert model_args.model_name_or_path == 'base:shapes' and model_args.pretrained
    assert model_args.timm_kwargs == {'img_size': 64}  # the base is trained at 32 px
    assert data_args.dataset_name == 'synthetic'
    demo = json.loads((ROOT / 'configs' / 'synthetic_demo.json').read_text())
    from_file = train_args.parse_args([str(ROOT / 'configs' / 'synthetic_demo.json')])
    assert [vars(a) for a in from_file[:2]] == [vars(model_args), vars(data_args)]
    assert from_file[2].learning_rate == training_args.learning_rate == demo['learning_rate']


def test_config_file_then_flags_and_model_args_defaults(tmp_path):
    demo = str(ROOT / 'configs' / 'synthetic_demo.json')
    _, _, training_args = train_args.parse_args([demo, '--max_steps', '7', '--output_dir', str(tmp_path)])
    assert training_args.max_steps == 7 and training_args.learning_rate == json.loads(Path(demo).read_text())['learning_rate']
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'max_stepz': 3}))
    with pytest.raises(ValueError, match='max_stepz'):
        train_args.parse_args([str(bad)])
    model_args, _, _ = train_args.parse_args(['--model_name_or_path', 'vit_base_patch16_224', '--pretrained', 'true'])
    assert model_args.timm_kwargs == {}
    with pytest.raises(ValueError, match='persistent_workers'):
        train_hf.main(tiny_args(tmp_path / 'o', '--dataloader_num_workers', '1',
                                '--dataloader_persistent_workers', 'true', '--max_steps', '1'))


def test_last_complete_checkpoint_is_the_newest_complete_one(tmp_path):
    # 9 and 10 complete; 12 cut off while saving (no trainer_state.json); 11 with a cut-off state file.
    # Numeric order matters: as strings, "checkpoint-9" sorts after "checkpoint-12".
    for step, state in ((9, '{}'), (10, '{}'), (11, '{"cut'), (12, None)):
        d = tmp_path / f'checkpoint-{step}'
        d.mkdir()
        (d / 'model.safetensors').write_bytes(b'x')
        if state is not None:
            (d / 'trainer_state.json').write_text(state)
    (tmp_path / 'checkpoint-final').mkdir()  # not a step: ignored
    assert training.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint-10')
    assert training.last_complete_checkpoint(str(tmp_path / 'missing')) is None


@pytest.mark.e2e
def test_killed_run_resumes_and_matches_uninterrupted(tmp_path):
    """SIGKILL mid-run, start again with the same --output_dir: it resumes and ends with the same weights."""
    args = ['--max_steps', '40', '--save_strategy', 'steps', '--save_steps', '5', '--seed', '3',
            '--model_args', '{"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}',
            '--synthetic_train_per_class', '40', '--per_device_train_batch_size', '16', '--analysis_batches', '1']
    cmd = [sys.executable, str(ROOT / 'train_hf.py')]
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    subprocess.run(cmd + tiny_args(full, *args), check=True, env=subprocess_env(), cwd=tmp_path,
                   capture_output=True)

    proc = subprocess.Popen(cmd + tiny_args(killed, *args), env=subprocess_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # trainer_state.json is written last, but not atomically: wait until checkpoint-5 is complete
    while training.last_complete_checkpoint(str(killed)) is None:
        assert proc.poll() is None, 'the run ended before its first checkpoint'
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / 'model.safetensors').exists(), 'the run finished before it could be killed'
    record = json.loads((killed / 'run_config.json').read_text())  # written before the first step
    assert record['training']['seed'] == 3 and record['training']['max_steps'] == 40
    assert record['train_runtime_s'] is None and record['start']['initialised']

    resumed = subprocess.run(cmd + tiny_args(killed, *args), env=subprocess_env(), cwd=tmp_path,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resuming training from' in (resumed.stdout + resumed.stderr)
    assert json.loads((killed / 'run_config.json').read_text())['train_runtime_s'] > 0  # updated at the end
    a, b = load_file(full / 'model.safetensors'), load_file(killed / 'model.safetensors')
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f'resumed vs uninterrupted: max |weight difference| = {worst}')
    assert worst <= 1e-6, f'resumed weights differ from the uninterrupted run by {worst}'


LAUNCH = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
          '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no']


@pytest.mark.distributed
def test_two_process_accelerate_launch_equals_one_process_of_the_same_global_batch(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m train_hf` on CPU: two gloo ranks train one model.

    Two ranks of batch 4 see, step by step, the images one process of batch 8 sees, and DDP averages
    their gradients: the weights and the test scores must be those of the one-process run (up to
    float rounding). The module form (`-m train_hf`, as from an installed package); the resume test
    runs `train_hf.py`.
    """
    common = ('--max_steps', '3', '--analysis_batches', '1', '--seed', '4')
    ddp, single = tmp_path / 'ddp', tmp_path / 'single'
    cmd = [*LAUNCH, '--main_process_port', '29533', '-m', 'train_hf',
           *tiny_args(ddp, *common, '--per_device_train_batch_size', '4')]
    env = subprocess_env() | {'ACCELERATE_USE_CPU': 'true'}
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    train_hf.main(tiny_args(single, *common, '--per_device_train_batch_size', '8'))

    assert json.loads((ddp / 'run_config.json').read_text())['environment']['num_processes'] == 2
    a, b = load_file(ddp / 'model.safetensors'), load_file(single / 'model.safetensors')
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f'2 ranks x batch 4 vs 1 process x batch 8: max |weight difference| = {worst}')
    assert worst < 1e-4, f'2 ranks x batch 4 vs 1 process x batch 8: max |weight difference| = {worst}'
    ddp_results, single_results = (json.loads((d / 'all_results.json').read_text()) for d in (ddp, single))
    assert ddp_results['test_confusion_matrix'] == single_results['test_confusion_matrix']


@pytest.mark.distributed
def test_a_launch_that_is_not_distributed_stops_before_any_work(tmp_path):
    """2 processes launched on a CPU machine without ACCELERATE_USE_CPU do not form one job: one error, no copies."""
    out, cache = tmp_path / 'run', tmp_path / 'cache'
    cmd = [*LAUNCH, '--main_process_port', '29534', str(ROOT / 'train_hf.py'), *tiny_args(out, '--max_steps', '2')]
    env = subprocess_env() | {train_args.CACHE_ENV: str(cache)}
    env.pop('ACCELERATE_USE_CPU', None)
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 2 and 'do not form one distributed job' in errors[0] and 'ACCELERATE_USE_CPU=true' in errors[0]
    assert not out.exists() and not cache.exists()  # no data report, no checkpoint, no base


def _write_folder(root: Path, bad: bool):
    rng = np.random.default_rng(0)
    for split, n in (('train', 6), ('validation', 2)):
        for cls, hue in (('red', 0), ('blue', 2)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.zeros((32, 32, 3), np.uint8)
                pixels[..., hue] = rng.integers(150, 255, (32, 32))
                Image.fromarray(pixels).save(d / f'{i}.png')
    if bad:
        (root / 'train' / 'red' / 'empty.jpg').write_bytes(b'')
        (root / 'train' / 'blue' / 'notes.png').write_text('not an image')


@pytest.mark.e2e
def test_image_folder_with_bad_images(tmp_path):
    data = tmp_path / 'data'
    _write_folder(data, bad=True)
    out = tmp_path / 'run'
    args = tiny_args(out, '--max_steps', '2', '--train_dir', str(data / 'train'),
                     '--validation_dir', str(data / 'validation'))
    train_hf.main(args)
    report = json.loads((out / 'data_report.json').read_text())
    assert report['num_skipped'] == 2
    assert {Path(s['path']).name for s in report['skipped']} == {'empty.jpg', 'notes.png'}
    results = json.loads((out / 'all_results.json').read_text())
    assert results['test_split'] == 'validation'
    assert sorted(results['test_class_names']) == ['blue', 'red']

    with pytest.raises(ValueError, match='empty.jpg'):
        train_hf.main(tiny_args(tmp_path / 'strict', '--max_steps', '1', '--train_dir', str(data / 'train'),
                                '--strict_images', 'true'))
