"""The built wheel, installed into a fresh virtual environment outside the checkout, runs a job from another folder.

The environment sees the packages of the interpreter that runs the tests (a ``.pth`` file lists its
site-packages folders, so torch is not installed again, whether the tests run in a venv, a conda env
or a system install) but gets the project itself only from the wheel: the ``.pth`` adds those folders
as plain paths, so the ``.pth`` files inside them, among them an editable install of this checkout,
are not run. The test checks that the modules it runs come from the wheel, not from this checkout.
"""
import json
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import tiny_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.packaging


def run(cmd, cwd, timeout=300):
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f'{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}'
    return result.stdout


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """The wheel, built from a copy of the tracked files (an in-tree build/ could hold stale modules)."""
    source, dist = tmp_path_factory.mktemp('source') / 'src', tmp_path_factory.mktemp('dist')
    tracked = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.split('\0'):
        if name:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name, follow_symlinks=False)
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', dist, source], cwd=dist)
    (path,) = dist.glob('flower_vit_lens-*.whl')
    return path


def test_wheel_carries_templates_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ('train_hf.py', 'analysis/render/templates/model_card.md', 'analysis/render/templates/report/page.html.j2',
                     'analysis/render/templates/report/explorer.html.j2', 'analysis/render/templates/report/explorer.js',
                     'analysis/configs/synthetic_demo.json', 'analysis/configs/oxford102_vit_base.json',
                     'data_scripts/synthetic_flowers.py'):
        assert required in names
    assert not any(name.startswith(('tests/', 'bench/', 'outputs/')) for name in names)
    card = zipfile.ZipFile(wheel).read('analysis/render/templates/model_card.md').decode()
    assert card == (ROOT / 'model_card.md').read_text()  # the real template, not a link


def test_installed_wheel_trains_and_reports_from_another_folder(wheel, tmp_path):
    env_dir = tmp_path / 'venv'
    venv.create(env_dir, with_pip=False)  # this pip installs into it (--python)
    python = env_dir / 'bin' / 'python'
    purelib = run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], cwd=tmp_path).strip()
    ours = [p for p in sys.path if p.endswith(('site-packages', 'dist-packages')) and Path(p).is_dir()]
    (Path(purelib) / 'test_interpreter_packages.pth').write_text('\n'.join(ours) + '\n')
    run([sys.executable, '-m', 'pip', '--python', python, 'install', '-q', '--no-deps', '--ignore-installed', wheel],
        cwd=tmp_path)
    work = tmp_path / 'elsewhere'
    work.mkdir()

    where = run([python, '-c', 'import analysis, data_scripts, train_hf; '
                 'print(analysis.__file__); print(data_scripts.__file__); print(train_hf.__file__)'], cwd=work)
    assert all(line.startswith(str(env_dir)) for line in where.split()), where

    out = work / 'run'
    run([python, '-m', 'train_hf', *tiny_args(out, '--max_steps', '2')], cwd=work)
    for name in ('README.md', 'report.html', 'all_results.json', 'model.safetensors', 'attention_metrics.json'):
        assert (out / name).is_file(), name
    assert 'Per-class results' in (out / 'README.md').read_text()
    assert set(json.loads((out / 'all_results.json').read_text())['test_f1_per_class']) == {
        'black-eyed susan', 'star lily', 'round poppy', 'fringed pink', 'spider aster'}

    # Both at once (each is mostly single-threaded imports): a config named by its packaged path works
    # from a folder that has no configs/, and the study command answers --help.
    helps = [subprocess.Popen([str(python), '-m', *args, '--help'], cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for args in (['train_hf', 'configs/synthetic_demo.json'], ['analysis', 'study'])]
    (train_help, _), (study_help, _) = [p.communicate(timeout=300) for p in helps]
    assert [p.returncode for p in helps] == [0, 0]
    assert '--model_name_or_path' in train_help and '--output_dir' in study_help
