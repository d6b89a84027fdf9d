"""The background-bias study: does a ViT trained where the background predicts the class use it?

Four models are trained with the training job (`analysis.train.job.run`) on synthetic flowers, in two
pairs. Within a pair the configs differ only in ``synthetic_background`` (``correlated``: class c
mostly on background family c; ``random``: background independent of the class) and ``output_dir``:
same seed, same data size, same budget.

* from scratch: ``configs/study_correlated.json``, ``configs/study_random.json`` (the base's
  architecture, random weights, 12 epochs);
* fine-tuned from the same pretrained base (``base:shapes``, as the demo):
  ``configs/study_finetuned_correlated.json``, ``configs/study_finetuned_random.json`` (4 epochs).

Each model then goes through the background study (`analysis.studies.background`), the layer/head
importance study (`analysis.studies.importance`) and the faithfulness scores (`analysis.studies.faithfulness`) on
its own test split; each fine-tuned model is also compressed (`analysis.compress.run`). Within each pair
the study compares the two models, and, per layer, how far training moved the CLS attention off the
flower (`attention_change.compare_runs` on each run's ``attention_change.json``: start vs end of
training, with standard errors):

    OUT/<model>/                     training runs (+ background.json, importance.json,
                                     faithfulness.json, report.html with their figures)
    OUT/<model>_compressed/          the compressed fine-tuned models (`python -m analysis compress`)
    OUT/configs/{name}.json          the exact configs trained (output_dir pointed into OUT)
    OUT/study.json, OUT/study.md     the comparison tables

Reliance on the background shows as a larger ``bg_gap``, a lower fg_lift and a higher
``only_bg_t`` accuracy for the correlated model. The study reports what it measures; it does not
check that the expected effect appears.
"""
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from analysis.compress.result import compress_summary
from analysis.compress.run import compress_run
from analysis.core.resources import config_file
from analysis.core.run_files import BACKGROUND_FILE, CHANGE_FILE, FAITHFULNESS_FILE, IMPORTANCE_FILE, read_json
from analysis.maps.attention_change import compare_runs
from analysis.modeling.vit import TimmViTForImageClassification
from analysis.render.figures import render_figures
from analysis.render.findings import fmt
from analysis.render.report import write_report
from analysis.studies.background import background_study
from analysis.studies.faithfulness import faithfulness_summary, faithfulness_to_dir
from analysis.studies.importance import importance_study
from analysis.studies.stability import direction, spread, verdict
from analysis.train.args import DEMO_BASE, base_config, parse_args
from analysis.train.job import run
from data_scripts import load_flower_dataset
from data_scripts.files import write_json, write_text

_logger = logging.getLogger(__name__)

# {pair: (correlated model, random model)}; a model's name is its config's: configs/study_<name>.json.
PAIRS = {'from scratch': ('correlated', 'random'),
         'fine-tuned from the base': ('finetuned_correlated', 'finetuned_random')}
MODELS = tuple(name for pair in PAIRS.values() for name in pair)
COMPRESSED = PAIRS['fine-tuned from the base']
FAITHFULNESS_IMAGES = 100  # test images scored per model (each takes ~240 forward passes)
# quick=True: a smoke run of the whole pipeline (minutes -> seconds); the numbers mean nothing. The
# base is replaced by a 2-block one trained for 5 steps (its config goes to OUT/configs/base_quick.json).
QUICK_OVERRIDES = {
    'synthetic_train_per_class': 8, 'synthetic_validation_per_class': 2, 'synthetic_test_per_class': 4,
    'max_steps': 5, 'per_device_train_batch_size': 16, 'eval_strategy': 'no', 'save_strategy': 'no',
}
QUICK_BASE_OVERRIDES = {
    **QUICK_OVERRIDES, 'synthetic_num_classes': 4,
    'model_args': '{"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 2, "num_heads": 3}',
}


def quick_base(output_dir: Path) -> str:
    """``base:<OUT/configs/base_quick.json>``: the demo base's config on a smoke-test budget."""
    config = dict(base_config(DEMO_BASE)[1])
    config.update(QUICK_BASE_OVERRIDES, cache_dir=str(output_dir / 'datasets_cache'))
    path = output_dir / 'configs' / 'base_quick.json'
    write_json(path, config)
    return f'base:{path}'


def study_config(name: str, output_dir: Path, quick: bool = False) -> Dict:
    """The training config of one study model, with its output_dir inside the study folder."""
    config = json.loads(config_file(f'study_{name}').read_text())
    config['output_dir'] = str(output_dir / name)
    if quick:
        config.update(QUICK_OVERRIDES)
        config['cache_dir'] = str(output_dir / 'datasets_cache')
        if config['model_name_or_path'] == DEMO_BASE:
            config['model_name_or_path'] = quick_base(output_dir)
    return config


def analyse_model(run_dir: Path, config_path: Path, *, seed: int = 0, batch_size: int = 128,
                  pruning_seconds: Optional[float] = 300.0, faithfulness_images: int = FAITHFULNESS_IMAGES) -> Dict:
    """Background, importance and faithfulness studies of one trained model; writes them next to the model.

    Args:
        run_dir: the training output directory.
        config_path: the JSON config it was trained from (gives the dataset).
        seed: seed of the background donors, of the probes and of the faithfulness sample.
        batch_size: images per forward pass.
        pruning_seconds: time cap of greedy head pruning.
        faithfulness_images: test images the faithfulness scores use, unless the training job scored them.

    Returns:
        ``{"background": ..., "importance": ..., "faithfulness": ..., "seconds": {...}}``.
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
    write_json(run_dir / BACKGROUND_FILE, background)

    start = time.time()
    importance = importance_study(model, dataset, batch_size=batch_size, seed=seed, pruning_seconds=pruning_seconds)
    seconds['importance'] = time.time() - start
    write_json(run_dir / IMPORTANCE_FILE, importance)

    start = time.time()
    if (run_dir / FAITHFULNESS_FILE).is_file():  # the training job scored its maps already
        faithfulness = read_json(run_dir / FAITHFULNESS_FILE)
    else:
        faithfulness = read_json(faithfulness_to_dir(model, dataset['test'], run_dir, max_images=faithfulness_images,
                                                     batch_size=batch_size, seed=seed, model_id=run_dir.name,
                                                     progress=False))
    seconds['faithfulness'] = time.time() - start

    # The report renders every figure of the run, the studies' included.
    write_report(run_dir, render_figures(run_dir))
    return {'background': background, 'importance': importance, 'faithfulness': faithfulness, 'seconds': seconds}


def _mean(values: List[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def summarise(name: str, test_accuracy: float, background: Dict, importance: Dict,
              faithfulness: Optional[Dict] = None) -> Dict:
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
        'faithfulness': faithfulness_summary(faithfulness) if faithfulness else None,
    }


def study_markdown(study: Dict) -> str:
    """The comparison tables (and the verdict on each expected effect) as Markdown."""
    rows = study['models']
    names = [r['model'] for r in rows]
    lines = ['# Background-bias study: correlated vs random backgrounds', '',
             'Two pairs of models; within a pair, same config and seed, differing only in `synthetic_background`: '
             + '; '.join(f'{pair}: {" vs ".join(models)}' for pair, models in PAIRS.items()) + '. '
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
    if all(r.get('faithfulness') for r in rows):
        row('most faithful map (deletion vs insertion AUC)', [r['faithfulness']['most_faithful'] for r in rows])
        row('its insertion - deletion AUC', [fmt(r['faithfulness']['difference']) for r in rows])
        row('background share of its top relevance', [fmt(r['faithfulness']['background_share']) for r in rows])
    compressed = study.get('compression') or {}
    if compressed:
        row('compression: blocks kept', [f'{compressed[n]["num_kept"]} / {compressed[n]["num_blocks"]}'
                                         if n in compressed else '' for n in names])
        row('compression: CPU speed-up', [fmt(compressed[n]['speedup']) if n in compressed else '' for n in names])
        row('compression: test macro F1 (full -> compressed)',
            [f'{fmt(compressed[n]["test_macro_f1_full"])} -> {fmt(compressed[n]["test_macro_f1_compressed"])}'
             if n in compressed else '' for n in names])
    lines += ['', 'Layers are numbered from 1 (closest to the pixels). Expected if the correlated model relies '
              'on the background (SE: binomial standard error of the difference, over the test images):']
    for pair, checks in study['checks'].items():
        lines += ['', f'**{pair}**', '']
        for check in checks:
            verdict = {True: 'yes', False: 'NO', None: 'n/a'}[check['holds']]
            if check.get('se') is not None and check['holds'] is not None:
                difference = check['correlated'] - check['random']
                noise = 'beyond' if abs(difference) > 2 * check['se'] else 'within'
                verdict += f' (difference {difference:+.3f}, {noise} 2 SE = {2 * check["se"]:.3f})'
            lines.append(f'- {check["claim"]}: correlated {fmt(check["correlated"])}, random {fmt(check["random"])} '
                         f'-> {verdict}')
    lines += ['', '## Did training move attention off the flower more on correlated backgrounds?', '',
              'Per layer, the change of the CLS attention share on the flower (fg_ratio, end of training minus '
              'start, mean over test images) of the correlated and of the random model, their difference and its '
              'standard error; "correlated moved off more" when the difference is below -2 SE.']
    for pair, comparison in study['attention_change'].items():
        lines += ['', f'**{pair}**', '', '| layer | correlated | random | difference | SE | verdict |',
                  '|---|---|---|---|---|---|']
        for layer, entry in enumerate(comparison['layers'], start=1):
            verdict = {'a moved off the flower more': 'correlated moved off more',
                       'b moved off the flower more': 'random moved off more'}.get(entry['verdict'], entry['verdict'])
            lines.append(f'| {layer} | {entry["a"]:+.4f} | {entry["b"]:+.4f} | {entry["difference"]:+.4f} | '
                         f'{entry["se"]:.4f} | {verdict} |')
    return '\n'.join(lines) + '\n'


def compare(rows: List[Dict], correlated: str = 'correlated', random: str = 'random') -> List[Dict]:
    """Whether each expected sign of background reliance shows (the correlated model vs the random one)."""
    by_name = {r['model']: r for r in rows}
    c, r = by_name[correlated], by_name[random]

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


REPLICATED = PAIRS['fine-tuned from the base']  # the pair --seeds trains again with other training seeds


def replicate(output_dir: Path, training_seeds: Sequence[int], quick: bool, seed: int, batch_size: int) -> Dict:
    """The fine-tuned pair over ``training_seeds``: per seed, both models' bg_gap and whether correlated training
    moved attention off the flower more than random, layer by layer; and what holds across the seeds
    (`analysis.studies.stability.verdict`). The first seed is the configs' own: those models are the study's,
    trained and measured already; the others are trained into ``OUT/<model>_seed<s>/`` and get the background
    study only."""
    per_seed = []
    for training_seed in training_seeds:
        entry = {'seed': training_seed}
        run_dirs = {name: output_dir / (name if training_seed == training_seeds[0] else f'{name}_seed{training_seed}')
                    for name in REPLICATED}
        for name, run_dir in run_dirs.items():
            if not (run_dir / BACKGROUND_FILE).is_file():
                train_and_measure_background(study_config(name, output_dir, quick) | {
                    'seed': training_seed, 'output_dir': str(run_dir)}, output_dir, seed, batch_size)
            background = read_json(run_dir / BACKGROUND_FILE)
            entry[name] = {'bg_gap': background['bg_gap'], 'num_images': background['num_images'],
                           'variant_accuracy': {v: e['accuracy'] for v, e in background['variants'].items()}}
        correlated, random = REPLICATED
        rows = [{'model': n, 'fg_lift_last_two': None, **entry[n]} for n in REPLICATED]
        entry['bg_gap_check'] = compare(rows, correlated, random)[0]
        entry['attention_change'] = compare_runs(read_json(run_dirs[correlated] / CHANGE_FILE),
                                                 read_json(run_dirs[random] / CHANGE_FILE))
        per_seed.append(entry)
    return {'seeds': list(training_seeds), 'per_seed': per_seed, **replication_verdicts(per_seed)}


def train_and_measure_background(config: Dict, output_dir: Path, seed: int, batch_size: int) -> None:
    """Trains one replicate model from ``config`` and writes its ``background.json``."""
    run_dir = Path(config['output_dir'])
    config_path = output_dir / 'configs' / f'{run_dir.name}.json'
    write_json(config_path, config)
    model_args, data_args, training_args = parse_args([str(config_path)])
    run(model_args, data_args, training_args)
    model = TimmViTForImageClassification.from_pretrained(str(run_dir)).eval()
    background = background_study(model, load_flower_dataset(data_args)['test'], seed=seed, batch_size=batch_size,
                                  split='test', model_id=run_dir.name, synthetic_config=data_args.synthetic_config())
    write_json(run_dir / BACKGROUND_FILE, background)


def replication_verdicts(per_seed: Sequence[Mapping]) -> Dict:
    """bg_gap per seed with its mean and sd, and per layer whether "correlated moved attention off the flower more
    than random" holds across the seeds (beyond 2 SE in each; `stability.verdict`)."""
    correlated, random = REPLICATED
    gaps = {name: spread([s[name]['bg_gap'] for s in per_seed]) for name in REPLICATED}
    gap_directions = [direction(s['bg_gap_check']['correlated'] - s['bg_gap_check']['random'], s['bg_gap_check']['se'])
                      for s in per_seed]
    num_layers = len(per_seed[0]['attention_change']['layers'])
    layers = []
    for layer in range(num_layers):
        entries = [s['attention_change']['layers'][layer] for s in per_seed]
        directions = [direction(e['difference'], e['se']) for e in entries]
        layers.append({'layer': layer, 'difference': spread([e['difference'] for e in entries]),
                       'within_run_se': spread([e['se'] for e in entries])['mean'],
                       **verdict(directions, -1)})  # negative: correlated moved off the flower more
    return {'bg_gap': gaps, 'positive_control': verdict(gap_directions, +1), 'layers': layers}


def replication_markdown(replication: Mapping) -> List[str]:
    """The replicated pair in study.md: bg_gap per seed, and the per-layer verdicts across seeds."""
    correlated, random = REPLICATED
    lines = ['', f'## The fine-tuned pair over {len(replication["seeds"])} training seeds', '',
             'The same pair trained with each training seed (the first is the configs\' own, the models above; the '
             'scratch pair and the other studies are of the first seed only). A verdict is stable when at least 80% of the seeds show it beyond 2 SE and '
             'none shows the opposite.', '', '| seed | bg_gap correlated | bg_gap random | correlated larger? |',
             '|---|---|---|---|']
    for s in replication['per_seed']:
        check = s['bg_gap_check']
        noise = 'beyond' if abs(check['correlated'] - check['random']) > 2 * check['se'] else 'within'
        lines.append(f'| {s["seed"]} | {fmt(s[correlated]["bg_gap"])} | {fmt(s[random]["bg_gap"])} | '
                     f'{"yes" if check["holds"] else "no"} ({noise} 2 SE = {2 * check["se"]:.3f}) |')
    gaps = replication['bg_gap']
    lines += ['', f'bg_gap mean ± sd between seeds: correlated {fmt(gaps[correlated]["mean"])} ± '
              f'{fmt(gaps[correlated]["sd"])}, random {fmt(gaps[random]["mean"])} ± {fmt(gaps[random]["sd"])}. '
              f'Positive control (correlated bg_gap larger beyond 2 SE, seeds as runs): '
              f'{replication["positive_control"]["label"]}.', '',
              '| layer | difference (correlated - random), mean ± sd between seeds | within-run SE | '
              '"correlated moved off the flower more" |', '|---|---|---|---|']
    for entry in replication['layers']:
        d = entry['difference']
        lines.append(f'| {entry["layer"] + 1} | {d["mean"]:+.4f} ± {fmt(d["sd"], digits=4)} | '
                     f'{entry["within_run_se"]:.4f} | {entry["label"]} |')
    return lines


def run_study(output_dir: Union[str, os.PathLike], *, quick: bool = False, seed: int = 0,
              batch_size: int = 128, seeds: int = 1) -> Dict:
    """Trains the four models, studies them, compresses the fine-tuned pair and writes the comparison.

    Args:
        output_dir: the study folder ``OUT`` (created).
        quick: tiny data, 2-block models and 5 training steps, to test the pipeline end to end.
        seed: seed of the background donors, of the probes and of the faithfulness sample (training seeds
            come from the configs).
        batch_size: images per forward pass in the studies.
        seeds: train the fine-tuned pair with this many training seeds (its config's and 1, 2, ...) and say
            what holds across them (`replicate`); the scratch pair stays single-seed.

    Returns:
        The content of ``OUT/study.json``: ``{"models": [row per model], "checks": {pair: [...]},
        "attention_change": {pair: compare_runs(correlated, random)}, "compression": {model: summary},
        "seconds": {model: {"train", "background", "importance", "faithfulness", "compress"}},
        "wall_time_s", "quick"}``.
    """
    output_dir = Path(output_dir)
    (output_dir / 'configs').mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows, seconds, compression = [], {}, {}
    for name in MODELS:
        config = study_config(name, output_dir, quick)
        config_path = output_dir / 'configs' / f'{name}.json'
        write_json(config_path, config)
        _logger.info(f'study: training the {name} model -> {config["output_dir"]}')
        t0 = time.time()
        test_metrics = run(*parse_args([str(config_path)]))
        train_s = time.time() - t0
        result = analyse_model(Path(config['output_dir']), config_path, seed=seed, batch_size=batch_size,
                               pruning_seconds=1.0 if quick else 120.0,
                               faithfulness_images=8 if quick else FAITHFULNESS_IMAGES)
        seconds[name] = {'train': train_s, **result['seconds']}
        rows.append(summarise(name, float(test_metrics['test_accuracy']), result['background'],
                              result['importance'], result['faithfulness']))
        if name in COMPRESSED:
            t0 = time.time()
            quick_options = {'flags': ['--max_steps', '5'], 'selection_images': 16, 'speed_rounds': 1}
            compressed = compress_run(config['output_dir'], output_dir / f'{name}_compressed',
                                      **(quick_options if quick else {}))
            seconds[name]['compress'] = time.time() - t0
            compression[name] = compress_summary(compressed)
    runs = {name: output_dir / name for name in MODELS}
    study = {
        'models': rows,
        'checks': {pair: compare(rows, *models) for pair, models in PAIRS.items()},
        'attention_change': {pair: compare_runs(read_json(runs[c] / CHANGE_FILE), read_json(runs[r] / CHANGE_FILE))
                             for pair, (c, r) in PAIRS.items()},
        'compression': compression,
        'seconds': seconds, 'quick': quick,
    }
    if seeds > 1:
        own_seed = study_config(REPLICATED[0], output_dir, quick).get('seed', 42)
        study['replication'] = replicate(output_dir, [own_seed] + list(range(1, seeds)), quick, seed, batch_size)
    study['wall_time_s'] = time.time() - start
    write_json(output_dir / 'study.json', study)
    write_text(output_dir / 'study.md', study_markdown(study)
               + ('\n'.join(replication_markdown(study['replication'])) + '\n' if 'replication' in study else ''))
    _logger.info(f'study written to {output_dir / "study.md"} in {study["wall_time_s"]:.0f} s')
    return study
