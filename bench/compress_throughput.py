"""Inference speed of a compressed model against its full model, measured alternately in one process.

The measurement `python -m analysis compress` records in compress.json (``throughput``), on its own:
both models in this process, batch after batch in turn (the order reversed every other round), so a
change in the machine's load hits both alike; the speed-up is the median of the per-round ratios.

    python bench/compress_throughput.py OUT                    # OUT: the output dir of analysis compress
    python bench/compress_throughput.py OUT --rounds 20        # more rounds on a busy machine

A GPU and a real-size model: a ViT-B/16 at 224 px (random weights; speed does not depend on them)
against the same with blocks removed in OUT's proportion (e.g. 12 -> 4 blocks for 12 -> 4):

    python bench/compress_throughput.py OUT --architecture vit_base_patch16_224 --device cuda --dtype bf16
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.compress.speed import SPEED_BATCH_SIZE, SPEED_THREADS, inference_throughput, speedup  # noqa: E402
from analysis.core.run_files import COMPRESS_FILE  # noqa: E402
from analysis.modeling.vit import TimmViTForImageClassification  # noqa: E402

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def models_of(out: Path, architecture: str = None):
    """(full, compressed, description): the two checkpoints of a compression, or the architecture at both depths."""
    compress = json.loads((out / COMPRESS_FILE).read_text())
    if compress.get('outcome') != 'compressed':
        raise SystemExit(f'{out / COMPRESS_FILE} holds no compressed model ({compress.get("outcome")}).')
    num_full, num_kept = compress['blocks']['num_full'], compress['blocks']['num_kept']
    if architecture is None:
        full = TimmViTForImageClassification.from_pretrained(compress['base_model']['path'])
        return full, TimmViTForImageClassification.from_pretrained(str(out)), f'{num_full} -> {num_kept} blocks'
    full = timm.create_model(architecture, pretrained=False)
    depth = len(full.blocks)
    kept = max(1, round(depth * num_kept / num_full))
    small = timm.create_model(architecture, pretrained=False, depth=kept)
    return full, small, f'{architecture}: {depth} -> {kept} blocks (as {num_full} -> {num_kept}), random weights'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('output_dir', type=Path, help='output directory of python -m analysis compress')
    parser.add_argument('--architecture', default=None,
                        help='measure this timm architecture at both depths instead (e.g. vit_base_patch16_224)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='fp32', choices=sorted(DTYPES))
    parser.add_argument('--batch_size', type=int, default=SPEED_BATCH_SIZE)
    parser.add_argument('--threads', type=int, default=SPEED_THREADS, help='torch threads (CPU)')
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--batches_per_round', type=int, default=2)
    args = parser.parse_args(argv)

    full, small, what = models_of(args.output_dir, args.architecture)
    rates = inference_throughput({'full': full, 'compressed': small}, batch_size=args.batch_size,
                                 threads=args.threads, rounds=args.rounds, batches_per_round=args.batches_per_round,
                                 device=args.device, dtype=DTYPES[args.dtype])
    for r, (f, c) in enumerate(zip(rates['full'], rates['compressed'])):
        print(f'round {r + 1}: full {f:.1f} img/s, compressed {c:.1f} img/s, ratio {c / f:.2f}')
    print(f'{what}; {args.device} {args.dtype}, batch {args.batch_size}, {args.threads} threads, {args.rounds} rounds '
          f'alternately in one process: median images/s full {statistics.median(rates["full"]):.1f}, compressed '
          f'{statistics.median(rates["compressed"]):.1f}; speed-up {speedup(rates, "compressed", "full"):.2f}x')


if __name__ == '__main__':
    main()
