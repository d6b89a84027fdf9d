"""The end of a demo run: one pass over the test split (today) against two (before), in whole runs.

Today the job scores the test split with the logits of the eager extraction pass
(`analysis.train.job.extract_attention`). Before, it also ran ``Trainer.predict`` on the test
split (`analysis.train.job.evaluate_test`) and scored that. The two-pass run here is today's
job with that prediction put back in front of the extraction, its metrics saved: the job as it was.

Each run is the whole embedded default (``python train_hf.py``: data and base cached, fine-tuning,
analysis, report, card) in a fresh process; the two ways alternate, ``--repeats`` times each.
Printed: the wall time of every run and of its end (validation to the saved test metrics), their
medians and minima (the whole run's training phase is noisy on a shared machine) and ratios, and whether the two ways saved the same test metrics in every repeat.

    python bench/end_of_run.py [--repeats 2] [-- extra train_hf.py flags]
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.train import args as train_args
from analysis.train import base as train_base
from analysis.train import job as training  # noqa: E402
from data_scripts import DataArguments, load_flower_dataset  # noqa: E402

WAYS = ('two passes', 'one pass')


def child(way: str, argv: list) -> dict:
    """One whole run in this process, the end done `way`; returns its end phase's seconds."""
    import train_hf
    marks, trainers = {}, []
    build_trainer, validate, extract = training.build_trainer, training.validate, training.extract_attention
    save_test_metrics = training.save_test_metrics

    def keep_trainer(*args, **kwargs):
        trainers.append(build_trainer(*args, **kwargs))
        return trainers[-1]

    def timed_validate(trainer):
        marks['start'] = time.perf_counter()
        return validate(trainer)

    def two_passes(model, dataset, model_args, data_args, training_args, *, stage):
        if stage == 'start':
            return extract(model, dataset, model_args, data_args, training_args, stage=stage)
        predicted = training.evaluate_test(trainers[-1], dataset, model.class_names)  # pass 1: Trainer.predict
        extract(model, dataset, model_args, data_args, training_args, stage=stage)  # pass 2: the attention
        return predicted

    def timed_save(trainer, metrics):
        save_test_metrics(trainer, metrics)
        marks['end'] = time.perf_counter()

    training.build_trainer, training.validate, training.save_test_metrics = keep_trainer, timed_validate, timed_save
    if way == 'two passes':
        training.extract_attention = two_passes
    train_hf.main(argv)
    return {'end_s': marks['end'] - marks['start']}


def scores(output_dir: Path) -> dict:
    results = json.loads((output_dir / 'all_results.json').read_text())
    return {k: v for k, v in results.items() if k.startswith('test_') and k not in ('test_runtime',)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('train_flags', nargs='*', help='extra train_hf.py flags (after --)')
    args = parser.parse_args()

    load_flower_dataset(DataArguments())  # the demo's data and base, built before any run is timed
    train_base.ensure_base(train_args.ModelArguments().model_name_or_path, training.run)
    runs = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for way in WAYS:
                out = Path(tmp) / f'{way.replace(" ", "_")}_{r}'
                argv = ['--output_dir', str(out), '--disable_tqdm', 'true'] + args.train_flags
                code = (f'import sys, json; sys.path.insert(0, {str(ROOT)!r})\n'
                        f'from bench.end_of_run import child\n'
                        f'print(json.dumps(child({way!r}, {argv!r})))')
                start = time.perf_counter()
                done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    raise RuntimeError(f'{way} run failed:\n{done.stderr[-3000:]}')
                end = json.loads(done.stdout.strip().splitlines()[-1])['end_s']
                runs[way].append({'wall': wall, 'end': end, 'scores': scores(out)})
                print(f'repeat {r + 1}, {way}: run {wall:.1f} s, end (validation to test metrics) {end:.1f} s', flush=True)
    same = all(a['scores'] == b['scores'] for a, b in zip(runs['two passes'], runs['one pass']))
    for name, stat in (('median', statistics.median), ('fastest', min)):
        before, after = ({k: stat(run[k] for run in runs[way]) for k in ('wall', 'end')} for way in WAYS)
        print(f'{name} whole run: two passes {before["wall"]:.1f} s, one pass {after["wall"]:.1f} s '
              f'(one pass / two passes = {after["wall"] / before["wall"]:.3f}); end of the run: {before["end"]:.1f} s '
              f'-> {after["end"]:.1f} s ({after["end"] / before["end"]:.3f})')
    print(f'same test metrics both ways in every repeat: {same}')


if __name__ == '__main__':
    main()
