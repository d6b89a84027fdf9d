"""``seeds.json`` as Markdown: the section "How stable are these findings across training runs".

The same text is the aggregate folder's ``seeds.md`` and ``README.md``; every sentence is written
from the numbers (`analysis.studies.stability` made the verdicts).
"""
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from analysis.core.run_files import SEEDS_FILE, read_optional_json
from analysis.render.findings import fmt
from analysis.studies.stability import is_stable

SECTION_TITLE = 'How stable are these findings across training runs'


def _layers(findings: Sequence[Mapping]) -> str:
    """``layer 3``, ``layers 1, 3`` or ``no layer``."""
    numbers = [str(f['layer'] + 1) for f in findings]
    return f'layer{"s" if len(numbers) > 1 else ""} {", ".join(numbers)}' if numbers else 'no layer'


def _stably_absent(finding: Mapping) -> bool:
    """The opposite of a finding holds by the same rule (`is_stable` with the counts swapped)."""
    return is_stable(finding['opposite'], finding['shown'], finding['runs'])


def _sink_verdict(finding: Mapping) -> str:
    if finding['stable']:
        return 'stable'
    if _stably_absent(finding):
        return f'stably absent ({finding["opposite"]} of {finding["runs"]} show no sinks)'
    return finding['label']


def stability_sentences(seeds: Mapping) -> List[str]:
    """The findings in words: what holds in every run, and what varies (with the counts)."""
    findings = seeds['findings']
    lift = [f for f in findings if f['kind'] == 'fg_lift_above_1']
    moved = [f for f in findings if f['kind'].startswith('moved_')]
    sentences = []
    if lift:
        stable = [f for f in lift if f['stable']]
        sentences.append(f'Attending to the flower more than its area (fg_lift > 1) in a stable way: {_layers(stable)}; '
                         f'varying between runs: {_layers([f for f in lift if not f["stable"]])}.')
    if moved:
        onto = [f for f in moved if f['stable'] and f['kind'] == 'moved_onto_flower']
        off = [f for f in moved if f['stable'] and f['kind'] == 'moved_off_flower']
        varies = [f for f in moved if not f['stable']]
        sentences.append(f'Fine-tuning stably moved attention onto the flower at {_layers(onto)} and off it at '
                         f'{_layers(off)}; at {_layers(varies)} the direction varies between runs.')
    sinks = [f for f in findings if f['kind'] == 'attention_sinks']
    if sinks:
        absent = [f for f in sinks if _stably_absent(f)]
        sentences.append(f'Attention sinks (high-norm tokens that draw the CLS attention) in a stable way: '
                         f'{_layers([f for f in sinks if f["stable"]])}; stably absent (the opposite shown by the same '
                         f'rule): {_layers(absent)}; varying between runs: '
                         f'{_layers([f for f in sinks if not f["stable"] and f not in absent])}.')
    for f in findings:
        if f['kind'] == 'sinks_needed':
            sentences.append(f'Replacing the flagged tokens lowers the predicted-class logit more than replacing random '
                             f'background tokens: {f["label"]} (logit difference {fmt(f["between_run"]["mean"])} ± '
                             f'{fmt(f["between_run"]["sd"])} between runs).')
        if f['kind'] == 'most_faithful':
            winners = ', '.join(sorted(set(f['winners'])))
            sentences.append(f'Most faithful map: {f["method"]} is {"stably" if f["stable"] else "not stably"} the '
                             f'most faithful ({f["label"]}; the winners per run: {winners}).')
    return sentences


def _class_rows(seeds: Mapping) -> List[str]:
    rows = ['| class | F1 mean | sd between runs | min |', '|---|---|---|---|']
    for name, s in sorted(seeds['f1_per_class'].items(), key=lambda kv: kv[1]['min']):
        rows.append(f'| {name} | {fmt(s["mean"])} | {fmt(s["sd"])} | {fmt(s["min"])} |')
    return rows


def _layer_rows(seeds: Mapping) -> List[str]:
    by_layer: Dict[int, Dict[str, Mapping]] = {}
    for f in seeds['findings']:
        if f['kind'] == 'fg_lift_above_1' or f['kind'].startswith('moved_'):
            by_layer.setdefault(f['layer'], {})['lift' if f['kind'] == 'fg_lift_above_1' else 'moved'] = f
    rows = ['| layer | fg_lift, mean ± sd between runs | within-run SE | fg_lift > 1 | flower share change, mean ± sd '
            '| within-run SE | direction |', '|---|---|---|---|---|---|---|']
    for layer, f in sorted(by_layer.items()):
        lift, moved = f.get('lift'), f.get('moved')
        cells = [str(layer + 1)]
        for entry, name in ((lift, None), (moved, 'moved')):
            if entry is None:
                cells += ['', '', '']
                continue
            between = entry['between_run']
            claim = entry['label'] if name is None else f'{entry["kind"].split("_")[1]}: {entry["label"]}'
            cells += [f'{fmt(between["mean"], digits=4)} ± {fmt(between["sd"], digits=4)}',
                      fmt(entry['within_run_se'], digits=4), claim]
        rows.append('| ' + ' | '.join(cells) + ' |')
    return rows


def _sink_rows(seeds: Mapping) -> List[str]:
    """Per layer, the sink share, the register share and fg_lift without the flagged tokens: mean ± sd between runs."""
    sinks = seeds.get('sinks') or {}
    if 'sink_share' not in sinks:
        return []
    verdicts = {f['layer']: _sink_verdict(f) for f in seeds['findings'] if f['kind'] == 'attention_sinks'}
    names = [n for n in ('sink_share', 'register_share', 'fg_lift_without') if n in sinks]
    titles = {'sink_share': 'sink share', 'register_share': 'register share',
              'fg_lift_without': 'fg_lift without flagged tokens'}
    rows = ['| layer | ' + ' | '.join(f'{titles[n]}, mean ± sd between runs' for n in names) + ' | has sinks |',
            '|---|' + '---|' * (len(names) + 1)]
    for layer in range(len(sinks['sink_share'])):
        cells = [f'{fmt(sinks[n][layer]["mean"])} ± {fmt(sinks[n][layer]["sd"])}' for n in names]
        rows.append(f'| {layer + 1} | ' + ' | '.join(cells) + f' | {verdicts.get(layer, "")} |')
    return [''] + rows


def stability_markdown(seeds: Mapping) -> str:
    """The whole section, as Markdown."""
    runs = seeds['runs']
    seeds_list = ', '.join(dict.fromkeys(str(r['seed']) for r in runs))
    bases = sorted({r.get('base_weights_sha256') or '' for r in runs})
    lines = [f'## {SECTION_TITLE}', '',
             f'{seeds["num_runs"]} training runs of the same job (seeds {seeds_list}'
             + (f', on each of {len(bases)} starting bases built with different seeds' if len(bases) > 1 else '')
             + '). '
             f'A finding is **stable** when {seeds["rule"]["text"][len("stable: "):]}; otherwise it **varies between '
             'runs** (shown in k of n runs, and how many show the opposite). The spread between runs (mean ± sd of '
             'each run\'s number) and the standard error within a run (over its test images) are given side by '
             'side, never pooled.', '',
             f'Test accuracy {fmt(seeds["test_accuracy"]["mean"])} ± {fmt(seeds["test_accuracy"]["sd"])} '
             f'(min {fmt(seeds["test_accuracy"]["min"])}); macro F1 {fmt(seeds["test_macro_f1"]["mean"])} ± '
             f'{fmt(seeds["test_macro_f1"]["sd"])} (min {fmt(seeds["test_macro_f1"]["min"])}).', '']
    lines += [f'- {s}' for s in stability_sentences(seeds)] + [''] + _class_rows(seeds) + [''] + _layer_rows(seeds)
    lines += _sink_rows(seeds)
    if seeds.get('faithfulness_ranking'):
        lines += ['', 'Faithfulness ranking per run (most faithful first): '
                  + '; '.join(f'{r["seed"]}: {", ".join(rank[:3])}' for r, rank in zip(runs, seeds['faithfulness_ranking']))
                  + '.']
    return '\n'.join(lines) + '\n'


def find_seeds(output_dir: Path) -> Optional[Tuple[Path, Dict]]:
    """The ``seeds.json`` (and its contents) that lists this run: in its parent folder, or the one above it
    (``python -m analysis seeds`` with several bases), as that command lays its runs out."""
    output_dir = Path(output_dir).resolve()
    for folder in (output_dir.parent, output_dir.parent.parent):
        seeds = read_optional_json(folder / SEEDS_FILE)
        if seeds and any(r.get('run') == output_dir.name and (folder / r.get('path', r['run'])).resolve() == output_dir
                         for r in seeds.get('runs', [])):
            return folder / SEEDS_FILE, seeds
    return None


def one_run_sentences(output_dir: Path, seed: Optional[int]) -> List[str]:
    """What the report and the card say about how far this run's per-layer findings go: from one training run,
    and, where ``python -m analysis seeds`` trained this job several times, which of them hold across runs."""
    one = f'The per-layer findings above come from one training run (seed {seed}); their standard errors are over ' \
          'test images, not over training runs.'
    found = find_seeds(output_dir)
    if found is None:
        return [one + ' python -m analysis seeds trains the same job with other seeds and says which findings '
                      'hold in every run.']
    path, seeds = found
    rel = os.path.relpath(path, Path(output_dir).resolve())
    return [one + f' This run is one of {seeds["num_runs"]} runs of the same job; across them ({rel}):',
            *stability_sentences(seeds)]
