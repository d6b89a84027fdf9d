"""The background-bias study: does a ViT trained where the background predicts the class use it?

Two models are trained with `train_hf.main` on synthetic flowers, from the configs
``configs/study_correlated.json`` (class c mostly on background family c) and
``configs/study_random.json`` (background independent of the class). The two configs differ
only in ``synthetic_background`` and ``output_dir``: same seed, same data size, same budget.
Each model then goes through the background study (`analysis.background`) and the layer/head
importance study (`analysis.importance`) on its own test split, and the two are compared:

    OUT/correlated/, OUT/random/    training runs (+ background.json, importance.json, report.html
                                     with figures/background.png and figures/importance.png)
    OUT/configs/{name}.json          the exact configs trained (output_dir pointed into OUT)
    OUT/study.json, OUT/study.md     the comparison table

Reliance on the background shows as a larger ``bg_gap``, a lower fg_lift and a higher
``only_bg_t`` accuracy for the correlated model. The study reports what it measures; it does not
check that the expected effect appears.
"""
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from data_scripts import load_flower_dataset
from data_scripts.files import write_json, write_text

from .background import background_study
from .findings import fmt
from .importance import importance_study
from .modeling import TimmViTForImageClassification
from .report import write_report
from .resources import config_file
from .training import parse_args, run

_logger = logging.getLogger(__name__)

MODELS = ('correlated', 'random')
# quick=True: a smoke run of the whole pipeline (minutes -> seconds); the numbers mean nothing.
QUICK_OVERRIDES = {
    'synthetic_train_per_class': 8, 'synthetic_validation_per_class': 2, 'synthetic_test_per_class': 4,
    'max_steps': 5, 'per_device_train_batch_size': 16, 'eval_strategy': 'no', 'save_strategy': 'no',
    'model_args': '{"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 2, "num_heads": 3}',
}


def study_config(name: str, output_dir: Path, quick: bool = False) -> Dict:
    """The training config of one study model, with its output_dir inside the study folder."""
    config = json.loads(config_file(f'study_{name}').read_text())
    config['output_dir'] = str(output_dir / name)
    if quick:
        config.update(QUICK_OVERRIDES)
        config['cache_dir'] = str(output_dir / 'datasets_cache')
    return config


def analyse_model(run_dir: Path, config_path: Path, *, seed: int = 0, batch_size: int = 128,
                  pruning_seconds: Optional[float] = 300.0) -> Dict:
    """Background and importance study of one trained model; writes them next to the model.

    Args:
        run_dir: the training output directory.
        config_path: the JSON config it was trained from (gives the dataset).
        seed: seed of the background donors and of the probes.
        batch_size: images per forward pass.
        pruning_seconds: time cap of greedy head pruning.

    Returns:
        ``{"background": ..., "importance": ..., "seconds": {...}}``.
    """
    _, data_args, _ = parse_args([str(config_path)])
    dataset = load_flower_dataset(data_args)
    model = TimmViTForImageClassification.from_pretrained(str(run_dir)).eval()
    seconds = {}

    start = time.time()
    background = background_study(
        model, dataset['test'], seed=seed, batch_size=batch_size, split='test', model_id=run_dir.name,
        synthetic_config=data_args.synthetic_config() if data_args.dataset_name == 'synthetic' else None)
    seconds['background'] = time.time() - start
    write_json(run_dir / 'background.json', background)

    start = time.time()
    importance = importance_study(model, dataset, batch_size=batch_size, seed=seed, pruning_seconds=pruning_seconds)
    seconds['importance'] = time.time() - start
    write_json(run_dir / 'importance.json', importance)

    # The report renders every figure of the run, background.png and importance.png included.
    write_report(run_dir)
    return {'background': background, 'importance': importance, 'seconds': seconds}


def _mean(values: List[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def summarise(name: str, test_accuracy: float, background: Dict, importance: Dict) -> Dict:
    """The numbers of one model that go into the comparison table."""
    lift = background['variants'].get('original', {}).get('fg_lift') or []
    pruning = importance['greedy_pruning']
    return {
        'model': name,
        'test_accuracy': test_accuracy,
        'variant_accuracy': {v: e['accuracy'] for v, e in background['variants'].items()},
        'bg_gap': background.get('bg_gap'),
        'fg_lift_first_two': _mean(lift[:2]),
        'fg_lift_last_two': _mean(lift[-2:]),
        'probe_accuracy': importance['probe_accuracy'],
        'num_prunable_heads': pruning['num_prunable'],
        'num_heads': pruning['num_heads'],
        'num_images': background['num_images'],
    }


def study_markdown(study: Dict) -> str:
    """The comparison table (and the verdict on each expected effect) as Markdown."""
    rows = study['models']
    names = [r['model'] for r in rows]
    lines = ['# Background-bias study: correlated vs random backgrounds', '',
             f'Both models: same config and seed, differing only in `synthetic_background`. '
             f'Wall time {study["wall_time_s"]:.0f} s ({"quick smoke run: the numbers mean nothing" if study["quick"] else "full run"}).',
             '', '| measure | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]

    def row(label, values):
        lines.append(f'| {label} | ' + ' | '.join(values) + ' |')

    row('test accuracy (training run)', [fmt(r['test_accuracy']) for r in rows])
    for variant in rows[0]['variant_accuracy']:
        row(f'accuracy, {variant}', [fmt(r['variant_accuracy'].get(variant)) for r in rows])
    row('bg_gap = acc(mixed_same) - acc(mixed_rand)', [fmt(r['bg_gap']) for r in rows])
    row('mean fg_lift, first two layers (original)', [fmt(r['fg_lift_first_two']) for r in rows])
    row('mean fg_lift, last two layers (original)', [fmt(r['fg_lift_last_two']) for r in rows])
    num_layers = len(rows[0]['probe_accuracy'])
    for layer in range(num_layers):
        row(f'probe accuracy, layer {layer + 1}', [fmt(r['probe_accuracy'][layer]) for r in rows])
    row('heads prunable within 1 point', [f'{r["num_prunable_heads"]} / {r["num_heads"]}' for r in rows])
    lines += ['', 'Layers are numbered from 1 (closest to the pixels). Expected if the correlated model relies '
              'on the background (SE: binomial standard error of the difference, over the test images):', '']
    for check in study['checks']:
        verdict = {True: 'yes', False: 'NO', None: 'n/a'}[check['holds']]
        if check.get('se') is not None and check['holds'] is not None:
            difference = check['correlated'] - check['random']
            noise = 'beyond' if abs(difference) > 2 * check['se'] else 'within'
            verdict += f' (difference {difference:+.3f}, {noise} 2 SE = {2 * check["se"]:.3f})'
        lines.append(f'- {check["claim"]}: correlated {fmt(check["correlated"])}, random {fmt(check["random"])} '
                     f'-> {verdict}')
    return '\n'.join(lines) + '\n'


def compare(rows: List[Dict]) -> List[Dict]:
    """Whether each expected sign of background reliance shows (correlated vs random)."""
    by_name = {r['model']: r for r in rows}
    c, r = by_name['correlated'], by_name['random']

    def check(claim, a, b, larger: bool, se=None):
        holds = None if a is None or b is None else (a > b if larger else a < b)
        return {'claim': claim, 'correlated': a, 'random': b, 'holds': holds, 'se': se}

    def var(row, variant):  # binomial variance of one accuracy estimate
        p = row['variant_accuracy'].get(variant)
        return None if p is None else p * (1 - p) / row['num_images']

    def se(*variances):
        return None if any(v is None for v in variances) else float(np.sqrt(sum(variances)))

    return [
        check('larger bg_gap', c['bg_gap'], r['bg_gap'], larger=True,
              se=se(var(c, 'mixed_same'), var(c, 'mixed_rand'), var(r, 'mixed_same'), var(r, 'mixed_rand'))),
        check('lower fg_lift in the last two layers', c['fg_lift_last_two'], r['fg_lift_last_two'], larger=False),
        check('higher only_bg_t accuracy', c['variant_accuracy'].get('only_bg_t'),
              r['variant_accuracy'].get('only_bg_t'), larger=True, se=se(var(c, 'only_bg_t'), var(r, 'only_bg_t'))),
    ]


def run_study(output_dir: Union[str, os.PathLike], *, quick: bool = False, seed: int = 0,
              batch_size: int = 128) -> Dict:
    """Trains the correlated and the random model, studies both and writes the comparison.

    Args:
        output_dir: the study folder ``OUT`` (created).
        quick: tiny data, a 2-block model and 5 training steps, to test the pipeline end to end.
        seed: seed of the background donors and of the probes (training seeds come from the configs).
        batch_size: images per forward pass in the studies.

    Returns:
        The content of ``OUT/study.json``: ``{"models": [row per model], "checks": [...], "seconds":
        {model: {"train", "background", "importance"}}, "wall_time_s", "quick"}``.
    """
    output_dir = Path(output_dir)
    (output_dir / 'configs').mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows, seconds = [], {}
    for name in MODELS:
        config = study_config(name, output_dir, quick)
        config_path = output_dir / 'configs' / f'{name}.json'
        write_json(config_path, config)
        _logger.info(f'study: training the {name} model -> {config["output_dir"]}')
        t0 = time.time()
        test_metrics = run(*parse_args([str(config_path)]))
        train_s = time.time() - t0
        result = analyse_model(Path(config['output_dir']), config_path, seed=seed, batch_size=batch_size,
                               pruning_seconds=30.0 if quick else 300.0)
        seconds[name] = {'train': train_s, **result['seconds']}
        rows.append(summarise(name, float(test_metrics['test_accuracy']), result['background'], result['importance']))
    study = {'models': rows, 'checks': compare(rows), 'seconds': seconds,
             'wall_time_s': time.time() - start, 'quick': quick}
    write_json(output_dir / 'study.json', study)
    write_text(output_dir / 'study.md', study_markdown(study))
    _logger.info(f'study written to {output_dir / "study.md"} in {study["wall_time_s"]:.0f} s')
    return study
