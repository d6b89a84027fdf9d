"""Scale: the summary written and read in chunks with bounded memory, shards that merge into exactly the
one-process result, predictions of the extraction pass that equal a fused inference pass."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from analysis.core.metrics import classification_metrics
from analysis.maps import extract
from analysis.maps.attention_metrics import AttentionMetricsAccumulator, class_mean_cls_maps
from analysis.maps.summary import SummaryReader, SummaryWriter, class_mean_cls_maps_streamed, load_summary
from analysis.modeling.tokens import TokenLayout
from analysis.modeling.transforms import batch_transform, collate, eval_transform, model_data_config
from analysis.studies.importance import EvalCrops, image_tensors, importance_study
from conftest import tiny_vit
from data_scripts import DataArguments, load_flower_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = {'img_size': 32, 'patch_size': 8, 'embed_dim': 48, 'depth': 2, 'num_heads': 3}
DATA_FLAGS = ['--dataset_name', 'synthetic', '--synthetic_train_per_class', '4', '--synthetic_validation_per_class',
              '1', '--synthetic_test_per_class', '5', '--synthetic_image_size', '32']


@pytest.fixture(scope='module')
def data():
    return load_flower_dataset(DataArguments(synthetic_train_per_class=4, synthetic_validation_per_class=1,
                                             synthetic_test_per_class=5, synthetic_image_size=32))


@pytest.fixture(scope='module')
def model(data):
    # timm zero-initialises the head: a random one gives varied predictions
    return tiny_vit(data['test'].features['label'].names, random_head=True, depth=TINY['depth'])


def _status_kib(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))


def _reset_peak():
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # VmHWM := VmRSS


# ----------------------------------------------------------------------------- the summary file

def test_writer_composes_a_safetensors_file_that_every_reader_reads(tmp_path):
    g = torch.Generator().manual_seed(0)
    chunks = {'cls_attention': [torch.rand(n, 2, 3, 4, generator=g).half() for n in (3, 0, 5)],
              'labels': [torch.randint(0, 5, (n,), generator=g) for n in (3, 0, 5)],
              'flags': [torch.rand(n, 3, generator=g) > 0.5 for n in (3, 0, 5)],
              'logits': [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (3, 0, 5)]}
    meta = {'format': 'flower-vit-lens/attention-summary', 'version': 1, 'num_images': 8}
    with SummaryWriter(tmp_path / 's.safetensors') as writer:
        for i in range(3):
            for name, parts in chunks.items():
                writer.append(name, parts[i])
        writer.append('empty', torch.empty(0, 7, dtype=torch.uint8))
        writer.close(meta)
    expected = {name: torch.cat(parts) for name, parts in chunks.items()} | {'empty': torch.empty(0, 7, dtype=torch.uint8)}
    loaded = load_file(tmp_path / 's.safetensors')  # the safetensors library's own reader
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in expected.items())
    tensors, read_meta = load_summary(tmp_path / 's.safetensors')
    assert read_meta == meta
    with SummaryReader(tmp_path / 's.safetensors') as reader:
        assert torch.equal(reader.read('cls_attention', 2, 6), expected['cls_attention'][2:6])
        assert torch.equal(reader.rows('logits', [7, 0, 3]), expected['logits'][[7, 0, 3]])
        chunks_read = list(reader.chunks(['cls_attention', 'labels'], rows=3))
        assert [len(c['labels']) for c in chunks_read] == [3, 3, 2]
        assert torch.equal(torch.cat([c['cls_attention'] for c in chunks_read]), expected['cls_attention'])
    assert [p.name for p in tmp_path.iterdir()] == ['s.safetensors']  # the raw row files are gone


def test_writer_refuses_mixed_rows_and_writes_nothing_on_error(tmp_path):
    with pytest.raises(ValueError, match='after rows of'):
        with SummaryWriter(tmp_path / 's.safetensors') as writer:
            writer.append('x', torch.zeros(2, 3))
            writer.append('x', torch.zeros(2, 4))
    assert list(tmp_path.iterdir()) == []


def test_writing_and_reading_a_large_summary_keeps_memory_flat(tmp_path):
    """160 MB of rows through the writer and back through the reader: resident memory grows by a few MB at most
    (rows kept in a list, or read through a memory map, would grow it by the file size)."""
    rows = torch.rand(40, 12, 12, 196).half()  # 40 ViT-B images, 2.2 MB
    meta = {'format': 'flower-vit-lens/attention-summary', 'version': 1}
    _reset_peak()
    before = _status_kib('VmRSS')
    with SummaryWriter(tmp_path / 's.safetensors') as writer:
        for _ in range(72):
            writer.append('cls_attention', rows)
        path = writer.close(meta)
    total = 0.0
    with SummaryReader(path) as reader:
        assert reader.shape('cls_attention') == (2880, 12, 12, 196)
        for chunk in reader.chunks(['cls_attention'], rows=40):
            total += float(chunk['cls_attention'][:, 0, 0, 0].float().sum())
    growth_mib = (_status_kib('VmHWM') - before) / 1024
    print(f'{path.stat().st_size / 2 ** 20:.0f} MiB written and read; peak resident memory grew {growth_mib:.1f} MiB')
    assert growth_mib < 32
    assert total == pytest.approx(72 * float(rows[:, 0, 0, 0].float().sum()), rel=1e-3)


def test_class_means_read_in_chunks_equal_the_in_memory_ones(tmp_path):
    g = torch.Generator().manual_seed(1)
    cls_attention = torch.softmax(torch.randn(11, 2, 3, 4, generator=g), -1).half()
    labels = torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 1, 0, 2])
    with SummaryWriter(tmp_path / 's.safetensors') as writer:
        writer.append('cls_attention', cls_attention)
        writer.append('labels', labels)
        writer.close({'format': 'flower-vit-lens/attention-summary', 'version': 1})
    expected, counts = class_mean_cls_maps(cls_attention, labels, 4)
    import analysis.maps.summary as summary
    chunk_bytes = summary.CHUNK_BYTES
    try:
        summary.CHUNK_BYTES = 100  # a few images per chunk
        got, got_counts = class_mean_cls_maps_streamed(tmp_path / 's.safetensors', 4)
    finally:
        summary.CHUNK_BYTES = chunk_bytes
    torch.testing.assert_close(got, expected)
    assert got_counts.tolist() == counts.tolist() == [4, 3, 4, 0]


# ----------------------------------------------------------------------------- metrics merge

def test_batch_sums_merged_in_order_equal_update():
    layout = TokenLayout(1, (2, 2), (8, 8))
    g = torch.Generator().manual_seed(2)
    batches = []
    for b in (3, 4, 2):
        attn = [torch.softmax(torch.randn(b, 2, 5, 5, generator=g), -1) for _ in range(2)]
        batches.append((attn, torch.stack([layout.cls_to_patches(a) for a in attn], 1), torch.randint(0, 3, (b,), generator=g),
                        torch.rand(b, 4, generator=g), torch.softmax(torch.randn(b, 4, generator=g), -1)))
    updated = AttentionMetricsAccumulator(layout, 2, 2, ['a', 'b', 'c'])
    merged = AttentionMetricsAccumulator(layout, 2, 2, ['a', 'b', 'c'])
    for attn, cls, labels, fg, roll in batches:
        updated.update(attn, cls, labels, fg_fraction=fg, rollout_cls=roll)
        merged.merge(AttentionMetricsAccumulator(layout, 2, 2, ['a', 'b', 'c']).batch_sums(attn, cls, labels, fg, roll))
    assert json.dumps(updated.compute()) == json.dumps(merged.compute())
    assert updated.compute()['num_images'] == 9
    with pytest.raises(ValueError, match='masks'):
        merged.merge(merged.batch_sums(*batches[0][:3]))  # no masks after batches with masks


# ----------------------------------------------------------------------------- shards

def _files_equal(a: Path, b: Path):
    with SummaryReader(a) as x, SummaryReader(b) as y:
        assert x.meta == y.meta
        assert x.keys() == y.keys()
        different = [k for k in x.keys() if not torch.equal(x.read(k), y.read(k))]
        assert different == [], f'{different} differ'


@pytest.mark.parametrize('world_size', [2, 3, 9])  # 25 images in batches of 4: 7 batches; with 9 processes two idle
def test_shards_merge_into_exactly_the_one_process_summary(model, data, tmp_path, world_size):
    options = dict(batch_size=4, full_maps=5, num_examples=2, progress=False, model_id='tiny', split='test')
    one = extract.extract_to_file(model, data['test'], tmp_path / 'one.safetensors', metrics_path=tmp_path / 'one.json',
                                  **options)
    parts = [extract.extract_shard(model, data['test'], tmp_path / f'rank{r}.safetensors', rank=r,
                                   world_size=world_size, **options) for r in range(world_size)]
    merged = extract.merge_shards(parts, tmp_path / 'merged.safetensors', metrics_path=tmp_path / 'merged.json')
    _files_equal(tmp_path / 'one.safetensors', tmp_path / 'merged.safetensors')
    assert (tmp_path / 'one.json').read_text() == (tmp_path / 'merged.json').read_text()  # bit for bit
    assert torch.equal(merged.predictions, one.predictions) and torch.equal(merged.labels, one.labels)
    with SummaryReader(tmp_path / 'merged.safetensors') as reader:
        assert reader.shape('labels') == (25,) and reader.shape('full_attention')[0] == 5
        assert len(reader.read('example_indices')) == 4  # 2 correct + 2 wrong


def test_metric_sums_are_merged_batch_by_batch_in_split_order(model, data, tmp_path):
    """Float addition is not associative: the merge adds every batch's sums in split order, as one process does,
    not each part's total (crafted rollout entropy sums where the two differ)."""
    from conftest import save_summary
    parts = [extract.extract_shard(model, data['test'], tmp_path / f'rank{r}.safetensors', rank=r, world_size=2,
                                   batch_size=4, progress=False) for r in range(2)]  # 7 batches: 4 + 3
    crafted = [[1.0, 0.0, 0.0, 0.0], [6e-17, 6e-17, 0.0]]  # (1 + 6e-17) + 6e-17 == 1, 1 + (6e-17 + 6e-17) > 1
    for part, values in zip(parts, crafted):
        tensors, meta = load_summary(part)
        tensors['metrics.rollout_sum'][:, 0] = torch.tensor(values, dtype=torch.float64)  # ROLLOUT_SUMS[0]: entropy
        save_summary(part, tensors, meta)
    sequential = 0.0
    for value in crafted[0] + crafted[1]:
        sequential += value
    assert sequential != sum(crafted[0]) + sum(crafted[1])
    merged = extract.merge_shards(parts)
    assert merged.metrics['rollout']['entropy'] == sequential / 25


def test_selections_over_shards_choose_what_one_pass_chooses():
    """Replaying the slots over each shard's candidates gives the slots' choice over the whole sequence."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        correct = (rng.random(int(rng.integers(1, 30))) < rng.random()).tolist()
        for slots_of, cap in ((lambda: extract.FullMapSlots(5), 5), (lambda: extract.ExampleSlots(2), 2)):
            whole = slots_of()
            for i, c in enumerate(correct):
                whole.slot_for(i, c)
            cut = sorted(rng.choice(len(correct) + 1, size=2).tolist())
            replay = slots_of()
            for lo, hi in ((0, cut[0]), (cut[0], cut[1]), (cut[1], len(correct))):  # three shards
                seen = {True: 0, False: 0}
                for i in range(lo, hi):  # the shard's candidates: the first `cap` of each kind
                    if seen[correct[i]] < cap:
                        seen[correct[i]] += 1
                        replay.slot_for(i, correct[i])
            assert sorted(replay.taken) == sorted(whole.taken), (trial, correct)


def test_shard_batches_cover_the_batches_once_in_order():
    for num_batches in range(0, 12):
        for world in range(1, 6):
            shares = [extract.shard_batches(num_batches, r, world) for r in range(world)]
            assert [b for share in shares for b in share] == list(range(num_batches))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


# ----------------------------------------------------------------------------- one pass

def test_extraction_predictions_equal_a_fused_inference_pass(model, data, tmp_path):
    """The eager extraction pass's logits and predictions equal those of a plain fused pass over the same images,
    and so do the test metrics the training job writes from them (instead of a second, Trainer.predict pass)."""
    split = data['test']
    result = extract.extract_to_file(model, split, tmp_path / 's.safetensors', batch_size=8, progress=False)
    logits = load_file(tmp_path / 's.safetensors')['logits']  # [M, C]

    loader = DataLoader(split.with_transform(batch_transform(eval_transform(model_data_config(model.timm_model)))),
                        batch_size=8, collate_fn=collate)
    with torch.inference_mode():
        assert all(block.attn.fused_attn for block in model.timm_model.blocks)  # the fused SDPA path
        fused = torch.cat([model(batch['pixel_values']).logits for batch in loader])
    assert torch.equal(logits.argmax(-1), fused.argmax(-1))
    assert torch.equal(result.predictions, fused.argmax(-1))
    torch.testing.assert_close(logits, fused, atol=1e-5, rtol=0)
    assert len(set(result.predictions.tolist())) > 1  # a model that predicts more than one class
    names = split.features['label'].names
    labels = np.asarray(split['label'])
    assert torch.equal(result.labels, torch.as_tensor(labels))
    ours = classification_metrics(result.labels.numpy(), result.predictions.numpy(), names)
    assert json.dumps(ours, sort_keys=True) == json.dumps(
        classification_metrics(labels, fused.argmax(-1).numpy(), names), sort_keys=True)


@pytest.mark.parametrize('max_batches', [None, 2])  # 2: the summary holds 8 images, the rest is only predicted
def test_one_pass_test_metrics_equal_the_trainer_predict_ones(model, data, tmp_path, max_batches):
    """`extract_and_score` (the end of a run in one pass) writes the test metrics `training.evaluate_test` writes
    from its own Trainer.predict pass, key for key and value for value (runtime aside)."""
    import datasets

    from analysis.train import args as train_args
    from analysis.train import job as training
    from tests.conftest import tiny_args
    model_args, _, training_args = train_args.parse_args(tiny_args(tmp_path / 'run'))
    dataset = datasets.DatasetDict({k: v.with_format(None) for k, v in data.items()})  # build_trainer sets transforms
    trainer = training.build_trainer(model, dataset, model_args, training_args)
    today = training.evaluate_test(trainer, dataset, model.class_names)
    extraction, ours = extract.extract_and_score(model, dataset['test'], tmp_path / 'out', split='test', batch_size=4,
                                                 max_batches=max_batches, progress=False)
    assert ours.keys() == today.keys()
    assert {k: v for k, v in ours.items() if k != 'test_runtime'} == {k: v for k, v in today.items() if k != 'test_runtime'}
    assert 0.0 < today['test_accuracy'] < 1.0 and len(ours['test_confusion_matrix']) == 5  # varied predictions
    assert len(extraction.labels) == (25 if max_batches is None else 8)
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['attention_metrics.json', 'attentions.safetensors']


def extract_summary(model, dataset, **options):
    """The summary of a small split in memory: ``(tensors, metadata, metrics)`` (options of `extract_shard`)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = extract.extract_to_file(model, dataset, Path(tmp) / 'attentions.safetensors', **options)
        with SummaryReader(result.path) as reader:
            tensors = {name: reader.read(name) for name in reader.keys()}
    return tensors, result.metadata, result.metrics


def test_extract_summary_in_memory_has_the_file_contents(model, data, tmp_path):
    tensors, meta, metrics = extract_summary(model, data['test'], batch_size=8, progress=False)
    extract.extract_to_file(model, data['test'], tmp_path / 's.safetensors', batch_size=8, progress=False)
    on_disk, on_disk_meta = load_summary(tmp_path / 's.safetensors')
    assert meta == on_disk_meta and tensors.keys() == on_disk.keys()
    assert all(torch.equal(tensors[k], on_disk[k]) for k in tensors)
    assert metrics == json.loads((tmp_path / 'attention_metrics.json').read_text())


# ----------------------------------------------------------------------------- importance

def test_eval_crops_on_disk_equal_the_eval_transform(model, data):
    config = model_data_config(model.timm_model)
    pixels, labels = image_tensors(model, data['test'], config, max_images=13)
    with EvalCrops(data['test'], config, max_images=13) as crops:
        batches = list(crops.batches(5))
        path = crops.path
        assert [len(b) for b in batches] == [5, 5, 3] and path.is_file()
    assert torch.equal(torch.cat(batches), pixels)  # bit for bit
    assert torch.equal(crops.labels, labels)
    assert not path.exists()


def test_importance_without_head_ablation_leaves_those_keys_out(model, data):
    result = importance_study(model, data, batch_size=8, max_train=10, max_test=6, head_ablation=False)
    assert 'head_ablation_accuracy' not in result and 'greedy_pruning' not in result
    assert len(result['layer_skip_accuracy']) == TINY['depth'] and result['num_test'] == 6


# ----------------------------------------------------------------------------- many processes

def _env(threads: int):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM='false',
               ACCELERATE_USE_CPU='true')
    env.pop('HF_TOKEN', None)
    return env


@pytest.mark.distributed
def test_two_process_accelerate_extract_equals_one_process(model, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m analysis extract` on CPU (gloo) writes the same files as
    one process: tensors equal, metrics JSON equal byte for byte; also with more processes than batches."""
    model.save_pretrained(tmp_path / 'model')
    base = ['extract', '--model', str(tmp_path / 'model'), '--split', 'test', '--full_maps', '3', *DATA_FLAGS]
    one = ('import sys; from analysis.cli import main\n'
           f'for name, batch in (("one", "4"), ("one_idle", "64")):\n'
           f'    assert main({base!r} + ["--batch_size", batch, "--output", {str(tmp_path)!r} + f"/{{name}}/s.safetensors"]) == 0\n')
    result = subprocess.run([sys.executable, '-c', one], env=_env(1), cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '29541',
              '-m', 'analysis', *base]
    shares = {'two': ('process 0 of 2: 4 of 7 batches, 16 images (0..15)', 'process 1 of 2: 3 of 7 batches, 9 images (16..24)'),
              'two_idle': ('process 0 of 2: 1 of 1 batches, 25 images (0..24)', 'process 1 of 2: 0 of 1 batches, 0 images')}
    for name, batch in (('two', '4'), ('two_idle', '64')):  # 25 images: 7 batches, or 1 batch and an idle rank
        result = subprocess.run(launch + ['--batch_size', batch, '--output', str(tmp_path / name / 's.safetensors')],
                                env=_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert '2 processes' in result.stdout
        assert all(share in result.stderr for share in shares[name]), result.stderr[-3000:]
    for a, b in (('one', 'two'), ('one_idle', 'two_idle')):
        _files_equal(tmp_path / a / 's.safetensors', tmp_path / b / 's.safetensors')
        assert (tmp_path / a / 'attention_metrics.json').read_text() == (tmp_path / b / 'attention_metrics.json').read_text()
        assert sorted(p.name for p in (tmp_path / b).iterdir()) == ['attention_metrics.json', 's.safetensors']


# ----------------------------------------------------------------------------- GPU readiness bench

@pytest.mark.bench
def test_gpu_throughput_bench_runs_on_cpu_and_names_the_attention_kernels(tmp_path):
    """`bench/gpu_throughput.py --device cpu --tiny`: the Trainer path trains with fused SDPA, extraction runs eager."""
    sys.path.insert(0, str(ROOT / 'bench'))
    try:
        import gpu_throughput
    finally:
        sys.path.remove(str(ROOT / 'bench'))
    result = gpu_throughput.main(['--device', 'cpu', '--tiny', '--steps', '6', '--repeats', '1', '--num_workers', '0',
                                  '--eval_images', '8', '--json', str(tmp_path / 'r.json')])
    assert json.loads((tmp_path / 'r.json').read_text())['attention_during_training'] == result['attention_during_training']
    assert result['attention_during_training'].startswith('fused SDPA: fused_attn=2/2 blocks')
    assert 'aten::_scaled_dot_product_flash_attention_for_cpu_backward x2' in result['attention_during_training']
    assert result['attention_during_extraction'].startswith('eager (softmax of q k^T): fused_attn=0/2 blocks')
    assert 'aten::softmax x2' in result['attention_during_extraction']
    assert result['train_images_per_s']['ratio'] > 0 and result['extract_images_per_s']['ratio'] > 0


def test_studies_refuse_a_multi_process_launch(monkeypatch, capsys):
    from analysis.cli import main as cli
    monkeypatch.setenv('WORLD_SIZE', '2')
    for command in ('background', 'importance'):
        assert cli([command, '--model', 'nowhere', '--dataset_name', 'synthetic']) == 1
    err = capsys.readouterr().err
    assert err.count('error:') == 2 and 'runs in one process' in err
