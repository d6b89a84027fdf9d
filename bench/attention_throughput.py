"""Attention extraction vs a plain inference pass, and peak memory for 200 vs 800 images.

Throughput: `analysis.maps.extract.extract_to_file` (the eager pass, every map reduced as it comes: CLS
rows, rollout, metrics; per-image rows streamed to the summary file) against a plain ``model(pixel_values)``
pass over the same split, same batches, same data loading, alternated in one process; the ratio is printed
(target >= 0.85), and that of the extraction of the same images without their mask column (what a split without masks costs: no masks decoded, no fg metrics).
The extraction includes what the sinks analysis reads (every token's norm at every block, the CLS row on
the prefix tokens). ``--vit_base N``: the same on a ViT-B/16 at 224 px (random weights) and N synthetic
flowers of 224 px.

Sections (``--sections``): where the extraction's time goes. Each round times every section over the
whole split, in a shuffled order: the plain loader (images) and the extraction's (images and masks);
on batches loaded beforehand, the fused forward pass, the eager one without hooks, the eager one
reducing every map as it comes with the token norms (what the extraction runs), and the extraction's
every batch (rows, metric sums, written to a part file). Seconds per split (the fastest round: on a noisy
machine the least disturbed one), and the gap to the plain pass by section, as a share of the plain pass.

    python bench/attention_throughput.py --sections --model outputs/synthetic_demo [--rounds 5]

Memory: extraction of 200 and of 800 images, each in a fresh process; peak RSS (ru_maxrss) of
both and its growth are printed (target < 15%).

Scale (``--scale``): a ViT-B/16-shaped model (timm ``vit_base_patch16_224``, random weights) at 224 px
on synthetic flowers of 224 px with masks; peak RSS of ``extract`` (the summary file, streamed),
``background`` (all six variants) and ``importance`` (probes, layer skipping; head ablation and
pruning left out: they repeat the same streamed pass L x H times) for N and 4N images, each in a
fresh process (peak: the kernel's high-water mark, reset once model and data are loaded); the growth
from N to 4N is printed per command (target < 15%), with the peak above the resident size after loading.

    python bench/attention_throughput.py [--model outputs/synthetic_demo] [--repeats 2]
    python bench/attention_throughput.py --vit_base 64 --batch_size 16 [--repeats 3]
    python bench/attention_throughput.py --scale [--scale_images 8] [--scale_batch_size 8] [--scale_classes 2]

Processes (``--processes``): ``python -m analysis extract`` of a run's test split as one process with
2 torch threads and with 1, against ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo)
with 1 thread per process, alternated; the extraction times (as the command prints them: shards and
merge) and the command wall times (with start-up) are compared. With ``--scale``: the same on the
ViT-B/16-shaped model (random weights) and ``--scale_images`` 224-px test images of the scale mode.

    python bench/attention_throughput.py --processes --model outputs/synthetic_demo [--repeats 2]
    python bench/attention_throughput.py --processes --scale --scale_images 64 [--repeats 2]   # ViT-B/16, 224 px
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.maps.extract import extract_to_file  # noqa: E402
from analysis.modeling.transforms import batch_transform, collate, eval_transform, model_data_config  # noqa: E402
from analysis.modeling.vit import TimmViTForImageClassification  # noqa: E402
from data_scripts import DataArguments, load_flower_dataset  # noqa: E402

MAX_PER_CLASS = 200  # one test split for every measurement: 1000 images
DEMO_MODEL = {'img_size': 64, 'patch_size': 8, 'embed_dim': 96, 'depth': 12, 'num_heads': 3}


def load(model_name, num_images: int):
    """The model and the first `num_images` of one synthetic test split (with masks)."""
    if num_images > 5 * MAX_PER_CLASS:
        raise ValueError(f'at most {5 * MAX_PER_CLASS} images')
    dataset = load_flower_dataset(DataArguments(synthetic_test_per_class=MAX_PER_CLASS))
    split = dataset['test'].shuffle(seed=0).select(range(num_images))
    if model_name:
        model = TimmViTForImageClassification.from_pretrained(model_name)
    else:
        torch.manual_seed(0)
        model = TimmViTForImageClassification.from_timm(
            'vit_tiny_patch16_224', label_names=split.features['label'].names, model_args=DEMO_MODEL)
    return model.eval(), split


@torch.inference_mode()
def inference_images_per_s(model, split, batch_size) -> float:
    data = split.with_transform(batch_transform(eval_transform(model_data_config(model.timm_model))),
                                columns=['image', 'label'])
    start = time.perf_counter()
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate):
        model(batch['pixel_values']).logits.argmax(-1)
    return len(split) / (time.perf_counter() - start)


def extract_images_per_s(model, split, batch_size) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_to_file(model, split, Path(tmp) / 'attentions.safetensors', batch_size=batch_size, progress=False)
        return len(split) / (time.perf_counter() - start)


@torch.inference_mode()
def sections_main(args) -> None:
    import random
    from analysis.maps import extract
    from analysis.maps.attention_metrics import AttentionMetricsAccumulator
    from analysis.maps.reduce import AttentionReducer
    from analysis.maps.summary import SummaryWriter
    from analysis.modeling.timm_internals import capture_token_norms, eager_attention

    model, split = load(args.model, args.images)
    vit, layout, data_config = model.timm_model, model.token_layout, model_data_config(model.timm_model)
    L, H, _ = extract._map_shape(model)
    names = split.features['label'].names
    plain_data = split.with_transform(batch_transform(eval_transform(data_config)), columns=['image', 'label'])
    reducer = AttentionReducer(layout, L)

    def reduced(pixels):
        with capture_token_norms(vit), reducer.capture(vit):
            model(pixels).logits.float().cpu()
        reducer.result()

    def eager(pixels):
        with eager_attention(vit):
            model(pixels).logits.float().cpu()

    def extraction_batches(batches):
        with tempfile.TemporaryDirectory() as tmp, SummaryWriter(Path(tmp) / 'part.safetensors') as part:
            metrics = AttentionMetricsAccumulator(layout, L, H, names)
            examples, full = extract._selection_candidates(part, model, 4, 0)
            for b, batch in enumerate(batches):
                extract._extract_batch(model, batch, b * args.batch_size, part, reducer, metrics, examples, full,
                                       data_config=data_config, has_masks=True, keep_rows=True, scored=True)

    batches = list(extract.eval_loader(split, range(len(split)), data_config, True, args.batch_size))
    sections = {
        'data: plain (images)': lambda: list(DataLoader(plain_data, batch_size=args.batch_size, collate_fn=collate)),
        'data: extraction (images, masks)': lambda: list(extract.eval_loader(
            split, range(len(split)), data_config, True, args.batch_size)),
        'forward: fused (plain)': lambda: [model(b['pixel_values']).logits.float().cpu() for b in batches],
        'forward: eager, no hooks': lambda: [eager(b['pixel_values']) for b in batches],
        'forward: eager, maps reduced, norms': lambda: [reduced(b['pixel_values']) for b in batches],
        'extraction: every batch': lambda: extraction_batches(batches),
    }

    def one_round(seed: int) -> dict:
        order = list(sections)
        random.Random(seed).shuffle(order)
        times = {}
        for name in order:
            begin = time.perf_counter()
            sections[name]()
            times[name] = time.perf_counter() - begin
        return times

    one_round(0)  # warm-up
    rounds = [one_round(r + 1) for r in range(args.rounds)]
    fastest = {name: min(r[name] for r in rounds) for name in sections}  # the fastest round: the least disturbed
    plain = fastest['data: plain (images)'] + fastest['forward: fused (plain)']
    extraction = fastest['data: extraction (images, masks)'] + fastest['extraction: every batch']
    gaps = {
        'masks (decode, eval geometry, patch fractions)':
            fastest['data: extraction (images, masks)'] - fastest['data: plain (images)'],
        'eager attention instead of fused': fastest['forward: eager, no hooks'] - fastest['forward: fused (plain)'],
        'maps reduced as they come, token norms':
            fastest['forward: eager, maps reduced, norms'] - fastest['forward: eager, no hooks'],
        'rows, metric sums, part file':
            fastest['extraction: every batch'] - fastest['forward: eager, maps reduced, norms'],
    }
    print(f'{args.model or "the demo ViT (random weights)"}, {len(split)} images, batch {args.batch_size}, '
          f'{torch.get_num_threads()} threads; seconds per split, the fastest of {args.rounds} rounds')
    for name in sections:
        print(f'  {name:<40} {fastest[name]:.3f} s')
    print(f'plain pass {plain:.3f} s, extraction {extraction:.3f} s (without the merge of its part file): '
          f'ratio {plain / extraction:.3f}; the gap, {extraction - plain:.3f} s, by section (% of the plain pass):')
    for name, gap in gaps.items():
        print(f'  {name:<48} {gap:+.3f} s ({100 * gap / plain:+.1f}% of the plain pass)')


def peak_rss_child(model_name, num_images, batch_size) -> int:
    """Runs one extraction in a fresh process; returns its peak RSS in MiB."""
    code = (f'import sys, json, resource; sys.path.insert(0, {str(ROOT)!r}); sys.argv = ["x"]\n'
            f'from bench.attention_throughput import load\n'
            f'from analysis.maps.extract import extract_to_file\n'
            f'model, split = load({model_name!r}, {num_images})\n'
            f'extract_to_file(model, split, "/tmp/bench_attention_rss/attentions.safetensors", '
            f'batch_size={batch_size}, progress=False)\n'
            f'print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1]) // 1024


SCALE_COMMANDS = ('extract', 'background', 'importance')


def scale_data_args(num_images: int, num_classes: int):
    """Synthetic flowers at 224 px with at least ``num_images`` test and train images (generated once, cached)."""
    per_class = -(-num_images // num_classes)
    return DataArguments(synthetic_num_classes=num_classes, synthetic_image_size=224, synthetic_train_per_class=per_class,
                         synthetic_validation_per_class=1, synthetic_test_per_class=per_class)


def scale_child(command: str, num_images: int, data_images: int, batch_size: int, num_classes: int = 2) -> dict:
    """One scale measurement in this (fresh) process: peak RSS of ``command`` on ``num_images`` images.

    The peak is the kernel's high-water mark (VmHWM), reset after model and data are loaded (Linux
    ``/proc/self/clear_refs``), so that building the model (two copies of its weights for a moment)
    does not set it.
    """
    import gc

    def status_mib(key: str) -> float:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ':')) / 1024

    data_args = scale_data_args(data_images, num_classes)
    dataset = load_flower_dataset(data_args)
    names = dataset['test'].features['label'].names
    torch.manual_seed(0)
    model = TimmViTForImageClassification.from_timm('vit_base_patch16_224', pretrained=False, label_names=names).eval()
    gc.collect()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset VmHWM to the current resident size
    setup = status_mib('VmRSS')
    start = time.perf_counter()
    if command == 'extract':
        with tempfile.TemporaryDirectory() as tmp:
            extract_to_file(model, dataset['test'].select(range(num_images)), Path(tmp) / 'attentions.safetensors',
                            batch_size=batch_size, progress=False)
    elif command == 'background':
        from analysis.studies.background import background_study
        # the first rows: every class as often as the others (row i is of class i % C), as mixed_same needs
        background_study(model, dataset['test'].select(range(num_images)), batch_size=batch_size,
                         synthetic_config=data_args.synthetic_config(), split='test')
    else:
        from analysis.studies.importance import importance_study
        importance_study(model, dataset, batch_size=batch_size, max_train=num_images, max_test=num_images,
                         head_ablation=False)
    return {'peak_mib': status_mib('VmHWM'), 'setup_mib': setup, 'seconds': time.perf_counter() - start}


def scale_main(args) -> None:
    n, big = args.scale_images, 4 * args.scale_images
    if n % args.scale_classes or n // args.scale_classes < 2:
        raise ValueError(f'--scale_images must be a multiple of --scale_classes ({args.scale_classes}) with at least two '
                         'images per class (the mixed_same variant takes a background from another image of the class)')
    load_flower_dataset(scale_data_args(big, args.scale_classes))  # generated here: every child reads the same set
    print(f'scale: vit_base_patch16_224 (random weights) at 224 px, synthetic flowers with masks, N = {n} and '
          f'4N = {big} images, {args.scale_classes} classes, batch {args.scale_batch_size}, {torch.get_num_threads()} threads', flush=True)
    for command in args.scale_commands:
        runs = {}
        for images in (n, big):
            code = (f'import sys, json; sys.path.insert(0, {str(ROOT)!r}); sys.argv = ["x"]\n'
                    f'from bench.attention_throughput import scale_child\n'
                    f'print(json.dumps(scale_child({command!r}, {images}, {big}, {args.scale_batch_size}, '
                    f'{args.scale_classes})))')
            out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise RuntimeError(f'{command} on {images} images failed:\n{out.stderr[-3000:]}')
            runs[images] = json.loads(out.stdout.strip().splitlines()[-1])
        small, large = runs[n], runs[big]
        print(f'{command:>10}: peak RSS {small["peak_mib"]:.0f} MiB ({n} images, {small["seconds"]:.0f} s) -> '
              f'{large["peak_mib"]:.0f} MiB ({big} images, {large["seconds"]:.0f} s); growth '
              f'{100 * (large["peak_mib"] - small["peak_mib"]) / small["peak_mib"]:.1f}% (target < 15%); above '
              f'model + data: {small["peak_mib"] - small["setup_mib"]:.0f} -> {large["peak_mib"] - large["setup_mib"]:.0f} MiB',
              flush=True)


def scale_flags(num_images: int, num_classes: int) -> list:
    """`scale_data_args` as command-line flags."""
    data = scale_data_args(num_images, num_classes)
    return ['--dataset_name', 'synthetic', '--synthetic_num_classes', str(num_classes), '--synthetic_image_size', '224',
            '--synthetic_train_per_class', str(data.synthetic_train_per_class), '--synthetic_validation_per_class', '1',
            '--synthetic_test_per_class', str(data.synthetic_test_per_class)]


def processes_main(args) -> None:
    import os
    import re
    if args.scale:  # a ViT-B/16-shaped model (random weights) on 224-px synthetic flowers, the scale mode's data
        tmp_model = tempfile.TemporaryDirectory()
        dataset = load_flower_dataset(scale_data_args(args.scale_images, args.scale_classes))
        torch.manual_seed(0)
        TimmViTForImageClassification.from_timm('vit_base_patch16_224', pretrained=False,
                                                label_names=dataset['test'].features['label'].names
                                                ).save_pretrained(tmp_model.name)
        model, data_flags, batch_size = tmp_model.name, scale_flags(args.scale_images, args.scale_classes), args.scale_batch_size
        print(f'vit_base_patch16_224 (random weights) at 224 px, {len(dataset["test"])} test images', flush=True)
    elif args.model and (Path(args.model) / 'run_config.json').is_file():
        model, data_flags, batch_size = args.model, [], args.batch_size
    else:
        raise ValueError('--processes needs --model <output directory of a run> (its test split is extracted), '
                         'or --scale (a ViT-B/16-shaped model on 224-px synthetic flowers)')
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM='false', ACCELERATE_USE_CPU='true')
    extract = ['-m', 'analysis', 'extract', '--model', model, '--split', 'test', '--batch_size', str(batch_size),
               *data_flags]
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '29561']
    configs = {'1x2': (1, [sys.executable], '2'), '2x1': (2, launch, '1'), '1x1': (1, [sys.executable], '1')}
    runs = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, (processes, cmd, threads) in configs.items():
                output = Path(tmp) / name / 'attentions.safetensors'
                start = time.perf_counter()
                out = subprocess.run(cmd + extract + ['--output', str(output)], env=env | {'OMP_NUM_THREADS': threads},
                                     capture_output=True, text=True, cwd=tmp)
                wall = time.perf_counter() - start
                if out.returncode != 0:
                    raise RuntimeError(f'{processes} process(es) failed:\n{out.stderr[-3000:]}')
                line = re.search(r'\((\d+) images, (\d+) process(?:es)?, ([\d.]+) s\)', out.stdout)
                assert line and int(line.group(2)) == processes, out.stdout
                runs[name].append((float(line.group(3)), wall))
                print(f'repeat {r + 1}, {processes} process(es) x {threads} thread(s): extraction {runs[name][-1][0]:.1f} s, '
                      f'command {wall:.1f} s ({line.group(1)} images)', flush=True)
    median = {name: [statistics.median(t[i] for t in runs[name]) for i in (0, 1)] for name in runs}
    two = median['2x1']
    for name in ('1x2', '1x1'):
        one = median[name]
        print(f'median extraction time: 1 process x {name[-1]} thread(s) {one[0]:.1f} s, 2 processes x 1 thread '
              f'{two[0]:.1f} s: speed-up {one[0] / two[0]:.2f}x; whole command {one[1]:.1f} s vs {two[1]:.1f} s '
              f'({one[1] / two[1]:.2f}x); batch {batch_size}')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=None, help='output dir / Hub id (default: the demo ViT, random weights)')
    parser.add_argument('--images', type=int, default=500)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--scale', action='store_true', help='the ViT-B/16 memory measurement instead (with --processes: 1 vs 2 processes on ViT-B/16)')
    parser.add_argument('--scale_images', type=int, default=8, help='N (4N is measured too)')
    parser.add_argument('--scale_batch_size', type=int, default=8)
    parser.add_argument('--scale_classes', type=int, default=2, help='synthetic flower classes of the scale data')
    parser.add_argument('--scale_commands', nargs='+', default=list(SCALE_COMMANDS), choices=SCALE_COMMANDS)
    parser.add_argument('--processes', action='store_true', help='1 process vs 2 (accelerate, CPU) instead')
    parser.add_argument('--sections', action='store_true', help='where the extraction\'s time goes, section by section')
    parser.add_argument('--rounds', type=int, default=5, help='rounds over the split (--sections)')
    parser.add_argument('--vit_base', type=int, default=0, metavar='N',
                        help='the throughput ratio on ViT-B/16 at 224 px (random weights), N synthetic flower images')
    args = parser.parse_args()
    if args.processes:
        return processes_main(args)
    if args.scale:
        return scale_main(args)
    if args.sections:
        if args.rounds < 1:
            parser.error('--rounds must be >= 1')
        return sections_main(args)

    if args.vit_base:  # ViT-B/16 at 224 px (random weights) on synthetic flowers of 224 px with masks
        split = load_flower_dataset(scale_data_args(args.vit_base, args.scale_classes))['test'].select(range(args.vit_base))
        torch.manual_seed(0)
        model = TimmViTForImageClassification.from_timm('vit_base_patch16_224', pretrained=False,
                                                        label_names=split.features['label'].names).eval()
        what = f'ViT-B/16 at 224 px, {args.vit_base} images'
    else:
        model, split = load(args.model, args.images)
        what = f'{args.model or "the demo ViT (random weights)"}, {args.images} images'
    inference_images_per_s(model, split.select(range(args.batch_size)), args.batch_size)  # warm-up
    unmasked = split.remove_columns('mask')  # the same images without their masks: no fg metrics, no mask loading
    plain, extract, extract_unmasked = [], [], []
    for r in range(args.repeats):
        plain.append(inference_images_per_s(model, split, args.batch_size))
        extract.append(extract_images_per_s(model, split, args.batch_size))
        extract_unmasked.append(extract_images_per_s(model, unmasked, args.batch_size))
        print(f'repeat {r + 1}: inference {plain[-1]:.1f} img/s, extract {extract[-1]:.1f} img/s (ratio '
              f'{extract[-1] / plain[-1]:.3f}), without masks {extract_unmasked[-1]:.1f} img/s (ratio '
              f'{extract_unmasked[-1] / plain[-1]:.3f})', flush=True)
    p, e = statistics.median(plain), statistics.median(extract)
    paired = statistics.median(x / y for x, y in zip(extract, plain))
    paired_unmasked = statistics.median(x / y for x, y in zip(extract_unmasked, plain))
    print(f'median images/s: inference {p:.1f}, extract {e:.1f}; ratio extract/inference = {e / p:.3f}, median of the '
          f'paired ratios {paired:.3f} (target >= 0.85); without the masks (no mask loading, no fg metrics) '
          f'{paired_unmasked:.3f}; {what}, batch {args.batch_size}, {torch.get_num_threads()} threads')
    if args.vit_base:
        return

    small = peak_rss_child(args.model, 200, args.batch_size)
    large = peak_rss_child(args.model, 800, args.batch_size)
    print(f'peak RSS: 200 images {small} MiB, 800 images {large} MiB; growth {100 * (large - small) / small:.1f}% '
          f'(target < 15%)')


if __name__ == '__main__':
    main()
