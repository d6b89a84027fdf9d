"""Bad invocations of train_hf.py end with one `error:` line, before any data is generated; bugs keep their traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_hygiene import write_messy_folder

import train_hf
from analysis.train import job as training
from conftest import tiny_args
from data_scripts.errors import TRACEBACK_ENV, UserError, run_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if any dataset is loaded: argument errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError('a dataset was loaded before the bad argument was reported')
    monkeypatch.setattr(training, 'load_flower_dataset', refuse)


def one_error_line(argv, capsys) -> str:
    """Runs train_hf's main as its command line does; returns the one stderr line (without 'error: ')."""
    capsys.readouterr()
    assert run_main(train_hf.main, argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0][len('error: '):]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# (invocation, a fragment of its one line). {tmp} is a fresh folder; {file} an existing file.
BAD_INVOCATIONS = [
    (['--num_train_epochs', '-1'], '--num_train_epochs must be > 0 (or give --max_steps); got -1.0'),
    (['--num_train_epochs', '0'], '--num_train_epochs must be > 0'),
    (['--max_steps', '0'], '--max_steps must be > 0, or -1 to train for --num_train_epochs; got 0'),
    (['--learning_rate', '0'], '--learning_rate must be > 0, got 0.0'),
    (['--per_device_train_batch_size', '0'], '--per_device_train_batch_size must be >= 1, got 0'),
    (['--train_dir', '{tmp}/missing'], '--train_dir {tmp}/missing is not a folder'),
    (['--validation_dir', '{tmp}'], '--validation_dir / --test_dir need --train_dir as well'),
    (['--dataset_name', 'oxford102'], '--dataset_name oxford102 needs --data_dir'),
    (['--dataset_name', 'oxford102', '--data_dir', '{tmp}/none'], '--data_dir {tmp}/none is not a folder'),
    (['--model_name_or_path', 'outputs/typo'], '--model_name_or_path outputs/typo is not a folder'),
    (['--model_name_or_path', './typo'], '--model_name_or_path ./typo is not a folder'),
    (['--model_name_or_path', 'vit_tnyi_patch16_224'], 'is not a timm model name, a folder, a Hub repo id'),
    (['--model_name_or_path', 'base:nope'], 'base:nope: no packaged config base_nope.json'),
    (['--model_args', '[1, 2]'], '--model_args must be a JSON dict'),
    (['--model_args', '{{not json'], '--model_args must be a JSON dict'),
    (['--synthetic_num_classes', '9'], '--synthetic_num_classes must be in 2..6, got 9'),
    (['--min_crop_scale', '0'], '--min_crop_scale must be in (0, 1], got 0.0'),
    (['--color_jitter', '-0.1'], '--color_jitter must be >= 0 (0: no jitter), got -0.1'),
    (['--faithfulness_images', '-1'], '--faithfulness_images must be >= 0 (0 skips the scores), got -1'),
    (['--dataset_name', 'synthetic_shapes', '--synthetic_background', 'correlated'],
     '--synthetic_background is a flower-set flag; synthetic_shapes draws its backgrounds at random'),
    (['--resume_from_checkpoint', '{tmp}/checkpoint-9'], '--resume_from_checkpoint {tmp}/checkpoint-9 is not a folder'),
    (['--output_dir', '{file}'], 'is a file; give a folder'),
    (['--push_to_hub', 'true'], '--push_to_hub needs --hub_model_id user/name'),
    (['{tmp}/nope.json'], 'config file {tmp}/nope.json does not exist'),
    (['{unknown_key_config}'], "unknown keys in the config file"),
    (['{broken_config}'], 'is not valid JSON'),
]


@pytest.mark.parametrize('argv, expected', BAD_INVOCATIONS, ids=[' '.join(a) for a, _ in BAD_INVOCATIONS])
def test_bad_invocation_is_one_line_before_any_data(argv, expected, tmp_path, capsys, no_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'outputs').mkdir()  # so that outputs/typo reads as a local path, as in a checkout
    names = {'tmp': str(tmp_path), 'file': write(tmp_path / 'a_file', 'x'),
             'unknown_key_config': write(tmp_path / 'unknown.json', json.dumps({'num_train_epoch': 3})),
             'broken_config': write(tmp_path / 'broken.json', '{"seed": 1,')}
    argv = [a.format(**names) for a in argv]
    assert expected.format(**names) in one_error_line(argv, capsys)


def test_strict_images_is_one_line_and_the_report_is_written(tmp_path, capsys):
    train = write_messy_folder(tmp_path / 'train')
    out = tmp_path / 'run'
    line = one_error_line(tiny_args(out, '--train_dir', train, '--train_val_split', '0.5', '--strict_images', 'true'),
                          capsys)
    assert line.startswith(f'3 unusable image(s) (all listed in {out}/data_report.json): ')
    assert 'empty.jpg' in line and '--strict_images' in line
    assert json.loads((out / 'data_report.json').read_text())['num_skipped'] == 3  # nothing is lost


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError('a bug, not a user error')
    monkeypatch.setattr(training, 'load_flower_dataset', bug)
    with pytest.raises(KeyError):
        run_main(train_hf.main, ['--max_steps', '1'])


def test_a_library_value_error_keeps_its_traceback(monkeypatch, capsys):
    """A ValueError raised inside numpy (here: an impossible reshape) is a bug, not a user error."""
    def bug(*args, **kwargs):
        return np.zeros(3).reshape(2)
    monkeypatch.setattr(training, 'load_flower_dataset', bug)
    with pytest.raises(ValueError, match='cannot reshape') as raised:
        run_main(train_hf.main, ['--max_steps', '1'])
    assert not isinstance(raised.value, UserError)
    assert 'error:' not in capsys.readouterr().err


@pytest.mark.e2e
def test_a_launch_that_is_not_one_job_is_a_user_error(monkeypatch):
    from analysis.core.launch import check_launch
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    check_launch(False)  # no launcher: one process, nothing to check
    monkeypatch.setenv('WORLD_SIZE', '2')
    check_launch(True)  # two processes that form one job
    with pytest.raises(UserError, match='2 processes were launched, but they do not form one distributed job'):
        check_launch(False)


def test_command_line_prints_one_line_and_the_traceback_on_request(tmp_path):
    cmd = [sys.executable, str(ROOT / 'train_hf.py'), '--num_train_epochs', '-1', '--output_dir', str(tmp_path)]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, TRACEBACK_ENV: ''})
    assert quiet.returncode == 1
    assert quiet.stderr.strip().splitlines()[-1] == 'error: --num_train_epochs must be > 0 (or give --max_steps); got -1.0'
    assert 'Traceback' not in quiet.stderr
    loud = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, TRACEBACK_ENV: '1'})
    assert loud.returncode == 1 and 'Traceback' in loud.stderr and 'UserError' in loud.stderr
