"""What the numbers say: the sentences, thresholds and number formats shared by the report and the card.

Every sentence here is plain text generated from the numbers of a run (``all_results.json``,
``attention_metrics.json``, ``background.json``, ``importance.json``, ``faithfulness.json``); the HTML report escapes it
with Jinja, the model card with `analysis.render.card.md_escape`. Each threshold a sentence depends on is
defined here once, so the report and the card can never disagree. Layer and head numbers in the
text are 1-based.
"""
import math
from typing import List, Mapping, Optional, Sequence, Tuple

from analysis.maps.attention_metrics import MASK_METRICS
from analysis.maps.sinks import HIGH_NORM_RATIO, SINK_MIN_DRAW, SINK_MIN_SHARE
from analysis.studies.faithfulness import method_label
from analysis.studies.sinks import sink_layers
from analysis.studies.stability import Z
from data_scripts.synthetic_flowers import VARIANTS

# |bg_gap| from which the predictions count as following the background. Xiao et al. 2021 ("Noise or
# Signal") report BG-Gaps of roughly 0.1-0.2 for ImageNet models; 0.05 is well above the noise of a
# few hundred test images.
BG_GAP_THRESHOLD = 0.05
# "Class information appears" at the first layer whose probe reaches this share of the last one.
PROBE_SHARE = 0.9
# fg_lift above this favours the flower (uniform attention gives exactly 1).
NO_PREFERENCE_LIFT = 1.0
# Faithfulness: a paired difference (between two maps, per image) counts beyond this many standard errors.
FAITHFUL_SE = 2.0
# What the model sees in each background-study variant (Xiao et al. 2020).
VARIANT_DESCRIPTIONS = {
    'original': 'the test image as is',
    'only_fg': 'the flower on a black background',
    'no_fg': 'the flower region blacked out, background kept',
    'only_bg_t': 'the background alone, without the flower',
    'mixed_same': 'the flower on the background of another image of the same class',
    'mixed_rand': 'the flower on the background of an image of another class',
}
assert tuple(VARIANT_DESCRIPTIONS) == VARIANTS, 'one description per background variant'


def fmt(value, kind: str = 'float', digits: int = 3) -> str:
    """A number for a table or a sentence; None / NaN show as ``n/a``.

    Args:
        value: the number.
        kind: ``'float'`` (``digits`` decimals), ``'percent'`` (one decimal, ``%``), ``'int'`` or
            ``'px'`` (one decimal).
        digits: decimals of ``'float'``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 'n/a'
    if kind == 'percent':
        return f'{100 * float(value):.1f}%'
    if kind == 'int':
        return str(int(value))
    if kind == 'px':
        return f'{float(value):.1f}'
    return f'{float(value):.{digits}f}'


def defined(values: Sequence[Optional[float]]) -> List[Tuple[int, float]]:
    """``(0-based layer, value)`` for the layers whose value is defined (not None / NaN)."""
    return [(i, float(v)) for i, v in enumerate(values) if v is not None and not math.isnan(float(v))]


def uses_background(bg_gap: float) -> bool:
    """The reading of bg_gap that the report and the card share: the predictions follow the background."""
    return bg_gap >= BG_GAP_THRESHOLD


def mask_omission_reason(metrics: Mapping) -> str:
    """Why the flower-mask metrics are missing, from ``attention_metrics.json``."""
    omitted = metrics.get('omitted', {})
    reasons = sorted({str(omitted[m]) for m in MASK_METRICS if m in omitted})
    return '; '.join(reasons) if reasons else 'attention_metrics.json says the dataset has no masks'


def best_fg_lift_layer(metrics: Optional[Mapping]) -> Optional[int]:
    """0-based layer with the highest head-averaged fg_lift, or None without fg_lift."""
    lift = defined(((metrics or {}).get('layers', {}).get('fg_lift') or {}).get('mean', []))
    return max(lift, key=lambda iv: iv[1])[0] if lift else None


def classification_sentences(all_results: Mapping) -> List[str]:
    if 'test_accuracy' not in all_results:
        return ['all_results.json holds no test_accuracy: the classification results are missing.']
    split = str(all_results.get('test_split', 'test'))
    text = f'{split.capitalize()} accuracy {fmt(all_results["test_accuracy"], "percent")}'
    if 'test_macro_f1' in all_results:
        text += f', macro F1 {fmt(all_results["test_macro_f1"])}'
    f1 = all_results.get('test_f1_per_class') or {}
    if f1:
        worst = min(f1, key=lambda k: f1[k])
        text += f'; lowest class F1: {worst} {fmt(f1[worst], digits=2)}'
    return [text + '.']


# From this many classes on, per-class tables and F1 bars list the worst F1 first (label order below it).
MANY_CLASSES = 21
# Rows of the most-confused-pairs table.
CONFUSED_PAIRS = 10


def per_class_order(all_results: Mapping) -> List[str]:
    """The class names in the order per-class tables list them: label order, or worst F1 first at `MANY_CLASSES`."""
    names = list(all_results.get('test_class_names') or all_results.get('test_f1_per_class') or [])
    f1 = all_results.get('test_f1_per_class') or {}
    if len(names) < MANY_CLASSES or not f1:
        return names
    position = {name: i for i, name in enumerate(names)}
    return sorted(names, key=lambda n: (float(f1.get(n, math.inf)), position[n]))  # ties: label order


def per_class_order_note(all_results: Mapping) -> Optional[str]:
    """What the per-class order is, when it is not label order."""
    names = all_results.get('test_class_names') or []
    if len(names) < MANY_CLASSES or not all_results.get('test_f1_per_class'):
        return None
    return f'{len(names)} classes, sorted by F1, worst first.'


def confused_pairs(all_results: Mapping, top: int = CONFUSED_PAIRS) -> List[Tuple[str, str, int, int]]:
    """The most frequent confusions of the test confusion matrix: ``(true class, predicted class, images, images
    of the true class)``, most images first (ties: the larger share of the true class, then label order)."""
    cm, names = all_results.get('test_confusion_matrix'), all_results.get('test_class_names')
    if not cm or not names:
        return []
    totals = [sum(row) for row in cm]
    cells = [(int(n), t, p) for t, row in enumerate(cm) for p, n in enumerate(row) if t != p and n > 0]
    cells.sort(key=lambda c: (-c[0], -c[0] / totals[c[1]], c[1], c[2]))
    return [(names[t], names[p], n, int(totals[t])) for n, t, p in cells[:top]]


def confused_pairs_table(all_results: Mapping, top: int = CONFUSED_PAIRS) -> Optional[Tuple[List[str], List[List[str]]]]:
    """``(header, rows)`` of the most confused class pairs, or None when no test image was misclassified."""
    pairs = confused_pairs(all_results, top)
    if not pairs:
        return None
    header = ['true class', 'predicted as', 'images', 'share of the true class']
    return header, [[true, pred, str(n), f'{fmt(n / total, "percent")} of {total}'] for true, pred, n, total in pairs]


def confused_pairs_sentence(all_results: Mapping, top: int = CONFUSED_PAIRS) -> Optional[str]:
    """How many of the misclassified images the table's pairs account for."""
    pairs = confused_pairs(all_results, top)
    cm = all_results.get('test_confusion_matrix') or []
    wrong = sum(n for t, row in enumerate(cm) for p, n in enumerate(row) if t != p)
    if not pairs:
        return None
    shown = sum(n for _, _, n, _ in pairs)
    return (f'The {len(pairs)} most frequent confusions (true class taken for another) account for {shown} of the '
            f'{wrong} misclassified {all_results.get("test_split", "test")} images.')


def attention_sentences(metrics: Mapping) -> List[str]:
    layers = metrics.get('layers', {})
    num_layers = int(metrics['num_layers'])
    sentences = []
    if 'fg_lift' in layers:
        lift = defined(layers['fg_lift']['mean'])
        if lift:
            above = [i + 1 for i, v in lift if v > NO_PREFERENCE_LIFT]
            best, best_value = max(lift, key=lambda iv: iv[1])
            if above:
                sentences.append(
                    f'Layers with fg_lift > 1 (attend to the flower more than its area): '
                    f'{", ".join(map(str, above))} (of {num_layers}); highest: layer {best + 1} '
                    f'(fg_lift {best_value:.2f}).')
            else:
                sentences.append(f'No layer has fg_lift > 1: on average no layer attends to the flower more than '
                                 f'its area (highest: layer {best + 1}, fg_lift {best_value:.2f}).')
    if 'pointing_game' in layers:
        hits = defined(layers['pointing_game']['mean'])
        if hits:
            best, best_value = max(hits, key=lambda iv: iv[1])
            chance = f' (chance: {100 * float(metrics["flower_area"]):.0f}%)' if 'flower_area' in metrics else ''
            sentences.append(f'The most-attended patch lies on the flower in {100 * best_value:.0f}% of images '
                             f'at layer {best + 1}{chance}.')
    if 'mean_attention_distance' in layers:
        distance = [float(d) for d in layers['mean_attention_distance']['mean']]
        first, last, low, high = distance[0], distance[-1], min(distance), max(distance)
        if high - low < 1.0:  # less than a pixel apart: no trend worth a verb
            sentences.append(f'Mean attention distance is about the same at every layer ({low:.1f}-{high:.1f} px).')
        else:
            verb = 'grows' if last > first else 'shrinks' if last < first else 'returns'
            sentences.append(f'Mean attention distance {verb} from {first:.1f} px (layer 1) to {last:.1f} px '
                             f'(layer {num_layers}); range {low:.1f}-{high:.1f} px.')
    if 'entropy' in layers:
        entropy = layers['entropy']['mean']
        sentences.append(f'CLS attention entropy (1 = uniform over patches) is {float(entropy[0]):.2f} at layer 1 '
                         f'and {float(entropy[-1]):.2f} at layer {num_layers}.')
    rollout = metrics.get('rollout') or {}
    if rollout.get('fg_lift') is not None:
        sentences.append(f'Attention rollout: fg_lift {float(rollout["fg_lift"]):.2f}'
                         + (f', pointing game {100 * float(rollout["pointing_game"]):.0f}%'
                            if rollout.get('pointing_game') is not None else '') + '.')
    if not metrics.get('has_masks', False):
        sentences.append(f'Flower-mask metrics are omitted: {mask_omission_reason(metrics)}.')
    return sentences


def background_sentences(background: Mapping) -> List[str]:
    sentences = []
    variants = background.get('variants') or {}
    if variants:
        sentences.append('Accuracy by background: ' + ', '.join(
            f'{name} {fmt(v["accuracy"], "percent")}' for name, v in variants.items() if 'accuracy' in v) + '.')
    if background.get('bg_gap') is not None:
        gap = float(background['bg_gap'])
        if uses_background(gap):
            verdict = 'the model uses the background'
        elif gap <= -BG_GAP_THRESHOLD:
            verdict = 'random backgrounds help more than same-class ones, which is unexpected; check the study'
        else:
            verdict = 'the background has little effect on the predictions'
        sentences.append(f'bg_gap = acc(mixed_same) - acc(mixed_rand) = {gap:.2f}: {verdict} '
                         f'(bg_gap >= {BG_GAP_THRESHOLD:.2f} counts as using the background).')
    return sentences


def background_limitation(background: Optional[Mapping]) -> str:
    """The model card's limitation sentence on the background."""
    if background is None:
        return ('The background study was not run, so how much the predictions rely on the background rather '
                'than the flower is unknown.')
    if background.get('bg_gap') is None:
        return 'The background study did not record bg_gap, so reliance on the background is not quantified.'
    gap = float(background['bg_gap'])
    if uses_background(gap):
        return (f'The model relies on the background: moving a flower onto the background of another class '
                f'costs {100 * gap:.1f} accuracy points (bg_gap {gap:.3f}). Expect errors on flowers '
                'photographed in unusual surroundings.')
    return (f'The background study found little reliance on the background (bg_gap {gap:.3f}); this holds for '
            'the kinds of backgrounds in the test data only.')


def importance_sentences(importance: Mapping) -> List[str]:
    sentences = []
    baseline = importance.get('baseline_accuracy')
    probe = importance.get('probe_accuracy')
    if probe:
        final = float(probe[-1])
        first = next(i for i, a in enumerate(probe) if float(a) >= PROBE_SHARE * final)
        sentences.append(
            f'Class information appears in the CLS token at layer {first + 1} (probe accuracy '
            f'{fmt(probe[first], "percent")} >= {PROBE_SHARE:.0%} of the final {fmt(final, "percent")}).')
    skip = importance.get('layer_skip_accuracy')
    if skip and baseline is not None:
        worst = min(range(len(skip)), key=lambda i: float(skip[i]))
        sentences.append(f'Skipping layer {worst + 1} hurts most: accuracy {fmt(skip[worst], "percent")} '
                         f'instead of {fmt(baseline, "percent")}.')
    heads = importance.get('head_ablation_accuracy')
    if heads and baseline is not None:
        layer, head = min(((l, h) for l in range(len(heads)) for h in range(len(heads[l]))),
                          key=lambda lh: float(heads[lh[0]][lh[1]]))
        drop = float(baseline) - float(heads[layer][head])
        sentences.append(f'Ablating a single head costs at most {100 * drop:.1f} points '
                         f'(layer {layer + 1}, head {head + 1}).')
    pruning = importance.get('greedy_pruning')
    if pruning and baseline is not None:
        total = pruning.get('num_heads')
        of = f' of {int(total)}' if total is not None else ''
        sentences.append(f'{int(pruning["num_prunable"])}{of} heads can be pruned with at most '
                         f'{100 * float(pruning["tolerance"]):.0f} point accuracy loss (greedy pruning).')
    return sentences


def _pm(entry: Optional[Mapping], kind: str = 'float') -> str:
    """``mean ± se`` of a ``{"mean", "se"}`` entry (``n/a`` where undefined)."""
    if not entry or entry.get('mean') is None:
        return 'n/a'
    if entry.get('se') is None:
        return fmt(entry['mean'], kind)
    return f'{fmt(entry["mean"], kind)} ± {fmt(entry["se"], kind)}'


def _beyond(entry: Optional[Mapping]) -> Optional[int]:
    """+1 / -1 when a paired difference is beyond `FAITHFUL_SE` standard errors above / below 0, 0 within,
    None when it has no standard error."""
    if not entry or entry.get('mean') is None or entry.get('se') is None:
        return None
    if abs(float(entry['mean'])) <= FAITHFUL_SE * float(entry['se']):
        return 0
    return 1 if float(entry['mean']) > 0 else -1


def faithfulness_sentences(faithfulness: Mapping, metrics: Optional[Mapping] = None) -> List[str]:
    """Which attention map explains the decision (``faithfulness.json``), in words.

    Args:
        faithfulness: parsed ``faithfulness.json``.
        metrics: parsed ``attention_metrics.json``; its highest-fg_lift layer (the one the attention
            section names) is the layer compared, else the one ``faithfulness.json`` measured.
    """
    methods = faithfulness['methods']
    best = faithfulness['most_faithful']
    name = best['method']
    entry = methods[name]
    sentences = [f'Most faithful attention map: {method_label(name)}, insertion - deletion AUC {_pm(entry["difference"])} '
                 f'(deletion {_pm(entry["deletion_auc"])}, insertion {_pm(entry["insertion_auc"])}; '
                 f'{int(faithfulness["num_images"])} images).']
    if 'random' in methods:
        verdict = {1: 'beyond', 0: 'not beyond', -1: 'below', None: 'not tested against'}[_beyond(best.get('vs_random'))]
        sentences.append(f'A random map scores {_pm(methods["random"]["difference"])}; the most faithful map is '
                         f'{verdict} it by {FAITHFUL_SE:.0f} standard errors.')
    if best.get('runner_up'):
        close = _beyond(best.get('margin')) == 0
        sentences.append(f'Runner-up: {method_label(best["runner_up"])}, {_pm(best["margin"])} behind'
                         + (f' (within {FAITHFUL_SE:.0f} standard errors: the two cannot be told apart on these images).'
                            if close else '.'))
    layer = best_fg_lift_layer(metrics) if metrics is not None else None
    if layer is None:
        layer = faithfulness.get('highest_fg_lift_layer')
    ranking = best.get('layer_ranking') or []
    lift_name = f'layer_{layer + 1}' if layer is not None else None
    if lift_name in ranking:
        if lift_name == name:
            text = 'is also the most faithful map'
        elif lift_name == ranking[0]:
            text = f'is the most faithful layer map, though {method_label(name)} is more faithful'
        else:
            text = (f'is not the most faithful: it ranks {ranking.index(lift_name) + 1} of {len(ranking)} layers '
                    f'(insertion - deletion {fmt(methods[lift_name]["difference"]["mean"])}; best layer, '
                    f'{method_label(ranking[0])}: {fmt(methods[ranking[0]]["difference"]["mean"])})')
        sentences.append(f'The layer with the highest fg_lift, layer {layer + 1}, {text}.')
    share = entry.get('background_share')
    if share and share.get('mean') is not None:
        versus = best.get('background_vs_random')
        where = {1: 'more of it on the background than a random map', -1: 'less of it on the background than a '
                 'random map: it favours the flower', 0: 'about as much on the background as a random map',
                 None: 'no comparison with a random map'}[_beyond(versus)]
        random_share = (methods.get('random', {}).get('background_share') or {}).get('mean')
        sentences.append(
            f'Of the relevance on its top {fmt(faithfulness.get("top_fraction"), "percent")} patches, '
            f'{method_label(name)} puts {_pm(share, "percent")} on the background (background area '
            f'{fmt(faithfulness.get("background_area"), "percent")}, random map {fmt(random_share, "percent")}): '
            f'{where}.')
    outcome = entry.get('by_outcome') or {}
    wrong, right = outcome.get('wrong', {}).get('difference') or {}, outcome.get('correct', {}).get('difference') or {}
    if wrong.get('num_images', 0) >= 2 and right.get('num_images', 0) >= 2:
        sentences.append(f'On wrongly classified images ({wrong["num_images"]}) it scores {_pm(wrong)}, on correct '
                         f'ones ({right["num_images"]}) {_pm(right)}.')
    if (faithfulness.get('omitted') or {}).get('mask'):
        sentences.append(f'No flower-mask reference and no background share: {faithfulness["omitted"]["mask"]}.')
    return sentences


def faithfulness_table(faithfulness: Mapping) -> Tuple[List[str], List[List[str]]]:
    """The per-map table shared by the report and the card: ``(header, rows)``, best map first."""
    methods = faithfulness['methods']
    with_share = any(m.get('background_share') for m in methods.values())
    header = ['map', 'deletion AUC (lower = better)', 'insertion AUC (higher = better)', 'insertion - deletion']
    if with_share:
        header.append(f'background share of top {fmt(faithfulness.get("top_fraction"), "percent")}')
    rows = []
    for name in faithfulness.get('ranking') or list(methods):
        m = methods[name]
        row = [method_label(name), _pm(m['deletion_auc']), _pm(m['insertion_auc']), _pm(m['difference'])]
        if with_share:
            row.append(_pm(m.get('background_share'), 'percent'))
        rows.append(row)
    return header, rows


def faithfulness_outcome_table(faithfulness: Mapping) -> Optional[Tuple[List[str], List[List[str]]]]:
    """insertion - deletion per map on correctly and on wrongly classified images, or None without the split."""
    methods = faithfulness['methods']
    if not all('by_outcome' in m for m in methods.values()):
        return None
    first = next(iter(methods.values()))['by_outcome']
    header = ['map'] + [f'{outcome}: insertion - deletion ({first[outcome]["difference"]["num_images"]} images)'
                        for outcome in ('correct', 'wrong')]
    rows = [[method_label(name)] + [_pm(methods[name]['by_outcome'][o]['difference']) for o in ('correct', 'wrong')]
            for name in faithfulness.get('ranking') or list(methods)]
    return header, rows


def summary_sentences(
        all_results: Mapping,
        metrics: Optional[Mapping] = None,
        background: Optional[Mapping] = None,
        importance: Optional[Mapping] = None,
        faithfulness: Optional[Mapping] = None,
) -> List[str]:
    """The sentences at the top of the report (and in the card), classification first.

    Args:
        all_results: parsed ``all_results.json``.
        metrics / background / importance / faithfulness: parsed ``attention_metrics.json``,
            ``background.json``, ``importance.json``, ``faithfulness.json``, or None when that step was not run.
    """
    sentences = classification_sentences(all_results)
    if metrics is not None:
        sentences += attention_sentences(metrics)
    if background is not None:
        sentences += background_sentences(background)
    if importance is not None:
        sentences += importance_sentences(importance)
    if faithfulness is not None:
        sentences += faithfulness_sentences(faithfulness, metrics)[:1]
    return sentences



def _layers(layers: Sequence[int]) -> str:
    return ', '.join(str(layer + 1) for layer in layers) if layers else 'none'


def change_sentences(change: Mapping) -> List[str]:
    """What training changed in the attention (``attention_change.json``), layer by layer."""
    js = change['js_divergence']
    most = max(range(len(js['mean'])), key=lambda layer: js['mean'][layer])
    least = min(range(len(js['mean'])), key=lambda layer: js['mean'][layer])
    sentences = [f'Training moved the CLS maps most at layer {most + 1} (Jensen-Shannon divergence between each '
                 f'image\'s map before and after: {js["mean"][most]:.3f} ± {js["se"][most]:.3f} SE) and least at '
                 f'layer {least + 1} ({js["mean"][least]:.3f} ± {js["se"][least]:.3f}).']
    lift = change.get('metrics', {}).get('fg_lift')
    if lift is not None:
        before = [i for i, v in defined(lift['start']) if v > NO_PREFERENCE_LIFT]
        after = [i for i, v in defined(lift['end']) if v > NO_PREFERENCE_LIFT]
        sentences.append(f'Layers with fg_lift > 1 at the start: {_layers(before)}; after training: {_layers(after)} '
                         f'(of {int(change["num_layers"])}).')
    fg = change.get('fg_ratio_change')
    if fg is not None:
        onto = [i for i, (m, s) in enumerate(zip(fg['mean'], fg['se'])) if m > 2 * s]
        off = [i for i, (m, s) in enumerate(zip(fg['mean'], fg['se'])) if m < -2 * s]
        def where(layers):
            return f'at layers {_layers(layers)}' if layers else 'at no layer'
        sentences.append(f'Per image, training moved attention onto the flower {where(onto)} and off it {where(off)} '
                         '(change of fg_ratio beyond 2 standard errors).')
    rollout = change.get('rollout', {}).get('fg_lift')
    if rollout is not None:
        sentences.append(f'Rollout fg_lift: {float(rollout["start"]):.2f} at the start, {float(rollout["end"]):.2f} '
                         'after training.')
    return sentences


def change_table(change: Mapping) -> Tuple[List[str], List[List[str]]]:
    """The per-layer before/after table shared by the report and the card: ``(header, rows)``."""
    metrics = change.get('metrics', {})
    names = [n for n in ('fg_lift', 'pointing_game', 'entropy', 'mean_attention_distance') if n in metrics]
    kinds = {'pointing_game': 'percent', 'mean_attention_distance': 'px'}
    header = ['layer'] + [f'{n} {when}' for n in names for when in ('start', 'end')] + ['JS divergence (± SE)']
    fg = change.get('fg_ratio_change')
    if fg is not None:
        header.append('fg_ratio change (± SE)')
    rows = []
    for layer in range(int(change['num_layers'])):
        row = [str(layer + 1)]
        for name in names:
            row += [fmt(metrics[name][when][layer], kinds.get(name, 'float')) for when in ('start', 'end')]
        js = change['js_divergence']
        row.append(f'{js["mean"][layer]:.3f} ± {js["se"][layer]:.3f}')
        if fg is not None:
            row.append(f'{fg["mean"][layer]:+.3f} ± {fg["se"][layer]:.3f}')
        rows.append(row)
    return header, rows


def _points(delta: float) -> str:
    """An accuracy difference in points, signed: ``-0.4 points`` / ``+1.2 points``."""
    return f'{100 * delta:+.1f} points'


def _blocks(n: int) -> str:
    return f'{int(n)} block' + ('' if int(n) == 1 else 's')


def _lowest_f1(f1: Mapping) -> str:
    name = min(f1, key=lambda k: f1[k])
    return f'{name} {fmt(f1[name], digits=2)}'


def compression_sentences(compress: Mapping) -> List[str]:
    """What the compression (``compress.json``) kept, what it gained and what it cost; blocks 1-based."""
    blocks, validation = compress.get('blocks') or {}, compress.get('validation') or {}
    full = (compress.get('test') or {}).get('full') or {}
    compressed = (compress.get('test') or {}).get('compressed') or {}
    walked = ', '.join(f'{_blocks(s["depth"])} {fmt(s["val_accuracy"], "percent")}'
                       for s in compress.get('search') or [])
    drop = float((compress.get('settings') or {}).get('max_accuracy_drop', 0.0))
    if compress.get('outcome') != 'compressed':
        sentences = [f'No block was removed: {compress.get("message", compress.get("outcome"))}']
        if full:
            sentences.append(f'Full model: test accuracy {fmt(full["accuracy"], "percent")}, macro F1 '
                             f'{fmt(full["macro_f1"])}.')
        if walked:
            sentences.append(f'Validation accuracy after distillation, per depth tried: {walked}.')
        return sentences
    params, flops, speed = compress['parameters'], compress['gflops'], compress['throughput']
    heads = compress.get('heads') or {}
    sentences = [
        f'Compressed from {int(blocks["num_full"])} to {_blocks(blocks["num_kept"])} (kept: '
        f'{", ".join(str(b + 1) for b in blocks["kept"])}; all {int(heads.get("per_block", 0))} heads of each kept '
        f'block): {float(speed["speedup"]):.2f}x faster CPU inference (batch {int(speed["batch_size"])}, '
        f'{int(speed["threads"])} threads, both models measured alternately in one process), '
        f'{float(flops["ratio"]):.2f}x fewer GFLOPs ({float(flops["full"]):.3g} → {float(flops["compressed"]):.3g} '
        f'per image), {float(params["ratio"]):.2f}x fewer parameters.',
        f'Test accuracy {fmt(full["accuracy"], "percent")} → {fmt(compressed["accuracy"], "percent")} '
        f'({_points(compressed["accuracy"] - full["accuracy"])}), macro F1 {fmt(full["macro_f1"])} → '
        f'{fmt(compressed["macro_f1"])} ({_points(compressed["macro_f1"] - full["macro_f1"])}); lowest class F1 '
        f'{_lowest_f1(compressed["f1_per_class"])} (full model: {_lowest_f1(full["f1_per_class"])}).',
        f'{_blocks(blocks["num_kept"])} is the smallest depth whose validation accuracy after distillation '
        f'({fmt(validation["compressed_accuracy"], "percent")}) is within {100 * drop:.1f} points of the full '
        f'model\'s ({fmt(validation["full_accuracy"], "percent")}); depths tried: {walked}.',
    ]
    return sentences


def compression_tradeoff(compress: Mapping) -> str:
    """The model card's one-line trade-off of a compressed model."""
    full, compressed = compress['test']['full'], compress['test']['compressed']
    return (f'This model is {float(compress["throughput"]["speedup"]):.2f}x faster on CPU than the full model it was '
            f'compressed from; test accuracy changes by {_points(compressed["accuracy"] - full["accuracy"])} and '
            f'macro F1 by {_points(compressed["macro_f1"] - full["macro_f1"])} (lowest class F1 '
            f'{_lowest_f1(compressed["f1_per_class"])}, full model {_lowest_f1(full["f1_per_class"])}).')


def compression_table(compress: Mapping) -> Tuple[List[str], List[List[str]]]:
    """Full against compressed model, shared by the report and the card: ``(header, rows)``."""
    full, compressed = compress['test']['full'], compress['test']['compressed']
    blocks, heads = compress['blocks'], compress['heads']
    speed = compress['throughput']
    split = compress['test'].get('split', 'test')
    rows = [
        ['blocks', str(blocks['num_full']), str(blocks['num_kept'])],
        ['attention heads', str(heads['num_full']), str(heads['num_kept'])],
        ['parameters', f'{int(compress["parameters"]["full"]):,}', f'{int(compress["parameters"]["compressed"]):,}'],
        ['GFLOPs per image', fmt(compress['gflops']['full'], digits=4), fmt(compress['gflops']['compressed'], digits=4)],
        [f'CPU images/s (batch {speed["batch_size"]}, {speed["threads"]} threads)',
         fmt(speed['images_per_s']['full'], digits=1), fmt(speed['images_per_s']['compressed'], digits=1)],
        ['CPU speed-up', '1.00x', f'{float(speed["speedup"]):.2f}x'],
        [f'{split} accuracy', fmt(full['accuracy'], 'percent'), fmt(compressed['accuracy'], 'percent')],
        [f'{split} macro F1', fmt(full['macro_f1']), fmt(compressed['macro_f1'])],
    ]
    rows += [[f'F1 {name}', fmt(full['f1_per_class'][name]), fmt(compressed['f1_per_class'].get(name))]
             for name in full['f1_per_class']]
    return ['', 'full model', 'compressed'], rows


def compression_search_table(compress: Mapping) -> Tuple[List[str], List[List[str]]]:
    """Every depth the compression search walked, in order: ``(header, rows)``; blocks 1-based."""
    header = ['depth', 'kept blocks', 'chosen by', 'probe accuracy', 'validation accuracy before',
              'validation accuracy after distillation', 'within tolerance', 'CPU speed-up']
    rows = [[str(s['depth']), ', '.join(str(b + 1) for b in s['kept_blocks']), str(s['candidate']),
             fmt(s.get('probe_accuracy'), 'percent'), fmt(s['val_accuracy_before'], 'percent'),
             fmt(s['val_accuracy'], 'percent'), 'yes' if s['within_tolerance'] else 'no',
             'n/a' if s.get('speedup') is None else f'{float(s["speedup"]):.2f}x']
            for s in compress.get('search') or []]
    return header, rows


def sink_sentences(sinks: Mapping) -> List[str]:
    """What ``sinks.json`` says, in words: are there high-norm tokens and sinks, where, and does the model need them."""
    layers = sinks['layers']
    flagged = [layer['flagged_share']['mean'] for layer in layers]
    top = max(range(len(layers)), key=lambda i: layers[i]['sink_share']['mean'])
    entry = layers[top]
    found = sink_layers(sinks)
    rule = (f'flagged tokens that draw more than {fmt(SINK_MIN_SHARE, "percent")} of the CLS attention and '
            f'{SINK_MIN_DRAW:g}x their share of the tokens, beyond {Z:g} SE')
    if found:
        ratio = entry['norm_ratio']['mean']
        where = f'layer{"s" if len(found) > 1 else ""} {_layers(found)}'
        sentences = [f'Attention sinks at {where} ({rule}): at layer {top + 1}, '
                     f'{fmt(entry["flagged_share"]["mean"], "percent")} of the patch tokens are flagged (norm '
                     f'{fmt(ratio, digits=1)}x the median) and draw {_pm(entry["sink_share"], "percent")} of the CLS '
                     'attention.' + (' Their norm is far from the ~10x of the high-norm tokens of large ViTs (Darcet et '
                                     'al. 2024).' if ratio is not None and ratio < HIGH_NORM_RATIO else '')]
    else:
        sentences = [f'No layer has attention sinks ({rule}). The flagged high-norm tokens are '
                     f'{fmt(min(flagged), "percent")} to {fmt(max(flagged), "percent")} of the patch tokens per layer; '
                     f'they draw at most {_pm(entry["sink_share"], "percent")} of the CLS attention (layer {top + 1}).']
    where = found[-1] if found else top
    if layers[where].get('flagged_on_background') is not None:
        sentences.append(f'At layer {where + 1}, {fmt(layers[where]["flagged_on_background"], "percent")} of the '
                         f'flagged tokens\' area lies on the background (background area '
                         f'{fmt(layers[where]["background_area"], "percent")}).')
    if 'fg_lift_without' in layers[0]:
        shifts = [(i, layer['fg_lift_without']['mean'] - layer['fg_lift']['mean']) for i, layer in enumerate(layers)]
        i, shift = max(shifts, key=lambda t: abs(t[1]))
        sentences.append(f'Without the flagged tokens (the CLS attention renormalised over the others), fg_lift changes '
                         f'most at layer {i + 1}: {_pm(layers[i]["fg_lift"])} -> {_pm(layers[i]["fg_lift_without"])}.')
    if 'register_share' in layers[0]:
        shares = [layer['register_share']['mean'] for layer in layers]
        most = max(range(len(shares)), key=shares.__getitem__)
        sentences.append(f'The CLS token puts {fmt(min(shares), "percent")} to {fmt(max(shares), "percent")} of its '
                         f'attention on the {sinks.get("num_registers")} register tokens (most at layer {most + 1}).')
    causal = sinks.get('causal') or {}
    if causal.get('sinks'):
        acc = causal['accuracy']
        sentences.append(
            f'Causal check at layer {causal["layer"] + 1} ({causal["images_with_flagged"]} images with flagged tokens): '
            f'replacing them by the mean of the other patch tokens changes the predicted-class logit by '
            f'{_pm(causal["sinks"])}, as many random background tokens by {_pm(causal["random"])} (difference '
            f'{_pm(causal["difference"])}); accuracy {fmt(acc["intact"], "percent")} intact, '
            f'{fmt(acc["sinks"], "percent")} and {fmt(acc["random"], "percent")} after.')
    elif causal.get('omitted'):
        sentences.append(f'No causal check: {causal["omitted"]}.')
    return sentences


def sink_table(sinks: Mapping) -> Tuple[List[str], List[List[str]]]:
    """Per layer: flagged tokens, their norm, the sink (and register) share, where they lie, fg_lift with and without."""
    layers = sinks['layers']
    registers = 'register_share' in layers[0]
    masks = 'fg_lift' in layers[0]
    header = ['layer', 'flagged tokens', 'norm / median', 'sink share'] + (['register share'] if registers else []) \
        + (['flagged on background', 'fg_lift', 'fg_lift without flagged'] if masks else [])
    rows = []
    for i, layer in enumerate(layers):
        row = [str(i + 1), fmt(layer['flagged_share']['mean'], 'percent'), fmt(layer['norm_ratio']['mean'], digits=1),
               _pm(layer['sink_share'], 'percent')]
        if registers:
            row.append(_pm(layer['register_share'], 'percent'))
        if masks:
            row += [fmt(layer['flagged_on_background'], 'percent'), _pm(layer['fg_lift']), _pm(layer['fg_lift_without'])]
        rows.append(row)
    return header, rows
