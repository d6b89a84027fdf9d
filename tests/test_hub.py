"""Tests of analysis/hub.py and data_scripts/hub.py. There is no Hub here: HfApi is patched at the network boundary."""
import logging
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from test_card import make_run_dir

from analysis.publish.hub import files_to_upload, push_output_dir
from data_scripts import hub
from data_scripts.hub import HubError, check_hub_access, resolve_token

TOKEN = 'hf_SecretTokenThatMustNeverLeak123'
PUBLISHED = {
    'config.json', 'model.safetensors', 'README.md', 'all_results.json', 'run_config.json',
    'data_report.json', 'attention_metrics.json', 'attentions.safetensors', 'background.json',
    'importance.json', 'report.html', 'figures/confusion_matrix.png', 'figures/layer_grid.png',
    'figures/head_maps_layer2.png',
}
LOCAL_ONLY = [
    'checkpoint-10/model.safetensors', 'checkpoint-10/optimizer.pt', 'runs/Nov30/events.out.tfevents.1',
    'optimizer.pt', 'scheduler.pt', 'rng_state.pth', 'training_args.bin', 'pytorch_model.bin',
    'train.log', 'trainer_state.json', '.git/config', 'figures/notes.txt', 'figures/old/layer_grid.png',
]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A full run folder: every published file plus everything that must stay local."""
    run = make_run_dir(tmp_path / 'run')
    for name in ['model.safetensors', 'data_report.json', 'attentions.safetensors', 'background.json',
                 'importance.json', 'report.html'] + LOCAL_ONLY:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b'{}' if name.endswith('.json') else b'bytes of ' + name.encode())
    return run


def test_files_to_upload_selects_exactly_the_published_files(run_dir):
    assert set(files_to_upload(run_dir)) == PUBLISHED - {'README.md'}  # no card rendered yet
    (run_dir / 'README.md').write_text('card')
    assert set(files_to_upload(run_dir)) == PUBLISHED


def test_push_uploads_exact_files_and_repo_settings(run_dir, fake_hub, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    url = push_output_dir(run_dir, 'alice/flower-vit', private=True, token=TOKEN)
    assert url == 'https://huggingface.co/alice/flower-vit'
    assert fake_hub['whoami_token'] == TOKEN
    assert fake_hub['create_repo'] == {'repo_id': 'alice/flower-vit', 'private': True, 'exist_ok': True,
                                       'repo_type': 'model'}
    upload = fake_hub['upload_folder']
    assert upload['repo_id'] == 'alice/flower-vit' and upload['repo_type'] == 'model'
    assert Path(upload['folder_path']) == run_dir
    assert set(upload['allow_patterns']) == PUBLISHED
    assert fake_hub['uploaded'] == PUBLISHED
    # The card was re-rendered for this repository.
    assert 'hf-hub:alice/flower-vit' in ModelCard.load(run_dir / 'README.md').text
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err
    assert all(TOKEN.encode() not in path.read_bytes() for path in run_dir.rglob('*') if path.is_file())


def test_push_public_by_default(run_dir, fake_hub):
    push_output_dir(run_dir, 'alice/flower-vit', token=TOKEN)
    assert fake_hub['create_repo']['private'] is False


def test_dry_run_copies_exactly_the_published_files(run_dir, tmp_path, no_stored_token, fake_hub):
    out = push_output_dir(run_dir, 'alice/flower-vit', dry_run_dir=tmp_path / 'dry')
    assert out == tmp_path / 'dry'
    copied = {p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file()}
    assert copied == PUBLISHED
    for name in ('config.json', 'model.safetensors'):
        assert (out / name).read_bytes() == (run_dir / name).read_bytes()
    assert fake_hub == {}  # no Hub call at all, and no token needed


def test_dry_run_refuses_non_empty_folder(run_dir, tmp_path):
    (tmp_path / 'dry').mkdir()
    (tmp_path / 'dry' / 'keep.txt').write_text('x')
    with pytest.raises(ValueError, match='not empty'):
        push_output_dir(run_dir, 'alice/flower-vit', dry_run_dir=tmp_path / 'dry')


def test_push_refuses_file_containing_the_token(run_dir, fake_hub):
    (run_dir / 'run_config.json').write_text(
        (run_dir / 'run_config.json').read_text().replace('<HUB_TOKEN>', TOKEN))
    with pytest.raises(HubError, match='run_config.json contains your Hugging Face token') as info:
        push_output_dir(run_dir, 'alice/flower-vit', token=TOKEN)
    assert TOKEN not in str(info.value)
    assert 'upload_folder' not in fake_hub and 'create_repo' not in fake_hub


def test_push_requires_a_trained_model(run_dir, fake_hub):
    (run_dir / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        push_output_dir(run_dir, 'alice/flower-vit', token=TOKEN)
    assert fake_hub == {}


def test_missing_token_is_one_line_error(no_stored_token, run_dir, fake_hub):
    with pytest.raises(HubError) as info:
        resolve_token()
    assert str(info.value) == hub.NO_TOKEN_MESSAGE
    assert '\n' not in str(info.value)
    with pytest.raises(HubError, match='No Hugging Face token found'):
        push_output_dir(run_dir, 'alice/flower-vit')
    assert fake_hub == {}


def test_resolve_token_prefers_argument_then_environment(no_stored_token, monkeypatch):
    assert resolve_token('hf_explicit') == 'hf_explicit'
    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    assert resolve_token() == 'hf_from_env'


def test_unreachable_hub_fails_fast(monkeypatch, caplog):
    # A closed local port: the connection is refused at once, as when the Hub is unreachable.
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')
    start = time.monotonic()
    with pytest.raises(HubError, match=r'Cannot reach the Hugging Face Hub \(http://127.0.0.1:9\)') as info:
        check_hub_access('alice/flower-vit', TOKEN)
    assert time.monotonic() - start < 5
    assert TOKEN not in str(info.value) and TOKEN not in caplog.text
    assert '--dry_run' in str(info.value)


@pytest.mark.parametrize('error', [ConnectionError('network is down'), httpx2.ConnectError('dns failure')])
def test_connection_errors_become_hub_errors(monkeypatch, error):
    def whoami(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(HfApi, 'whoami', whoami)
    with pytest.raises(HubError, match='Cannot reach the Hugging Face Hub'):
        check_hub_access('alice/flower-vit', TOKEN)


def test_hanging_hub_times_out(monkeypatch):
    monkeypatch.setattr(HfApi, 'whoami', lambda self, *a, **k: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(HubError, match='no answer within 0.2 s'):
        check_hub_access('alice/flower-vit', TOKEN, timeout_s=0.2)
    assert time.monotonic() - start < 5


def test_rejected_token(monkeypatch):
    def whoami(self, *args, **kwargs):
        request = httpx2.Request('GET', 'https://huggingface.co/api/whoami-v2')
        raise HfHubHTTPError('Invalid user token.', response=httpx2.Response(401, request=request))
    monkeypatch.setattr(HfApi, 'whoami', whoami)
    with pytest.raises(HubError, match='The token was rejected') as info:
        check_hub_access('alice/flower-vit', TOKEN)
    assert TOKEN not in str(info.value)


def test_bad_repo_id_is_value_error(fake_hub):
    with pytest.raises(ValueError, match='--repo_id'):
        check_hub_access('not a/valid//id', TOKEN)
    assert fake_hub == {}


# --- data_scripts/push.py: publishing a prepared dataset -------------------------------------

def _tiny_synthetic_flags(tmp_path):
    return ['--dataset', 'synthetic', '--synthetic_train_per_class', '2', '--synthetic_validation_per_class', '1',
            '--synthetic_test_per_class', '1', '--synthetic_image_size', '64', '--cache_dir', str(tmp_path / 'cache')]


def test_dataset_dry_run_reloads_with_labels_names_and_masks(tmp_path, no_stored_token):
    import datasets
    import numpy as np
    from transformers import HfArgumentParser

    from data_scripts import DataArguments, load_flower_dataset
    from data_scripts.push import main

    flags = _tiny_synthetic_flags(tmp_path)
    out = main(flags + ['--dry_run', str(tmp_path / 'hub_layout')])
    assert {p.name for p in (out / 'data').iterdir()} == {
        'train-00000-of-00001.parquet', 'validation-00000-of-00001.parquet', 'test-00000-of-00001.parquet'}
    reloaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / 'reload_cache'))
    (data_args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(args=flags)
    original = load_flower_dataset(data_args)
    assert set(reloaded) == set(original)
    for split in original:
        assert reloaded[split].features['label'].names == original[split].features['label'].names
        assert reloaded[split]['label'] == original[split]['label']
        assert isinstance(reloaded[split].features['mask'], datasets.Image)
        for got, want in zip(reloaded[split], original[split]):
            assert np.array_equal(np.asarray(got['image']), np.asarray(want['image']))
            assert np.array_equal(np.asarray(got['mask']), np.asarray(want['mask']))


def test_dataset_push_calls_push_to_hub(tmp_path, monkeypatch, no_stored_token, fake_hub, caplog):
    import datasets

    from data_scripts.push import main

    pushed = {}

    def push_to_hub(self, repo_id, **kwargs):
        pushed.update(repo_id=repo_id, splits=sorted(self), **kwargs)

    monkeypatch.setattr(datasets.DatasetDict, 'push_to_hub', push_to_hub)
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    caplog.set_level(logging.DEBUG)
    url = main(_tiny_synthetic_flags(tmp_path) + ['--repo_id', 'alice/synthetic-flowers', '--private'])
    assert url.endswith('/datasets/alice/synthetic-flowers')
    assert fake_hub['whoami_token'] == TOKEN  # preflight ran
    assert pushed == {'repo_id': 'alice/synthetic-flowers', 'splits': ['test', 'train', 'validation'],
                      'private': True, 'token': TOKEN}
    assert TOKEN not in caplog.text


def test_dataset_push_needs_repo_id_or_dry_run(tmp_path):
    from data_scripts.push import main
    with pytest.raises(ValueError, match='--repo_id is required'):
        main(_tiny_synthetic_flags(tmp_path))


def test_push_with_a_space_uploads_the_model_then_the_space(run_dir, fake_hub, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    urls = push_output_dir(run_dir, 'alice/flower-vit', token=TOKEN, space_id='alice/flower-vit-lens')
    assert urls.splitlines() == ['https://huggingface.co/alice/flower-vit', 'https://huggingface.co/alice/flower-vit-lens']
    assert fake_hub['create_repo'] == {'repo_id': 'alice/flower-vit-lens', 'private': False, 'exist_ok': True,
                                       'repo_type': 'space', 'space_sdk': 'gradio'}
    upload = fake_hub['upload_folder']
    assert upload['repo_id'] == 'alice/flower-vit-lens' and upload['repo_type'] == 'space'
    assert {'app.py', 'requirements.txt', 'README.md', 'analysis/app.py', 'analysis/configs/synthetic_demo.json',
            'analysis/render/templates/model_card.md', 'data_scripts/hygiene.py'} <= fake_hub['uploaded']
    assert not any('__pycache__' in name for name in fake_hub['uploaded'])
    assert '(https://huggingface.co/spaces/alice/flower-vit-lens)' in ModelCard.load(run_dir / 'README.md').text
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err


def test_a_space_named_like_the_model_is_refused(run_dir, fake_hub):
    with pytest.raises(ValueError, match='is the model repo itself'):
        push_output_dir(run_dir, 'alice/flower-vit', token=TOKEN, space_id='alice/flower-vit')
    assert 'create_repo' not in fake_hub
