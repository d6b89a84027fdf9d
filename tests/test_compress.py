"""Compression: the smaller model, its loaders, the distillation loss the Trainer optimises, the search, the command."""
import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, TrainingArguments, pipeline

from analysis.compress import run as compress
from analysis.compress.blocks import build_student, kept_blocks_state_dict, removal_order
from analysis.compress.claim import claim_output_dir
from analysis.compress.distill import DistillationTrainer, distillation_loss
from analysis.compress.result import compress_summary
from analysis.compress.run import search_depth
from analysis.compress.speed import gflops, inference_throughput
from analysis.modeling.timm_internals import skip_blocks
from analysis.modeling.transforms import eval_transform, model_data_config
from analysis.modeling.vit import TimmViTForImageClassification
from conftest import tiny_vit

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
CLASSES = ['daisy', 'tulip', 'rose']


@pytest.fixture(scope='module')
def teacher():
    return tiny_vit(CLASSES, depth=4)


def test_kept_blocks_are_renumbered():
    state = {'cls_token': 0, 'blocks.0.norm1.weight': 10, 'blocks.1.norm1.weight': 11, 'blocks.2.attn.qkv.bias': 12,
             'blocks.10.mlp.fc1.weight': 20, 'norm.weight': 5}
    assert kept_blocks_state_dict(state, [2, 10]) == {
        'cls_token': 0, 'blocks.0.attn.qkv.bias': 12, 'blocks.1.mlp.fc1.weight': 20, 'norm.weight': 5}


def test_student_is_the_teacher_with_the_other_blocks_skipped(teacher):
    x = torch.randn(4, 3, 32, 32)
    student = build_student(teacher, [0, 2]).eval()
    assert len(student.timm_model.blocks) == 2 and student.config.model_args['depth'] == 2
    with torch.no_grad(), skip_blocks(teacher, [1, 3]):
        expected = teacher(x).logits
    with torch.no_grad():
        assert torch.allclose(student(x).logits, expected, atol=1e-6)
        assert not torch.allclose(teacher(x).logits, expected, atol=1e-3)  # the skipped blocks mattered
    with pytest.raises(ValueError, match='increasing'):
        build_student(teacher, [2, 0])
    with pytest.raises(ValueError, match='increasing'):
        build_student(teacher, [0, 4])


@pytest.mark.parametrize('registers', [0, 4])
def test_compressed_checkpoint_gives_the_same_logits_through_the_four_loaders(teacher, tmp_path, registers):
    """timm local-dir:, AutoModelForImageClassification, pipeline and our class (with attentions) agree, with and
    without register tokens."""
    if registers:
        teacher = tiny_vit(CLASSES, depth=4, reg_tokens=registers)
    student = build_student(teacher, [1, 3]).eval()
    student.save_pretrained(tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['model_args']['depth'] == 2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = student(x).logits
        by_timm = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
        assert len(by_timm.blocks) == 2
        by_auto = AutoModelForImageClassification.from_pretrained(tmp_path).eval()(x).logits
        out = TimmViTForImageClassification.from_pretrained(tmp_path).eval()(x, output_attentions=True)
    for logits in (by_timm(x), by_auto, out.logits):
        assert torch.allclose(logits, ref, atol=1e-5)
    tokens = 1 + registers + 16
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 3, tokens, tokens)
    assert student.token_layout.num_prefix_tokens == 1 + registers

    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    scores = {r['label']: r['score'] for r in pipeline('image-classification', model=str(tmp_path))(image, top_k=3)}
    with torch.no_grad():
        probs = student(eval_transform(model_data_config(student.timm_model))(image)[None]).logits.softmax(-1)[0]
    for i, name in enumerate(CLASSES):
        assert scores[name] == pytest.approx(probs[i].item(), abs=1e-4)


@pytest.mark.e2e
def test_compressed_checkpoint_loads_from_the_hub_with_the_same_logits(teacher, tmp_path):
    """The same files laid out as a Hub snapshot: timm hf-hub:, AutoModel and pipeline by repo id (offline)."""
    import os
    import subprocess
    import sys
    student = build_student(teacher, [0, 2]).eval()
    snapshot = tmp_path / 'hf' / 'hub' / 'models--alice--small' / 'snapshots' / ('0' * 40)
    student.save_pretrained(snapshot)
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('0' * 40)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = student(x).logits
    code = """
import json, torch, timm
from transformers import AutoModelForImageClassification
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    by_timm = timm.create_model('hf-hub:alice/small', pretrained=True).eval()
    print(json.dumps({'blocks': len(by_timm.blocks), 'timm': by_timm(x).tolist(),
                      'auto': AutoModelForImageClassification.from_pretrained('alice/small').eval()(x).logits.tolist()}))
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    env.pop('HF_TOKEN', None)
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded['blocks'] == 2
    for name in ('timm', 'auto'):
        assert torch.allclose(torch.tensor(loaded[name]), reference, atol=1e-5), name


def hand_loss(student_logits, teacher_logits, labels, temperature, alpha):
    """The distillation loss written out in numpy (float64), for one batch."""
    s, t = np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    p_teacher = np.exp(log_softmax(t / temperature))
    kl = (p_teacher * (log_softmax(t / temperature) - log_softmax(s / temperature))).sum(-1).mean()
    ce = -log_softmax(s)[np.arange(len(labels)), labels].mean()
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def test_distillation_loss_is_the_hand_computed_one():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    teacher_logits = torch.tensor([[1.0, 1.5, -0.5], [0.0, -1.0, 2.0]])
    labels = torch.tensor([0, 2])
    for temperature, alpha in ((1.0, 0.5), (4.0, 0.9), (2.0, 0.0)):
        expected = hand_loss(student, teacher_logits, labels.numpy(), temperature, alpha)
        assert float(distillation_loss(student, teacher_logits, labels, temperature, alpha)) == pytest.approx(expected)


def test_the_trainer_optimises_the_distillation_loss(teacher, tmp_path):
    """trainer.compute_loss and one training_step on a fixed batch: the hand-computed loss and its gradient."""
    torch.manual_seed(1)
    student = build_student(teacher, [0, 3])
    for p in student.parameters():  # not the teacher's weights: the soft term is then far from zero
        p.data.add_(0.05 * torch.randn_like(p))
    args = TrainingArguments(output_dir=str(tmp_path), report_to='none', use_cpu=True, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2)
    trainer = DistillationTrainer(model=student, args=args, teacher=teacher, temperature=3.0, alpha=0.7)
    trainer.current_gradient_accumulation_steps = 2  # what Trainer's loop sets before its steps
    batch = {'pixel_values': torch.randn(4, 3, 32, 32), 'labels': torch.tensor([0, 1, 2, 1])}
    student.eval()  # no dropout in these models; eval keeps the hand computation on the same path
    with torch.no_grad():
        expected = hand_loss(student(batch['pixel_values']).logits, teacher(batch['pixel_values']).logits,
                             batch['labels'].numpy(), 3.0, 0.7)
    assert float(trainer.compute_loss(student, batch).detach()) == pytest.approx(expected, rel=1e-5)

    student.zero_grad()
    reference = distillation_loss(student(batch['pixel_values']).logits, teacher(batch['pixel_values']).logits.detach(),
                                  batch['labels'], 3.0, 0.7)
    expected_grads = torch.autograd.grad(reference, [p for p in student.parameters()])
    student.zero_grad()
    step_loss = trainer.training_step(student, dict(batch))  # one of two accumulated batches: half of each
    assert float(step_loss) == pytest.approx(expected / 2, rel=1e-5)
    for (name, p), g in zip(student.named_parameters(), expected_grads):
        assert torch.allclose(p.grad, g / 2, atol=1e-6), name
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_search_finds_the_smallest_depth_within_tolerance():
    for num_blocks in (2, 3, 12, 13):
        for smallest in range(1, num_blocks + 1):
            calls = []

            def within(depth):
                calls.append(depth)
                return depth >= smallest
            depth, walked = search_depth(num_blocks, within)
            assert depth == (smallest if smallest < num_blocks else None)
            assert walked == calls and len(walked) <= math.ceil(math.log2(num_blocks))
    assert search_depth(1, lambda d: True) == (None, [])


def test_removal_order_removes_a_do_nothing_block_first(teacher):
    """A block whose residual branches output zero changes nothing: it must go first, at zero KL."""
    model = build_student(teacher, [0, 1, 2, 3]).eval()
    block = model.timm_model.blocks[2]
    for layer in (block.attn.proj, block.mlp.fc2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    removal = removal_order(model, x, labels)
    assert removal['order'][0] == 2 and removal['kl'][0] == pytest.approx(0.0, abs=1e-7)
    assert len(set(removal['order'])) == 3 and removal['kl'][-1] > 0  # three distinct blocks go, one stays


def test_gflops_counts_every_matmul_attention_included(teacher):
    n, d, classes = 17, 48, 3  # tokens (16 patches + CLS), width (3 heads of 16), classes
    # qkv, q k^T and attn v (over all heads: 2 N N d each), proj, mlp fc1 + fc2
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 4 * d
    patch_embed = 2 * 16 * (3 * 8 * 8) * d
    expected = 4 * per_block + patch_embed + 2 * d * classes
    assert gflops(teacher) * 1e9 == pytest.approx(expected)
    assert all(attn.fused_attn for attn in (b.attn for b in teacher.timm_model.blocks))  # restored


def test_throughput_is_measured_alternately(teacher):
    calls = []
    a, b = build_student(teacher, [0]), build_student(teacher, [1, 2])
    hooks = [m.timm_model.register_forward_hook(lambda *_, n=name: calls.append(n)) for name, m in (('a', a), ('b', b))]
    threads = torch.get_num_threads()
    try:
        rates = inference_throughput({'a': a, 'b': b}, batch_size=2, threads=1, rounds=3, batches_per_round=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ['a', 'b'] + ['a', 'b', 'b', 'a', 'a', 'b']  # warm-up, then rounds in alternating order
    assert [len(rates['a']), len(rates['b'])] == [3, 3] and torch.get_num_threads() == threads


def test_an_output_dir_holding_another_run_is_refused(tmp_path):
    claim = {'base_model': {'weights_sha256': 'abc'}, 'settings': {'max_accuracy_drop': 0.01}}
    claim_output_dir(tmp_path / 'new', claim)
    claim_output_dir(tmp_path, claim)  # empty
    (tmp_path / 'all_results.json').write_text('{}')
    with pytest.raises(ValueError, match='already holds a training run'):
        claim_output_dir(tmp_path, claim)
    other = tmp_path / 'other'
    (other / compress.SEARCH_DIR).mkdir(parents=True)
    (other / compress.SEARCH_DIR / compress.CLAIM_FILE).write_text(json.dumps(claim))
    claim_output_dir(other, claim)  # the same compression: run again
    with pytest.raises(ValueError, match='another compression .*settings'):
        claim_output_dir(other, {**claim, 'settings': {'max_accuracy_drop': 0.02}})


@pytest.mark.parametrize('drop', ['-0.1', '1', '1.5'])
def test_max_accuracy_drop_outside_0_1_is_one_error_line(drop, tmp_path, capsys):
    from analysis.cli import main
    assert main(['compress', '--model', str(tmp_path), '--output_dir', str(tmp_path / 'o'),
                 '--max_accuracy_drop', drop]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: --max_accuracy_drop must lie in [0, 1)')
    with pytest.raises(ValueError, match='must lie in'):
        compress.compress_run(tmp_path, tmp_path / 'o', max_accuracy_drop=float(drop))


def test_cli_defaults_are_the_module_defaults():
    from analysis.compress.flags import CompressFlags
    fields = CompressFlags.__dataclass_fields__
    assert fields['max_accuracy_drop'].default == compress.DEFAULT_MAX_ACCURACY_DROP
    assert fields['distill_epochs'].default == compress.DEFAULT_DISTILL_EPOCHS
    assert fields['temperature'].default == compress.DEFAULT_TEMPERATURE
    assert fields['alpha'].default == compress.DEFAULT_ALPHA
    assert fields['selection_images'].default == compress.DEFAULT_SELECTION_IMAGES


# --------------------------------------------------------------------------- end to end on tiny runs

FAST = ['--max_steps', '2', '--per_device_train_batch_size', '8']


@pytest.mark.e2e
def test_compress_command_end_to_end(tiny_run, tmp_path, capsys):
    """The real command on the tiny run: a normal run directory, compress.json, report, card, push."""
    from analysis.cli import main
    run, _ = tiny_run
    out = tmp_path / 'compressed'
    assert main(['compress', '--model', str(run), '--output_dir', str(out), '--max_accuracy_drop', '0.99',
                 '--speed_rounds', '1', '--selection_images', '16', *FAST]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f'compressed {run} from 2 to 1 blocks')
    result = json.loads((out / 'compress.json').read_text())
    assert result['outcome'] == 'compressed' and result['blocks']['num_kept'] == 1
    assert result['blocks']['kept'] in ([0], [1]) and result['search'][0]['depth'] == 1
    assert result['parameters']['ratio'] > 1 and result['gflops']['ratio'] > 1
    assert result['throughput']['speedup'] > 0 and len(result['throughput']['per_round']['full']) == 1
    assert set(result['test']['compressed']['f1_per_class']) == set(result['test']['full']['f1_per_class'])
    full = json.loads((run / 'all_results.json').read_text())
    assert result['test']['full']['accuracy'] == pytest.approx(full['test_accuracy'])
    results = json.loads((out / 'all_results.json').read_text())
    assert {k for k in full if k.startswith('test_')} <= set(results)
    assert results['test_accuracy'] == result['test']['compressed']['accuracy']
    assert json.loads((out / 'config.json').read_text())['model_args']['depth'] == 1
    for name in ('model.safetensors', 'run_config.json', 'attentions.safetensors', 'figures/compression.png'):
        assert (out / name).is_file(), name
    assert not list((out / compress.SEARCH_DIR).rglob('model.safetensors'))
    assert 'id="compression"' in (out / 'report.html').read_text() and 'Compressed from 2 to 1 block (kept: 1;' in (
        out / 'report.html').read_text()
    card = (out / 'README.md').read_text()
    assert '## Compression' in card and f'compressed from the model in {run.name}' in card
    assert 'faster on CPU than the full model' in card
    model = TimmViTForImageClassification.from_pretrained(out)
    assert model.num_blocks == 1
    summary = compress_summary(result)
    assert summary['num_kept'] == 1 and summary['test_accuracy_compressed'] == results['test_accuracy']

    from bench.compress_throughput import main as bench_main
    bench_main([str(out), '--rounds', '1', '--batch_size', '4'])
    assert '2 -> 1 blocks; cpu fp32, batch 4, 2 threads, 1 rounds' in capsys.readouterr().out
    bench_main([str(out), '--architecture', 'vit_tiny_patch16_224', '--rounds', '1', '--batch_size', '2'])
    assert 'vit_tiny_patch16_224: 12 -> 6 blocks (as 2 -> 1)' in capsys.readouterr().out

    # another compression into the same folder is refused
    assert main(['compress', '--model', str(run), '--output_dir', str(out), '--max_accuracy_drop', '0.5',
                 *FAST]) == 1
    assert 'holds another compression' in capsys.readouterr().err

    assert main(['push', str(out), '--repo_id', 'alice/small', '--dry_run', str(tmp_path / 'dry')]) == 0
    assert (tmp_path / 'dry' / 'compress.json').is_file() and (tmp_path / 'dry' / 'figures' / 'compression.png').is_file()
    card = (tmp_path / 'dry' / 'README.md').read_text()
    assert '## Compression' in card


@pytest.mark.e2e
def test_nothing_removable_ends_with_one_line_and_the_full_numbers(tiny_run, tmp_path, monkeypatch, capsys):
    from analysis.cli import main
    run, _ = tiny_run

    def search_that_fails(num_blocks, within_tolerance):
        within_tolerance(1)  # one real candidate, then every depth counts as outside the tolerance
        return None, [1]
    monkeypatch.setattr(compress, 'search_depth', search_that_fails)
    out = tmp_path / 'out'
    assert main(['compress', '--model', str(run), '--output_dir', str(out), '--speed_rounds', '1',
                 '--selection_images', '16', *FAST]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]  # Trainer prints its logs before
    assert line.startswith(f'no block of {run} can be removed') and 'full model: validation accuracy' in line
    result = json.loads((out / 'compress.json').read_text())
    full = json.loads((run / 'all_results.json').read_text())
    assert result['outcome'] == 'nothing removable' and result['test']['compressed'] is None
    assert result['test']['full']['accuracy'] == pytest.approx(full['test_accuracy'])
    assert f'test accuracy {full["test_accuracy"]:.4f}' in line
    assert result['search'][0]['speedup'] > 0 and (out / 'figures' / 'compression.png').is_file()
    assert not (out / 'model.safetensors').exists()
    assert compress_summary(result)['test_accuracy_compressed'] is None


@pytest.mark.e2e
def test_a_single_block_model_ends_with_one_line(tmp_path, capsys):
    import train_hf
    from analysis.cli import main
    from conftest import tiny_args
    run = tmp_path / 'one_block'
    train_hf.main(tiny_args(run, '--max_steps', '1', '--model_args',
                            '{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3}'))
    capsys.readouterr()
    assert main(['compress', '--model', str(run), '--output_dir', str(tmp_path / 'out')]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert 'has a single block' in line and 'full model: validation accuracy' in line
    assert json.loads((tmp_path / 'out' / 'compress.json').read_text())['outcome'] == 'single block'


# --------------------------------------------------------------------------- card and report of a compressed run


def fake_compress(full_accuracy=0.92, compressed_accuracy=0.91):
    """A compress.json as compress_run writes it (hand-made numbers), for the card and the report."""
    from test_card import CLASS_NAMES
    full_f1 = dict(zip(CLASS_NAMES, (0.95, 0.93, 0.91)))
    small_f1 = dict(zip(CLASS_NAMES, (0.94, 0.90, 0.89)))
    return {
        'outcome': 'compressed', 'message': 'compressed', 'settings': {'max_accuracy_drop': 0.01},
        'base_model': {'path': '/runs/full', 'name': 'full', 'hub_id': None, 'weights_sha256': 'ab' * 32},
        'blocks': {'num_full': 3, 'kept': [0, 2], 'num_kept': 2, 'removed': [1]},
        'heads': {'per_block': 2, 'num_full': 6, 'num_kept': 4, 'removed': 'none'},
        'parameters': {'full': 3000, 'compressed': 2000, 'ratio': 1.5},
        'gflops': {'full': 0.3, 'compressed': 0.2, 'ratio': 1.5},
        'throughput': {'device': 'cpu', 'threads': 2, 'batch_size': 64, 'speedup': 1.43,
                       'images_per_s': {'full': 100.0, 'compressed': 143.0}},
        'validation': {'full_accuracy': 0.93, 'threshold': 0.92, 'compressed_accuracy': 0.925},
        'test': {'split': 'test', 'full': {'accuracy': full_accuracy, 'macro_f1': 0.93, 'f1_per_class': full_f1},
                 'compressed': {'accuracy': compressed_accuracy, 'macro_f1': 0.91, 'f1_per_class': small_f1}},
        'search': [{'depth': 1, 'kept_blocks': [2], 'candidate': 'layer skip', 'probe_accuracy': 0.6,
                    'val_accuracy_before': 0.3, 'val_accuracy': 0.7, 'within_tolerance': False, 'speedup': 2.5},
                   {'depth': 2, 'kept_blocks': [0, 2], 'candidate': 'layer skip', 'probe_accuracy': 0.9,
                    'val_accuracy_before': 0.8, 'val_accuracy': 0.925, 'within_tolerance': True, 'speedup': 1.43}],
    }


@pytest.mark.parametrize('hub_id', [None, 'alice/full-vit'])
def test_card_of_a_compressed_model_names_the_full_model_and_the_tradeoff(tmp_path, hub_id):
    from huggingface_hub import ModelCard
    from test_card import make_run_dir

    from analysis.render.card import render_model_card
    run = make_run_dir(tmp_path / 'small', pretrained=True)
    run_config = json.loads((run / 'run_config.json').read_text())
    run_config['model']['model_name_or_path'] = '/runs/full'
    run_config['start'] = {'checkpoint': '/runs/full', 'pretrained': True, 'weights_sha256': 'ab' * 32,
                           'compressed_from': {'path': '/runs/full', 'hub_id': hub_id, 'num_blocks': 3,
                                               'kept_blocks': [0, 2]}}
    (run / 'run_config.json').write_text(json.dumps(run_config))
    (run / 'compress.json').write_text(json.dumps(fake_compress()))
    card = ModelCard.load(render_model_card(run))
    assert card.data.base_model == hub_id  # a full model that is not on the Hub has no Hub id to name
    assert ('[alice/full-vit](https://huggingface.co/alice/full-vit)' if hub_id else
            'compressed from the model in full (not on the Hub; weights sha256 abababababab)') in card.text
    assert '## Compression' in card.text and 'Compressed from 3 to 2 blocks (kept: 1, 3;' in card.text
    limitations = card.text.split('**Limitations.**')[1]
    assert ('This model is 1.43x faster on CPU than the full model it was compressed from; test accuracy changes by '
            '-1.0 points and macro F1 by -2.0 points') in limitations
    plain = make_run_dir(tmp_path / 'plain', pretrained=True)
    assert '## Compression' not in ModelCard.load(render_model_card(plain)).text


def test_report_of_a_compressed_model_has_its_section(tmp_path):
    from test_card import make_run_dir

    from analysis.render.figures import render_figures
    from analysis.render.report import write_report
    run = make_run_dir(tmp_path / 'small')
    (run / 'compress.json').write_text(json.dumps(fake_compress()))
    page = write_report(run, render_figures(run)).read_text()
    section = page.split('<section id="compression">')[1].split('</section>')[0]
    assert 'Compressed from 3 to 2 blocks' in section and '1.43x faster' in section
    assert section.count('<tr>') >= 2 + 7  # the search's two depths; full vs compressed: 5 rows + 3 classes
    assert 'data:image/png;base64,' in section  # figures/compression.png, drawn from compress.json
    plain = make_run_dir(tmp_path / 'plain')
    page = write_report(plain, render_figures(plain)).read_text()
    assert 'python -m analysis compress --model' in page.split('<section id="compression">')[1]


def test_published_id_from_the_run_config_or_the_pushed_card(tmp_path):
    from huggingface_hub import ModelCard, ModelCardData
    assert compress.published_id(tmp_path, {'training': {'hub_model_id': 'alice/full'}}) == 'alice/full'
    assert compress.published_id(tmp_path, {'training': {'hub_model_id': 'not a repo id'}}) is None
    assert compress.published_id(tmp_path, None) is None
    ModelCard.from_template(ModelCardData(model_name='bob/pushed'), template_str='---\n{{ card_data }}\n---\n'
                            ).save(tmp_path / 'README.md')
    assert compress.published_id(tmp_path, None) == 'bob/pushed'
