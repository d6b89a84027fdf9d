"""Shared fixtures: one tiny real training run that the end-to-end tests read; a fake Hub."""
import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import save_file

import train_hf

# The tiny ViT every module reuses: 32 px images, a 4 x 4 grid of 8 px patches, 48 wide, 3 blocks of 3 heads.
TINY_VIT = {'img_size': 32, 'patch_size': 8, 'embed_dim': 48, 'depth': 3, 'num_heads': 3}
TINY_MODEL = json.dumps({**TINY_VIT, 'depth': 2})  # --model_args of the tiny training runs (2 blocks)
TINY_DATA = ['--synthetic_train_per_class', '8', '--synthetic_validation_per_class', '2',
             '--synthetic_test_per_class', '4', '--synthetic_image_size', '32']


def tiny_vit(label_names, *, seed: int = 0, random_head: bool = False, **model_args):
    """A tiny random ViT (`TINY_VIT`, ``model_args`` on top) for ``label_names``, in eval mode.

    Args:
        random_head: replace timm's zero-initialised head by random weights, so that predictions vary.
    """
    from analysis.modeling.vit import TimmViTForImageClassification
    torch.manual_seed(seed)
    model = TimmViTForImageClassification.from_timm('vit_tiny_patch16_224', label_names=list(label_names),
                                                    model_args={**TINY_VIT, **model_args})
    if random_head:
        torch.nn.init.normal_(model.timm_model.head.weight, std=0.5)
    return model.eval()


def tiny_base_config(**changes):
    """A tiny base: a 2-block ViT trained for a few steps on 3 synthetic flower classes."""
    config = {'model_name_or_path': 'vit_tiny_patch16_224', 'pretrained': False, 'model_args': TINY_MODEL,
              'dataset_name': 'synthetic', 'synthetic_num_classes': 3, 'synthetic_train_per_class': 8,
              'synthetic_validation_per_class': 2, 'synthetic_test_per_class': 2, 'synthetic_image_size': 32,
              'synthetic_seed': 7, 'max_steps': 4, 'per_device_train_batch_size': 8, 'eval_strategy': 'no',
              'save_strategy': 'steps', 'save_steps': 1, 'report_to': 'none', 'disable_tqdm': True, 'seed': 5,
              'output_dir': 'ignored: the cache decides'}
    return {**config, **changes}


def tiny_args(output_dir, *extra):
    """train_hf.py flags for a run of a few seconds on tiny synthetic flowers (a tiny ViT from scratch)."""
    return ['--output_dir', str(output_dir), '--model_name_or_path', 'vit_tiny_patch16_224', '--pretrained', 'false',
            '--model_args', TINY_MODEL, *TINY_DATA,
            '--per_device_train_batch_size', '8', '--per_device_eval_batch_size', '16',
            '--eval_strategy', 'no', '--save_strategy', 'no', '--report_to', 'none',
            '--disable_tqdm', 'true', *extra]


@contextlib.contextmanager
def base_cache_at(folder: Path):
    """FLOWER_VIT_LENS_CACHE set to ``folder`` inside the block, restored after it."""
    from analysis.train import args as train_args
    old = os.environ.get(train_args.CACHE_ENV)
    os.environ[train_args.CACHE_ENV] = str(folder)
    try:
        yield folder
    finally:
        if old is None:
            del os.environ[train_args.CACHE_ENV]
        else:
            os.environ[train_args.CACHE_ENV] = old


@pytest.fixture(scope='session', autouse=True)
def base_cache(tmp_path_factory):
    """Bases built by the tests (``base:<config>``) go to a temporary cache, never the user's."""
    with base_cache_at(tmp_path_factory.mktemp('base_cache')) as folder:
        yield folder


@pytest.fixture(scope='session')
def tiny_base(base_cache, tmp_path_factory):
    """``(base:<config path>, its cache folder)``: the tiny base, built once per session into the test cache."""
    from analysis.train import base, job
    path = tmp_path_factory.mktemp('configs') / 'base_tiny.json'
    path.write_text(json.dumps(tiny_base_config()))
    name = f'base:{path}'
    return name, base.ensure_base(name, job.run)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    """Output directory of a real (tiny) train_hf.main() run, and its returned test metrics."""
    out = tmp_path_factory.mktemp('tiny_run') / 'run'
    metrics = train_hf.main(tiny_args(out, '--max_steps', '3', '--seed', '1'))
    return out, metrics


@pytest.fixture
def no_stored_token(monkeypatch, tmp_path):
    """No token in the environment or in the token file."""
    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'hf_home' / 'token'))


@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces the three HfApi calls hub.py makes; records what they were asked."""
    calls = {}

    def whoami(self, token=None, **kwargs):
        calls['whoami_token'] = self.token
        return {'name': 'alice', 'orgs': []}

    def create_repo(self, repo_id, **kwargs):
        calls['create_repo'] = dict(repo_id=repo_id, **kwargs)
        return f'https://huggingface.co/{repo_id}'

    def upload_folder(self, **kwargs):
        calls['upload_folder'] = kwargs
        folder = Path(kwargs['folder_path'])
        # What the real client would send: the files that match allow_patterns.
        from huggingface_hub.utils import filter_repo_objects
        everything = [p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file()]
        calls['uploaded'] = set(filter_repo_objects(everything, allow_patterns=kwargs.get('allow_patterns')))
        return None

    monkeypatch.setattr(HfApi, 'whoami', whoami)
    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    return calls


def save_summary(path, tensors, metadata) -> None:
    """Writes a whole attention summary at once (production streams it with `SummaryWriter`): for tests that
    build or doctor one."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={'analysis': json.dumps(metadata)})
