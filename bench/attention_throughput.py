"""Attention extraction vs a plain inference pass, and peak memory for 200 vs 800 images.

Throughput: `analysis.extract.extract_summary` (output_attentions, rollout, metrics, per-image
rows) against a plain ``model(pixel_values)`` pass over the same split, same batches, same data
loading, alternated in one process; the ratio is printed (target >= 0.7).

Memory: extraction of 200 and of 800 images, each in a fresh process; peak RSS (ru_maxrss) of
both and its growth are printed (target < 15%).

    python bench/attention_throughput.py [--model outputs/synthetic_demo] [--repeats 2]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.extract import extract_summary  # noqa: E402
from analysis.modeling import TimmViTForImageClassification  # noqa: E402
from analysis.transforms import batch_transform, collate, eval_transform, model_data_config  # noqa: E402
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
    start = time.perf_counter()
    extract_summary(model, split, batch_size=batch_size, progress=False)
    return len(split) / (time.perf_counter() - start)


def peak_rss_child(model_name, num_images, batch_size) -> int:
    """Runs one extraction in a fresh process; returns its peak RSS in MiB."""
    code = (f'import sys, json, resource; sys.path.insert(0, {str(ROOT)!r}); sys.argv = ["x"]\n'
            f'from bench.attention_throughput import load\n'
            f'from analysis.extract import extract_summary\n'
            f'model, split = load({model_name!r}, {num_images})\n'
            f'extract_summary(model, split, batch_size={batch_size}, progress=False)\n'
            f'print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1]) // 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=None, help='output dir / Hub id (default: the demo ViT, random weights)')
    parser.add_argument('--images', type=int, default=500)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=2)
    args = parser.parse_args()

    model, split = load(args.model, args.images)
    inference_images_per_s(model, split.select(range(args.batch_size)), args.batch_size)  # warm-up
    plain, extract = [], []
    for r in range(args.repeats):
        plain.append(inference_images_per_s(model, split, args.batch_size))
        extract.append(extract_images_per_s(model, split, args.batch_size))
        print(f'repeat {r + 1}: inference {plain[-1]:.1f} img/s, extract {extract[-1]:.1f} img/s', flush=True)
    p, e = statistics.median(plain), statistics.median(extract)
    print(f'median images/s: inference {p:.1f}, extract {e:.1f}; ratio extract/inference = {e / p:.3f} '
          f'(target >= 0.7), {args.images} images, batch {args.batch_size}')

    small = peak_rss_child(args.model, 200, args.batch_size)
    large = peak_rss_child(args.model, 800, args.batch_size)
    print(f'peak RSS: 200 images {small} MiB, 800 images {large} MiB; growth {100 * (large - small) / small:.1f}% '
          f'(target < 15%)')


if __name__ == '__main__':
    main()
