"""What holds across training runs: each run's findings with their within-run SE, then a verdict across runs.

A run's standard errors are over its test images: they say how sure the run is about itself, not
whether the next run (another seed, another machine) would say the same. Following MultiBERTs (Sellam
et al. 2021), the same job is trained several times and every finding gets both numbers, never pooled:
the within-run SE and the between-run spread (sd of the per-run values).

The rule for a finding (a claim with a sign, e.g. "layer 3 attends to the flower more than its area"):

* a run *shows* it when its estimate lies beyond `Z` within-run SEs on the claimed side, and shows the
  *opposite* when beyond `Z` SEs on the other side (otherwise the run is within its noise);
* the finding is **stable** when at least `STABLE_SHARE` of the runs show it and none shows the opposite;
  otherwise it **varies between runs**, with the counts ("3 of 5, 1 opposite").

Findings: per layer, ``fg_lift > 1`` ("layer k attends to the flower more than its area"); per layer,
the sign of the change of the flower share of the CLS attention during fine-tuning ("fine-tuning moved
attention onto / off the flower at layer k"); and the map that wins the faithfulness ranking by a margin
("map X is the most faithful"). Layers are 0-based here, 1-based in sentences.
"""
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from analysis.core.run_files import (
    CHANGE_FILE,
    FAITHFULNESS_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    RUN_CONFIG_FILE,
    SINKS_FILE,
    SUMMARY_FILE,
    read_json,
    read_optional_json,
)
from analysis.core.stats import ratio_of_means_se
from analysis.maps.attention_metrics import fg_ratio, flower_area
from analysis.maps.sinks import sink_margin
from analysis.maps.summary import SummaryReader
from data_scripts.errors import UserError

Z = 2.0  # a run shows a finding when its estimate lies beyond Z within-run standard errors
STABLE_SHARE = 0.8  # a stable finding is shown by at least this share of the runs, and opposed by none
LAYER_METRICS = ('fg_lift', 'pointing_game', 'entropy', 'mean_attention_distance')


def direction(estimate: Optional[float], se: Optional[float]) -> int:
    """+1 / -1 when ``estimate`` lies beyond `Z` standard errors above / below 0, else 0 (also without an SE)."""
    if estimate is None or se is None:
        return 0
    if estimate > Z * se:
        return 1
    if estimate < -Z * se:
        return -1
    return 0


def is_stable(shown: int, opposite: int, runs: int) -> bool:
    """The rule: at least `STABLE_SHARE` of the runs show the finding and none shows its opposite."""
    return runs > 0 and shown >= STABLE_SHARE * runs and opposite == 0


def verdict(directions: Sequence[int], sign: int) -> Dict:
    """The verdict on a finding of sign ``sign`` (+1 / -1) from each run's `direction`."""
    runs, shown, opposite = len(directions), sum(d == sign for d in directions), sum(d == -sign for d in directions)
    stable = is_stable(shown, opposite, runs)
    label = 'stable' if stable else f'varies between runs ({shown} of {runs}' + (
        f', {opposite} opposite)' if opposite else ')')
    return {'stable': stable, 'shown': shown, 'opposite': opposite, 'runs': runs, 'label': label}


def spread(values: Sequence[Optional[float]]) -> Dict:
    """``{"mean", "sd", "min", "max", "per_run"}`` over runs (sd between runs, ddof 1; None below two runs)."""
    defined = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {'mean': float(defined.mean()) if len(defined) else None,
            'sd': float(defined.std(ddof=1)) if len(defined) >= 2 else None,
            'min': float(defined.min()) if len(defined) else None,
            'max': float(defined.max()) if len(defined) else None,
            'per_run': list(values)}


def fg_lift_with_se(summary_path: Union[str, Path]) -> Dict:
    """Per layer, ``fg_lift`` of the head-averaged CLS map (as `attention_metrics` defines it: a ratio of means)
    and its standard error over the summary's images. ``{"mean": [L], "se": [L]}``."""
    ratios, areas = [], []
    with SummaryReader(summary_path) as reader:
        if not reader.meta.get('has_masks'):
            raise UserError(f'{summary_path} has no flower masks: fg_lift needs a dataset with masks.')
        for chunk in reader.chunks(['cls_attention', 'fg_fraction']):
            fg = chunk['fg_fraction'].float()  # [B, P]
            ratios.append(fg_ratio(chunk['cls_attention'].float().mean(dim=2), fg))  # [B, L]
            areas.append(flower_area(fg))  # [B]
    lift, se = ratio_of_means_se(torch.cat(ratios), torch.cat(areas))
    return {'mean': lift.tolist(), 'se': se.tolist()}


def run_findings(run_dir: Union[str, Path]) -> Dict:
    """One training run's numbers that the across-run verdicts compare (its ``seeds.json`` entry)."""
    run_dir = Path(run_dir)
    results = read_json(run_dir / RESULTS_FILE)
    metrics = read_json(run_dir / METRICS_FILE)
    change = read_optional_json(run_dir / CHANGE_FILE)
    faithfulness = read_optional_json(run_dir / FAITHFULNESS_FILE)
    run_config = read_optional_json(run_dir / RUN_CONFIG_FILE) or {}
    entry = {
        'run': run_dir.name,
        'seed': (run_config.get('training') or {}).get('seed'),
        'base_weights_sha256': (run_config.get('start') or {}).get('weights_sha256'),
        'test_accuracy': results['test_accuracy'],
        'test_macro_f1': results['test_macro_f1'],
        'f1_per_class': results['test_f1_per_class'],
        'layers': {name: metrics['layers'][name]['mean'] for name in LAYER_METRICS if name in metrics['layers']},
    }
    if metrics.get('has_masks'):
        entry['fg_lift'] = fg_lift_with_se(run_dir / SUMMARY_FILE)
    if change is not None:
        entry['change'] = {name: [end - start for start, end in zip(v['start'], v['end'])]
                           for name, v in change['metrics'].items() if name in LAYER_METRICS}
        if 'fg_ratio_change' in change:
            entry['fg_ratio_change'] = change['fg_ratio_change']
    sinks = read_optional_json(run_dir / SINKS_FILE)
    if sinks is not None:
        layers = sinks['layers']
        margins = [sink_margin(layer) for layer in layers]
        entry['sinks'] = {
            'sink_share': [layer['sink_share']['mean'] for layer in layers],
            'flagged_share': [layer['flagged_share']['mean'] for layer in layers],
            'sink_margin': {'mean': [m for m, _ in margins], 'se': [se for _, se in margins]},
        }
        if 'register_share' in layers[0]:
            entry['sinks']['register_share'] = [layer['register_share']['mean'] for layer in layers]
        if 'fg_lift_without' in layers[0]:
            entry['sinks']['fg_lift_without'] = [layer['fg_lift_without']['mean'] for layer in layers]
        if (sinks.get('causal') or {}).get('difference'):
            entry['sinks']['causal'] = {'layer': sinks['causal']['layer'], **sinks['causal']['difference']}
    if faithfulness is not None:
        best = faithfulness['most_faithful']
        entry['faithfulness'] = {'ranking': faithfulness['ranking'], 'most_faithful': best['method'],
                                 'margin': best.get('margin')}
    return entry


def _layer_findings(runs: Sequence[Mapping], num_layers: int) -> List[Dict]:
    findings = []
    if all('fg_lift' in r for r in runs):
        for layer in range(num_layers):
            estimates = [r['fg_lift']['mean'][layer] for r in runs]
            ses = [r['fg_lift']['se'][layer] for r in runs]
            directions = [direction(None if e is None else e - 1.0, se) for e, se in zip(estimates, ses)]
            findings.append({'kind': 'fg_lift_above_1', 'layer': layer,
                             'finding': f'layer {layer + 1} attends to the flower more than its area (fg_lift > 1)',
                             **verdict(directions, +1), 'between_run': spread(estimates),
                             'within_run_se': spread(ses)['mean']})
    if all('fg_ratio_change' in r for r in runs):
        for layer in range(num_layers):
            estimates = [r['fg_ratio_change']['mean'][layer] for r in runs]
            ses = [r['fg_ratio_change']['se'][layer] for r in runs]
            directions = [direction(e, se) for e, se in zip(estimates, ses)]
            sign = 1 if directions.count(1) >= directions.count(-1) else -1
            where = 'onto' if sign > 0 else 'off'
            findings.append({'kind': f'moved_{where}_flower', 'layer': layer,
                             'finding': f'fine-tuning moved attention {where} the flower at layer {layer + 1}',
                             **verdict(directions, sign), 'between_run': spread(estimates),
                             'within_run_se': spread(ses)['mean']})
    return findings


def _sink_findings(runs: Sequence[Mapping], num_layers: int) -> List[Dict]:
    """Per layer, "layer k has attention sinks" (`analysis.maps.sinks.sink_margin` above 0), and whether replacing
    the flagged tokens lowers the predicted-class logit more than replacing random background tokens."""
    if not all('sinks' in r for r in runs):
        return []
    findings = []
    for layer in range(num_layers):
        margins = [(r['sinks']['sink_margin']['mean'][layer], r['sinks']['sink_margin']['se'][layer]) for r in runs]
        findings.append({'kind': 'attention_sinks', 'layer': layer,
                         'finding': f'layer {layer + 1} has attention sinks',
                         **verdict([direction(m, se) for m, se in margins], +1),
                         'between_run': spread([r['sinks']['sink_share'][layer] for r in runs])})
    if all('causal' in r['sinks'] for r in runs):
        directions = [direction(r['sinks']['causal']['mean'], r['sinks']['causal']['se']) for r in runs]
        findings.append({'kind': 'sinks_needed', 'layers': [r['sinks']['causal']['layer'] for r in runs],
                         'finding': 'replacing the flagged tokens lowers the predicted-class logit more than replacing '
                                    'as many random background tokens',
                         **verdict(directions, -1),
                         'between_run': spread([r['sinks']['causal']['mean'] for r in runs])})
    return findings


def _faithfulness_finding(runs: Sequence[Mapping]) -> Optional[Dict]:
    if not all('faithfulness' in r for r in runs):
        return None
    winners = [r['faithfulness']['most_faithful'] for r in runs]
    candidate = Counter(winners).most_common(1)[0][0]
    shown = opposite = 0
    for r in runs:
        margin = r['faithfulness'].get('margin') or {}
        significant = direction(margin.get('mean'), margin.get('se')) > 0  # beats its runner-up beyond Z SE
        shown += significant and r['faithfulness']['most_faithful'] == candidate
        opposite += significant and r['faithfulness']['most_faithful'] != candidate
    directions = [1] * shown + [-1] * opposite + [0] * (len(runs) - shown - opposite)
    return {'kind': 'most_faithful', 'method': candidate, 'finding': f'{candidate} is the most faithful map',
            **verdict(directions, +1), 'winners': winners}


def aggregate(runs: Sequence[Mapping]) -> Dict:
    """``seeds.json`` from the runs' `run_findings`: spreads between runs and a verdict per finding."""
    if len(runs) < 2:
        raise UserError(f'what holds across runs needs at least 2 runs, got {len(runs)}')
    num_layers = len(next(iter(runs[0]['layers'].values())))
    classes = list(runs[0]['f1_per_class'])
    return {
        'num_runs': len(runs),
        'rule': {'z': Z, 'stable_share': STABLE_SHARE,
                 'text': f'stable: at least {STABLE_SHARE:.0%} of the runs show it beyond {Z:g} SE over their '
                         f'images, and no run shows the opposite beyond {Z:g} SE'},
        'runs': list(runs),
        'test_accuracy': spread([r['test_accuracy'] for r in runs]),
        'test_macro_f1': spread([r['test_macro_f1'] for r in runs]),
        'f1_per_class': {c: spread([r['f1_per_class'][c] for r in runs]) for c in classes},
        'layers': {name: [spread([r['layers'][name][layer] for r in runs]) for layer in range(num_layers)]
                   for name in runs[0]['layers']},
        'change': {name: [spread([r['change'][name][layer] for r in runs]) for layer in range(num_layers)]
                   for name in (runs[0].get('change') or {}) if all('change' in r for r in runs)},
        'faithfulness_ranking': [r['faithfulness']['ranking'] for r in runs if 'faithfulness' in r],
        'sinks': {name: [spread([r['sinks'][name][layer] for r in runs]) for layer in range(num_layers)]
                  for name in ('sink_share', 'flagged_share', 'register_share', 'fg_lift_without')
                  if all(name in (r.get('sinks') or {}) for r in runs)},
        'findings': _layer_findings(runs, num_layers) + [f for f in [_faithfulness_finding(runs)] if f]
        + _sink_findings(runs, num_layers),
    }
