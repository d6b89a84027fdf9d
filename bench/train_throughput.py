"""Images/s of train_hf.py's Trainer path against a minimal hand-written PyTorch loop.

Same model (the embedded demo's ViT), same data and transforms, same batch size, same optimizer
work (AdamW + gradient clipping); the two are run alternately in one process and the ratio of
their median throughputs is printed (absolute numbers vary between machines and runs).

    python bench/train_throughput.py [--steps 30] [--repeats 2] [--batch_size 64]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.modeling.transforms import collate, model_data_config  # noqa: E402
from analysis.train import args as train_args
from analysis.train import job as training  # noqa: E402
from data_scripts import load_flower_dataset  # noqa: E402

WARMUP = 5


class StepTimer(TrainerCallback):
    """Times the optimizer steps after the first WARMUP ones."""

    def __init__(self):
        self.start = self.end = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def build(argv):
    model_args, data_args, training_args = train_args.parse_args(argv)
    dataset = load_flower_dataset(data_args)
    class_names = dataset['train'].features['label'].names
    model, _ = training.build_model(model_args, class_names, *training.resolve_start(model_args))
    augmentation = training.attach_transforms(dataset, model_data_config(model.timm_model),
                                              model_args.min_crop_scale, training_args.seed)
    return model, dataset['train'], training_args, augmentation


def trainer_images_per_s(argv, steps: int) -> float:
    model, dataset, training_args, augmentation = build(argv)
    timer = StepTimer()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                      callbacks=[timer, training.AugmentationEpoch(augmentation)])
    trainer.train()
    return (steps - WARMUP) * training_args.per_device_train_batch_size / (timer.end - timer.start)


def manual_images_per_s(argv, steps: int) -> float:
    model, dataset, training_args, _ = build(argv)
    torch.manual_seed(training_args.seed)
    loader = DataLoader(dataset, batch_size=training_args.per_device_train_batch_size, shuffle=True,
                        collate_fn=collate, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training_args.learning_rate,
                                  weight_decay=training_args.weight_decay)
    model.train()
    step, start = 0, None
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == WARMUP:
                start = time.perf_counter()
            if step == steps:
                break
    return (steps - WARMUP) * training_args.per_device_train_batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--batch_size', type=int, default=64)
    args = parser.parse_args()
    assert args.steps > WARMUP, f'--steps must exceed the {WARMUP} warm-up steps'
    # the demo's architecture with random weights (speed does not depend on the weights; no base is built)
    argv = ['--pretrained', 'false', '--output_dir', '/tmp/bench_train_throughput', '--max_steps', str(args.steps),
            '--per_device_train_batch_size', str(args.batch_size), '--eval_strategy', 'no',
            '--save_strategy', 'no', '--report_to', 'none', '--disable_tqdm', 'true', '--logging_steps', '1000']
    trainer_runs, manual_runs = [], []
    for r in range(args.repeats):  # alternate, so drift in machine load hits both alike
        trainer_runs.append(trainer_images_per_s(argv, args.steps))
        manual_runs.append(manual_images_per_s(argv, args.steps))
        print(f'repeat {r + 1}: Trainer {trainer_runs[-1]:.1f} img/s, hand-written loop {manual_runs[-1]:.1f} img/s',
              flush=True)
    t, m = statistics.median(trainer_runs), statistics.median(manual_runs)
    print(f'median images/s: Trainer {t:.1f}, hand-written loop {m:.1f}; ratio Trainer/loop = {t / m:.3f} '
          f'(target >= 0.95), batch {args.batch_size}, {args.steps - WARMUP} timed steps x {args.repeats}, '
          f'{torch.get_num_threads()} threads')


if __name__ == '__main__':
    main()
