"""What holds across training runs, on hand-made per-run numbers whose verdicts are known."""
import json
import math

import pytest
import torch

from analysis.studies import stability
from analysis.core.stats import ratio_of_means_se
from analysis.studies.stability import aggregate, direction, verdict


def test_direction_needs_two_standard_errors_on_one_side():
    assert direction(0.21, 0.1) == 1 and direction(-0.21, 0.1) == -1
    assert direction(0.19, 0.1) == 0 and direction(-0.19, 0.1) == 0  # within the run's noise
    assert direction(0.5, None) == 0 and direction(None, 0.1) == 0


def test_the_80_percent_rule():
    assert verdict([1, 1, 1, 1, 1], +1)['label'] == 'stable'
    assert verdict([1, 1, 1, 1, 0], +1)['stable']  # 4 of 5 is exactly 80 %
    assert verdict([1, 1, 1, 0, 0], +1)['label'] == 'varies between runs (3 of 5)'
    assert verdict([1, 1, 1, 1, -1], +1)['label'] == 'varies between runs (4 of 5, 1 opposite)'
    assert verdict([-1, -1, -1, -1, -1], -1)['stable'] and not verdict([-1] * 5, +1)['stable']
    assert verdict([-1, -1, -1, -1, -1], +1)['label'] == 'varies between runs (0 of 5, 5 opposite)'


def test_ratio_of_means_and_its_standard_error_by_hand():
    x = torch.tensor([[0.6], [0.3], [0.5], [0.2]])  # per image, one layer
    a = torch.tensor([0.4, 0.2, 0.3, 0.1])
    ratio, se = ratio_of_means_se(x, a)
    assert ratio.item() == pytest.approx(1.6 / 1.0)
    residual = [0.6 - 1.6 * 0.4, 0.3 - 1.6 * 0.2, 0.5 - 1.6 * 0.3, 0.2 - 1.6 * 0.1]
    mean = sum(residual) / 4
    sd = math.sqrt(sum((r - mean) ** 2 for r in residual) / 3)
    assert se.item() == pytest.approx(sd / (math.sqrt(4) * 0.25))


def run(seed, lift, lift_se, change, change_se, winner='rollout', margin=(0.05, 0.01), f1=0.95):
    """One run's entry: per layer fg_lift and fg_ratio change with their within-run SEs."""
    return {'run': f'seed_{seed}', 'seed': seed, 'test_accuracy': f1, 'test_macro_f1': f1,
            'f1_per_class': {'daisy': f1, 'rose': f1 - 0.02},
            'layers': {'fg_lift': lift, 'entropy': [0.8] * len(lift)},
            'change': {'fg_lift': [c * 10 for c in change]},
            'fg_lift': {'mean': lift, 'se': lift_se}, 'fg_ratio_change': {'mean': change, 'se': change_se},
            'faithfulness': {'ranking': [winner, 'layer_1'], 'most_faithful': winner,
                             'margin': {'mean': margin[0], 'se': margin[1]}}}


def test_aggregate_known_verdicts_means_and_spreads():
    runs = [  # layer 1: lift 1.5 +- 0.1 in every run; layer 2: above 1 by 2 SE in 3 runs only
        run(0, [1.5, 1.3], [0.1, 0.1], [0.05, -0.03], [0.01, 0.01]),
        run(1, [1.4, 1.25], [0.1, 0.1], [0.04, 0.03], [0.01, 0.01]),
        run(2, [1.6, 1.21], [0.1, 0.1], [0.06, -0.001], [0.01, 0.01]),
        run(3, [1.5, 1.1], [0.1, 0.1], [0.05, -0.025], [0.01, 0.01], winner='layer_1'),
        run(4, [1.5, 1.0], [0.1, 0.1], [0.05, -0.04], [0.01, 0.01], margin=(0.05, 0.04)),
    ]
    seeds = aggregate(runs)
    findings = {(f['kind'], f.get('layer')): f for f in seeds['findings']}
    assert findings[('fg_lift_above_1', 0)]['label'] == 'stable'
    assert findings[('fg_lift_above_1', 1)]['label'] == 'varies between runs (3 of 5)'
    assert findings[('moved_onto_flower', 0)]['label'] == 'stable'
    # layer 2: off in 3 runs beyond 2 SE, onto in 1, within noise in 1
    assert findings[('moved_off_flower', 1)]['label'] == 'varies between runs (3 of 5, 1 opposite)'
    # rollout wins 4 runs, 3 of them by more than 2 SE; layer_1 wins run 3 by more than 2 SE
    faithful = findings[('most_faithful', None)]
    assert faithful['method'] == 'rollout' and faithful['label'] == 'varies between runs (3 of 5, 1 opposite)'
    lift1 = findings[('fg_lift_above_1', 0)]['between_run']
    assert lift1['mean'] == pytest.approx(1.5) and lift1['sd'] == pytest.approx(math.sqrt(0.02 / 4))
    assert findings[('fg_lift_above_1', 0)]['within_run_se'] == pytest.approx(0.1)  # not pooled with the sd
    assert seeds['f1_per_class']['rose']['min'] == pytest.approx(0.93)
    assert seeds['change']['fg_lift'][0]['mean'] == pytest.approx(0.5)
    assert seeds['layers']['entropy'][1]['sd'] == pytest.approx(0.0)


def test_a_finding_within_every_runs_noise_counts_nowhere():
    runs = [run(s, [1.1, 1.1], [0.1, 0.1], [0.01, 0.01], [0.01, 0.01]) for s in range(5)]
    findings = {(f['kind'], f.get('layer')): f for f in aggregate(runs)['findings']}
    assert findings[('fg_lift_above_1', 0)]['label'] == 'varies between runs (0 of 5)'


def test_one_run_is_not_enough():
    with pytest.raises(ValueError, match='at least 2 runs'):
        aggregate([run(0, [1.5], [0.1], [0.05], [0.01])])


def test_rule_constants_are_stated_in_the_output():
    seeds = aggregate([run(s, [1.5], [0.1], [0.05], [0.01]) for s in range(2)])
    assert seeds['rule']['z'] == stability.Z == 2.0 and seeds['rule']['stable_share'] == 0.8
    assert '80%' in seeds['rule']['text'] and '2 SE' in seeds['rule']['text']


@pytest.mark.e2e
def test_seeds_command_end_to_end_and_the_same_seeds_give_the_same_entries(tmp_path):
    """`python -m analysis seeds` on tiny data, twice with the same seeds: identical per-run entries."""
    from analysis.cli import main as cli
    from conftest import tiny_args
    outputs = [tmp_path / 'a', tmp_path / 'b']
    for out in outputs:
        flags = [a for a in tiny_args(out, '--max_steps', '3') if a not in ('--output_dir', str(out))]
        assert cli(['seeds', '--output_dir', str(out), '--seeds', '1,2', *flags]) == 0
    a, b = (json.loads((out / 'seeds.json').read_text()) for out in outputs)
    assert a['runs'] == b['runs'] and a['findings'] == b['findings']
    assert [r['seed'] for r in a['runs']] == [1, 2] and a['num_runs'] == 2
    assert a['test_accuracy']['per_run'] == [r['test_accuracy'] for r in a['runs']]
    per_run = [json.loads((outputs[0] / f'seed_{s}' / 'all_results.json').read_text())['test_accuracy'] for s in (1, 2)]
    assert a['test_accuracy']['per_run'] == per_run
    assert {f['kind'] for f in a['findings']} >= {'fg_lift_above_1', 'most_faithful'}
    card = (outputs[0] / 'seed_1' / 'README.md').read_text()
    assert 'one training run (seed 1)' in card and 'one of 2 runs of the same job' in card
    assert 'How stable are these findings across training runs' in (outputs[0] / 'seed_2' / 'report.html').read_text()
    assert '## How stable are these findings across training runs' in (outputs[0] / 'seeds.md').read_text()


def test_the_section_states_the_verdicts_and_both_spreads():
    from analysis.render.stability import stability_markdown
    runs = [run(s, [1.5, 1.0], [0.1, 0.1], [0.05, -0.04], [0.01, 0.01]) for s in range(5)]
    markdown = stability_markdown(aggregate(runs))
    assert markdown.startswith('## How stable are these findings across training runs')
    assert '5 training runs of the same job (seeds 0, 1, 2, 3, 4)' in markdown
    assert 'in a stable way: layer 1; varying between runs: layer 2.' in markdown
    assert 'onto the flower at layer 1 and off it at layer 2;' in markdown
    assert '| 1 | 1.5000 ± 0.0000 | 0.1000 | stable | 0.0500 ± 0.0000 | 0.0100 | onto: stable |' in markdown
    assert '| rose | 0.930 | 0.000 | 0.930 |' in markdown


def test_seeds_command_needs_two_runs_and_integer_seeds(tmp_path):
    from analysis.seeds import parse_seeds, run_dir, run_seeds
    assert parse_seeds('42,0, 1') == [42, 0, 1]
    with pytest.raises(ValueError, match='comma-separated integers'):
        parse_seeds('42,x')
    with pytest.raises(ValueError, match='at least two runs'):
        run_seeds([], tmp_path, seeds=[1])
    assert run_dir(tmp_path, 3, None) == tmp_path / 'seed_3'
    assert run_dir(tmp_path, 3, 1) == tmp_path / 'base_seed_1' / 'seed_3'


def _sinks(share, se, flagged, causal=None):
    """A run's ``sinks`` entry (as run_findings writes it) from per layer sink shares, their SEs and flagged shares."""
    from analysis.maps.sinks import sink_margin
    margins = [sink_margin({'sink_share': {'mean': m, 'se': s}, 'flagged_share': {'mean': f}})
               for m, s, f in zip(share, se, flagged)]
    entry = {'sink_share': share, 'flagged_share': flagged,
             'sink_margin': {'mean': [m for m, _ in margins], 'se': [s for _, s in margins]}}
    if causal is not None:
        entry['causal'] = {'layer': 1, 'mean': causal[0], 'se': causal[1]}
    return entry


def test_attention_sinks_findings_across_runs():
    """Layer 1: no sinks in every run (share far under the 10 % floor); layer 2: sinks in 4 runs of 5, the fifth within
    its noise; the causal drop is beyond 2 SE in 3 runs."""
    runs = []
    for seed in range(5):
        entry = run(seed, [1.5, 1.3], [0.1, 0.1], [0.05, -0.03], [0.01, 0.01])
        second = 0.6 if seed < 4 else 0.12  # 0.12 - 0.1 = 0.02 < 2 x 0.02: within the noise
        entry['sinks'] = _sinks([0.01, second], [0.002, 0.02], [0.01, 0.02],
                                causal=(-1.0, 0.1) if seed < 3 else (-0.1, 0.1))
        runs.append(entry)
    seeds = aggregate(runs)
    findings = {(f['kind'], f.get('layer')): f for f in seeds['findings']}
    assert findings[('attention_sinks', 0)]['label'] == 'varies between runs (0 of 5, 5 opposite)'
    assert findings[('attention_sinks', 1)]['label'] == 'stable'  # 4 of 5 is 80 %
    assert findings[('sinks_needed', None)]['label'] == 'varies between runs (3 of 5)'
    assert seeds['sinks']['sink_share'][1]['mean'] == pytest.approx((4 * 0.6 + 0.12) / 5)
    from analysis.render.stability import stability_markdown, stability_sentences
    sentence = next(s for s in stability_sentences(seeds) if s.startswith('Attention sinks'))
    assert 'in a stable way: layer 2;' in sentence and 'stably absent (the opposite shown by the same rule): layer 1;' \
        in sentence
    table = stability_markdown(seeds)
    assert '| 2 | 0.504 ± 0.215 | stable |' in table and '| 1 | 0.010 ± 0.000 | stably absent (5 of 5 show no sinks) |' in table
