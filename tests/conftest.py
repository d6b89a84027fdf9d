"""Shared fixtures: one tiny real training run that the end-to-end tests read."""
import pytest

import train_hf

TINY_MODEL = '{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}'
TINY_DATA = ['--synthetic_train_per_class', '8', '--synthetic_validation_per_class', '2',
             '--synthetic_test_per_class', '4', '--synthetic_image_size', '32']


def tiny_args(output_dir, *extra):
    """train_hf.py flags for a run of a few seconds on tiny synthetic flowers."""
    return ['--output_dir', str(output_dir), '--model_args', TINY_MODEL, *TINY_DATA,
            '--per_device_train_batch_size', '8', '--per_device_eval_batch_size', '16',
            '--eval_strategy', 'no', '--save_strategy', 'no', '--report_to', 'none',
            '--disable_tqdm', 'true', *extra]


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    """Output directory of a real (tiny) train_hf.main() run, and its returned test metrics."""
    out = tmp_path_factory.mktemp('tiny_run') / 'run'
    metrics = train_hf.main(tiny_args(out, '--max_steps', '3', '--seed', '1'))
    return out, metrics
