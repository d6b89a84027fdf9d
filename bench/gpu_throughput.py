"""GPU readiness in one run: fine-tuning and extraction images/s, and which attention kernel ran.

* Fine-tuning: ViT-B/16 (``vit_base_patch16_224``, random weights: speed does not depend on them) at
  224 px on synthetic flowers, bf16 on a GPU, through the training job's Trainer path
  (`analysis.train.job`: parse_args, build_model, build_trainer) against a minimal hand-written loop
  (same model, data, augmentation, batch, AdamW, gradient clipping, autocast); the ratio of images/s.
* Extraction: `analysis.maps.extract.extract_to_file` (eager attention, rollout, metrics, rows to disk)
  against fused inference (``model(pixel_values)``) over the same images, both float32 as the
  extraction runs; fused bf16 inference is printed for reference on a GPU.
* Kernels: timm's ``Attention.fused_attn`` of every block during a training step and during an
  extraction batch, and the attention ops torch.profiler saw (``aten::_scaled_dot_product_*``: fused
  SDPA, the name says which backend; ``aten::softmax``: the eager path's ``softmax(q k^T)``).

    python bench/gpu_throughput.py                        # a GPU: ViT-B/16, 224 px, bf16
    python bench/gpu_throughput.py --device cpu --tiny    # the same code on a tiny ViT (the test runs this)
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.maps.extract import extract_to_file  # noqa: E402
from analysis.modeling.transforms import batch_transform, collate, eval_transform, model_data_config  # noqa: E402
from analysis.train import args as train_args
from analysis.train import job as training  # noqa: E402
from data_scripts import load_flower_dataset  # noqa: E402

WARMUP = 5  # optimizer steps before the timed ones
TINY_MODEL = '{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}'
NUM_CLASSES = 5


def attention_ops(prof) -> Dict[str, int]:
    """Calls of the attention ops in a profile: fused SDPA (by backend) and the eager softmax."""
    counts = Counter(e.name for e in prof.events())
    return {name: n for name, n in sorted(counts.items())
            if name.startswith('aten::_scaled_dot_product') or name in ('aten::softmax', 'aten::_softmax')}


def fused_flags(model) -> List[bool]:
    return [bool(block.attn.fused_attn) for block in model.timm_model.blocks]


def kernel_summary(ops: Dict[str, int], flags: List[bool]) -> str:
    sdpa = [n for n in ops if n.startswith('aten::_scaled_dot_product')]
    softmax = ops.get('aten::softmax', 0)
    kind = 'fused SDPA' if sdpa and not softmax else 'eager (softmax of q k^T)' if softmax and not sdpa else 'mixed'
    return (f'{kind}: fused_attn={sum(flags)}/{len(flags)} blocks; profiler: '
            + (', '.join(f'{n} x{c}' for n, c in ops.items()) or 'no attention op'))


class TrainerProbe(TrainerCallback):
    """Times the steps after the first WARMUP ones, then profiles one more step (not timed)."""

    def __init__(self, steps: int, model, sync):
        self.steps, self.model, self.sync = steps, model, sync
        self.start = self.end = None
        self.profiler = None
        self.ops: Dict[str, int] = {}
        self.flags: List[bool] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.steps:  # the step after the timed ones
            self.flags = fused_flags(self.model)
            self.profiler = torch.profiler.profile()
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (WARMUP, self.steps):
            self.sync()
            if state.global_step == WARMUP:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()
        if state.global_step == self.steps + 1:
            self.profiler.__exit__(None, None, None)
            self.ops = attention_ops(self.profiler)


def trainer_path(argv: List[str], steps: int, sync) -> Dict:
    """Images/s of the training job's Trainer path, and its attention kernels."""
    model_args, data_args, training_args = train_args.parse_args(argv)
    dataset = load_flower_dataset(data_args)
    model, _ = training.build_model(model_args, dataset['train'].features['label'].names,
                                    *training.resolve_start(model_args))
    trainer = training.build_trainer(model, dataset, model_args, training_args)
    probe = TrainerProbe(steps, model, sync)
    trainer.add_callback(probe)
    trainer.train()
    return {'images_per_s': (steps - WARMUP) * training_args.per_device_train_batch_size / (probe.end - probe.start),
            'kernels': kernel_summary(probe.ops, probe.flags), 'ops': probe.ops, 'fused_attn': probe.flags}


def minimal_loop(argv: List[str], steps: int, device: str, bf16: bool, num_workers: int, sync) -> float:
    """Images/s of a hand-written loop over the same model, data and augmentation."""
    model_args, data_args, training_args = train_args.parse_args(argv)
    dataset = load_flower_dataset(data_args)
    model, _ = training.build_model(model_args, dataset['train'].features['label'].names,
                                    *training.resolve_start(model_args))
    training.attach_transforms(dataset, model_data_config(model.timm_model), model_args.min_crop_scale,
                               training_args.seed)
    model.to(device).train()
    loader = DataLoader(dataset['train'], batch_size=training_args.per_device_train_batch_size, shuffle=True,
                        collate_fn=collate, drop_last=True, num_workers=num_workers, pin_memory=device == 'cuda')
    fused = device == 'cuda' and 'fused' in str(training_args.optim)  # Trainer's default optimizer on a GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=training_args.learning_rate,
                                  weight_decay=training_args.weight_decay, fused=fused or None)
    step, start = 0, None
    while step < steps:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step in (WARMUP, steps):
                sync()
                if step == WARMUP:
                    start = time.perf_counter()
            if step == steps:
                break
    return (steps - WARMUP) * training_args.per_device_train_batch_size / (time.perf_counter() - start)


@torch.inference_mode()
def fused_inference(model, split, batch_size: int, num_workers: int, bf16: bool, sync) -> float:
    data = split.with_transform(batch_transform(eval_transform(model_data_config(model.timm_model))),
                                columns=['image', 'label'])
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                        pin_memory=model.device.type == 'cuda')
    start = time.perf_counter()
    for batch in loader:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            model(batch['pixel_values'].to(model.device, non_blocking=True)).logits.argmax(-1)
    sync()
    return len(split) / (time.perf_counter() - start)


def extraction(model, split, batch_size: int, num_workers: int, sync) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_to_file(model, split, Path(tmp) / 'attentions.safetensors', batch_size=batch_size, progress=False,
                        num_workers=num_workers)
        sync()
        return len(split) / (time.perf_counter() - start)


@torch.inference_mode()
def extraction_kernels(model, pixel_values) -> str:
    """The attention kernels of an eager pass with the maps captured, as the extraction runs (`AttentionReducer`)."""
    flags: List[bool] = []
    handle = model.timm_model.blocks[0].attn.register_forward_pre_hook(
        lambda module, args: flags.extend(fused_flags(model)))
    try:
        with torch.profiler.profile() as prof:
            model(pixel_values, output_attentions=True)
    finally:
        handle.remove()
    return kernel_summary(attention_ops(prof), flags)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cuda', 'cpu'])
    parser.add_argument('--tiny', action='store_true', help='a tiny ViT on 32 px images (a smoke run of this code)')
    parser.add_argument('--steps', type=int, default=40, help='optimizer steps per training measurement')
    parser.add_argument('--batch_size', type=int, default=None, help='default: 64 (ViT-B), 8 (--tiny)')
    parser.add_argument('--eval_images', type=int, default=None, help='default: 1024 (ViT-B), 24 (--tiny)')
    parser.add_argument('--num_workers', type=int, default=8, help='DataLoader workers (both paths alike)')
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        raise ValueError(f'--steps must exceed the {WARMUP} warm-up steps')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('no GPU here: use --device cpu (with --tiny for a quick run)')
    batch = args.batch_size or (8 if args.tiny else 64)
    eval_images = args.eval_images or (24 if args.tiny else 1024)
    bf16 = args.device == 'cuda'
    sync = torch.cuda.synchronize if args.device == 'cuda' else (lambda: None)
    size = 32 if args.tiny else 224
    per_class = -(-max(batch * 4, eval_images) // NUM_CLASSES)  # training cycles over a few batches per epoch
    data = ['--synthetic_num_classes', str(NUM_CLASSES), '--synthetic_image_size', str(size),
            '--synthetic_train_per_class', str(per_class), '--synthetic_validation_per_class', '1',
            '--synthetic_test_per_class', str(per_class)]
    model = ['--model_name_or_path', 'vit_tiny_patch16_224' if args.tiny else 'vit_base_patch16_224',
             '--pretrained', 'false', '--model_args', TINY_MODEL if args.tiny else '{}']
    out_dir = tempfile.mkdtemp(prefix='bench_gpu_throughput.')
    argv_train = [*model, *data, '--output_dir', out_dir, '--max_steps', str(args.steps + 1),
                  '--per_device_train_batch_size', str(batch), '--eval_strategy', 'no', '--save_strategy', 'no',
                  '--report_to', 'none', '--disable_tqdm', 'true', '--logging_steps', '1000',
                  '--dataloader_num_workers', str(args.num_workers), '--bf16', str(bf16).lower(),
                  '--use_cpu', str(args.device == 'cpu').lower(), '--seed', '0']
    load_flower_dataset(train_args.parse_args(argv_train)[1])  # generate the data once, before any timing

    trainer_runs, loop_runs = [], []
    for r in range(args.repeats):  # alternated, so drift in machine load hits both alike
        trained = trainer_path(argv_train, args.steps, sync)
        trainer_runs.append(trained['images_per_s'])
        loop_runs.append(minimal_loop(argv_train, args.steps, args.device, bf16, args.num_workers, sync))
        print(f'repeat {r + 1}: Trainer {trainer_runs[-1]:.1f} img/s, hand-written loop {loop_runs[-1]:.1f} img/s',
              flush=True)
    t, m = statistics.median(trainer_runs), statistics.median(loop_runs)

    model_args, data_args, _ = train_args.parse_args(argv_train)
    dataset = load_flower_dataset(data_args)
    split = dataset['test'].select(range(min(eval_images, len(dataset['test']))))
    torch.manual_seed(0)
    vit, _ = training.build_model(model_args, split.features['label'].names, *training.resolve_start(model_args))
    vit = vit.to(args.device).eval()
    fused_inference(vit, split.select(range(min(batch, len(split)))), batch, 0, False, sync)  # warm-up
    extracted, fused, fused_bf16 = [], [], []
    for r in range(args.repeats):
        fused.append(fused_inference(vit, split, batch, args.num_workers, False, sync))
        extracted.append(extraction(vit, split, batch, args.num_workers, sync))
        if bf16:
            fused_bf16.append(fused_inference(vit, split, batch, args.num_workers, True, sync))
    e, f = statistics.median(extracted), statistics.median(fused)
    pixels = next(iter(DataLoader(split.with_transform(batch_transform(eval_transform(model_data_config(vit.timm_model))),
                                                       columns=['image', 'label']), batch_size=2, collate_fn=collate)))
    extraction_attention = extraction_kernels(vit, pixels['pixel_values'].to(args.device))

    device = torch.cuda.get_device_name() if args.device == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    result = {
        'device': device, 'model': 'tiny ViT (2 blocks, 32 px)' if args.tiny else 'vit_base_patch16_224, 224 px',
        'precision': 'bf16 autocast' if bf16 else 'float32', 'batch_size': batch, 'timed_steps': args.steps - WARMUP,
        'train_images_per_s': {'trainer': t, 'minimal_loop': m, 'ratio': t / m},
        'extract_images_per_s': {'extract': e, 'fused_inference_fp32': f, 'ratio': e / f,
                                 **({'fused_inference_bf16': statistics.median(fused_bf16)} if bf16 else {})},
        'attention_during_training': trained['kernels'], 'attention_during_extraction': extraction_attention,
        'training_ops': trained['ops'],
    }
    print(f'{result["model"]} on {device}, {result["precision"]}, batch {batch}')
    print(f'fine-tuning images/s: Trainer path {t:.1f}, hand-written loop {m:.1f}; ratio {t / m:.3f}')
    print(f'extraction images/s: {e:.1f}, fused inference (float32) {f:.1f}; ratio {e / f:.3f}'
          + (f'; fused bf16 inference {statistics.median(fused_bf16):.1f}' if bf16 else ''))
    print(f'attention during training: {result["attention_during_training"]}')
    print(f'attention during extraction: {extraction_attention}')
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


if __name__ == '__main__':
    main()
