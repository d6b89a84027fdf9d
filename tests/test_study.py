"""The background study's pieces without training: its configs, its verdicts and its tables on hand-made numbers.

The whole study runs end to end in tests/test_background.py (``-m e2e``).
"""
import json
import runpy
import sys

import pytest

from analysis import study
from analysis.train.args import DEMO_BASE


def test_quick_configs_shrink_the_budget_and_swap_the_base(tmp_path):
    for name in study.MODELS:
        config = study.study_config(name, tmp_path, quick=True)
        assert config['output_dir'] == str(tmp_path / name) and config['max_steps'] == 5
        assert config['cache_dir'] == str(tmp_path / 'datasets_cache')
        if name.startswith('finetuned'):
            path = config['model_name_or_path'][len('base:'):]
            base = json.loads(open(path).read())
            assert base['max_steps'] == 5 and json.loads(base['model_args'])['depth'] == 2
        else:
            assert config['model_name_or_path'] != DEMO_BASE
    full = study.study_config('finetuned_random', tmp_path)
    assert full['model_name_or_path'] == DEMO_BASE and 'cache_dir' not in full


def row(name, bg_gap, only_bg_t, lift_last_two):
    same = 0.5 + bg_gap / 2
    return {'model': name, 'test_accuracy': 0.9, 'bg_gap': bg_gap, 'num_images': 100,
            'variant_accuracy': {'original': 0.9, 'mixed_same': same, 'mixed_rand': same - bg_gap, 'only_bg_t': only_bg_t},
            'fg_lift_first_two': 2.0, 'fg_lift_last_two': lift_last_two, 'probe_accuracy': [0.5, 0.8],
            'num_prunable_heads': 1, 'num_heads': 6, 'faithfulness': None}


def test_verdicts_and_their_standard_errors():
    rows = [row('correlated', 0.30, 0.40, 1.2), row('random', 0.02, 0.10, 1.5)]
    checks = {c['claim']: c for c in study.compare(rows)}
    assert [c['holds'] for c in checks.values()] == [True, True, True]
    # binomial SE of the difference of two differences: sqrt(sum p(1-p)/n over the four accuracies)
    p = [0.65, 0.35, 0.51, 0.49]
    assert checks['larger bg_gap']['se'] == pytest.approx(sum(x * (1 - x) / 100 for x in p) ** 0.5)
    assert checks['higher only_bg_t accuracy']['se'] == pytest.approx((0.4 * 0.6 / 100 + 0.1 * 0.9 / 100) ** 0.5)
    reversed_rows = [row('correlated', 0.02, 0.10, 1.5), row('random', 0.30, 0.40, 1.2)]
    assert [c['holds'] for c in study.compare(reversed_rows)] == [False, False, False]


def test_markdown_states_each_verdict_with_its_noise():
    rows = [row('correlated', 0.30, 0.40, 1.2), row('random', 0.02, 0.10, 1.5)]
    change = {'layers': [{'a': -0.10, 'b': 0.01, 'difference': -0.11, 'se': 0.02,
                          'verdict': 'a moved off the flower more'}]}
    markdown = study.study_markdown({'models': rows, 'checks': {'from scratch': study.compare(rows)},
                                     'attention_change': {'from scratch': change}, 'wall_time_s': 12.0,
                                     'quick': False})
    assert '| bg_gap = acc(mixed_same) - acc(mixed_rand) | 0.300 | 0.020 |' in markdown
    assert '- larger bg_gap: correlated 0.300, random 0.020 -> yes (difference +0.280, beyond 2 SE' in markdown
    assert '| 1 | -0.1000 | +0.0100 | -0.1100 | 0.0200 | correlated moved off more |' in markdown


def test_python_m_analysis_runs_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['analysis', 'study', '--help'])
    with pytest.raises(SystemExit) as ended:
        runpy.run_module('analysis', run_name='__main__')
    assert ended.value.code == 0 and '--output_dir' in capsys.readouterr().out


def seed_entry(seed, gaps, differences, se=0.02):
    correlated, random = study.REPLICATED
    rows = [{'model': n, 'bg_gap': g, 'num_images': 200, 'fg_lift_last_two': None,
             'variant_accuracy': {'mixed_same': 0.5 + g / 2, 'mixed_rand': 0.5 - g / 2, 'only_bg_t': 0.3}}
            for n, g in zip(study.REPLICATED, gaps)]
    return {'seed': seed, correlated: {'bg_gap': gaps[0]}, random: {'bg_gap': gaps[1]},
            'bg_gap_check': study.compare(rows, correlated, random)[0],
            'attention_change': {'layers': [{'difference': d, 'se': se} for d in differences]}}


def test_replication_across_seeds_by_hand():
    per_seed = [seed_entry(42, (0.30, 0.01), (-0.10, -0.10)), seed_entry(1, (0.25, 0.00), (-0.08, 0.00)),
                seed_entry(2, (0.05, 0.04), (-0.12, 0.09))]
    replication = study.replication_verdicts(per_seed)
    assert replication['positive_control']['label'] == 'varies between runs (2 of 3)'  # seed 2: 0.05 vs 0.04
    assert replication['bg_gap']['finetuned_correlated']['mean'] == pytest.approx(0.2)
    assert replication['bg_gap']['finetuned_correlated']['sd'] == pytest.approx(0.1323, abs=1e-4)
    layer1, layer2 = replication['layers']
    assert layer1['label'] == 'stable' and layer1['difference']['mean'] == pytest.approx(-0.1)
    assert layer2['label'] == 'varies between runs (1 of 3, 1 opposite)'
    markdown = '\n'.join(study.replication_markdown({'seeds': [42, 1, 2], 'per_seed': per_seed, **replication}))
    assert '| 2 | 0.050 | 0.040 | yes (within 2 SE' in markdown
    assert '| 1 | -0.1000 ± 0.0200 | 0.0200 | stable |' in markdown
