"""train_hf.py --push_to_hub end to end, with HfApi patched at the network boundary (no Hub here)."""
import json

import pytest
from huggingface_hub import ModelCard
from test_hub import TOKEN

import train_hf
from conftest import tiny_args
from data_scripts.hub import HubError


@pytest.mark.e2e
def test_train_pushes_the_finished_run(tmp_path, fake_hub, caplog, capsys):
    out = tmp_path / 'run'
    train_hf.main(tiny_args(out, '--max_steps', '2', '--logging_steps', '1', '--report_to', 'tensorboard',
                            '--push_to_hub', 'true', '--hub_model_id', 'alice/flowers', '--hub_token', TOKEN,
                            '--hub_private_repo', 'true'))
    assert fake_hub['create_repo']['repo_id'] == 'alice/flowers'
    assert fake_hub['create_repo']['private'] is True
    uploaded = set(fake_hub['upload_folder']['allow_patterns'])
    assert {'config.json', 'model.safetensors', 'README.md', 'report.html', 'all_results.json',
            'attention_metrics.json', 'figures/layer_grid.png'} <= uploaded
    assert not any(p.startswith(('checkpoint', 'runs')) or p.endswith(('.bin', '.pt')) for p in uploaded)
    # --report_to tensorboard wrote its event file (kept local)
    assert list((out / 'runs').rglob('events.out.tfevents*'))
    # the card's model-index holds the measured numbers, and every figure it links exists
    card = ModelCard.load(out / 'README.md')
    results = json.loads((out / 'all_results.json').read_text())
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values['accuracy'] == pytest.approx(results['test_accuracy'])
    assert values['f1'] == pytest.approx(results['test_macro_f1'])
    assert 'hf-hub:alice/flowers' in card.text
    # the token is nowhere: not in logs, not in any file written
    logged = caplog.text + ''.join(capsys.readouterr())
    assert TOKEN not in logged
    for path in out.rglob('*'):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_without_token_fails_before_training(tmp_path, no_stored_token):
    out = tmp_path / 'run'
    with pytest.raises(HubError, match='No Hugging Face token'):
        train_hf.main(tiny_args(out, '--max_steps', '2', '--push_to_hub', 'true', '--hub_model_id', 'alice/f'))
    assert not (out / 'model.safetensors').exists() and not (out / 'data_report.json').exists()
    with pytest.raises(ValueError, match='--hub_model_id'):
        train_hf.main(tiny_args(out, '--max_steps', '2', '--push_to_hub', 'true'))
