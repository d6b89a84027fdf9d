"""What the numbers say: the sentences, thresholds and number formats shared by the report and the card.

Every sentence here is plain text generated from the numbers of a run (``all_results.json``,
``attention_metrics.json``, ``background.json``, ``importance.json``); the HTML report escapes it
with Jinja, the model card with `analysis.card.md_escape`. Each threshold a sentence depends on is
defined here once, so the report and the card can never disagree. Layer and head numbers in the
text are 1-based.
"""
import math
from typing import List, Mapping, Optional, Sequence, Tuple

from data_scripts.synthetic_flowers import VARIANTS

from .attention_metrics import MASK_METRICS

# |bg_gap| from which the predictions count as following the background. Xiao et al. 2021 ("Noise or
# Signal") report BG-Gaps of roughly 0.1-0.2 for ImageNet models; 0.05 is well above the noise of a
# few hundred test images.
BG_GAP_THRESHOLD = 0.05
# "Class information appears" at the first layer whose probe reaches this share of the last one.
PROBE_SHARE = 0.9
# fg_lift above this favours the flower (uniform attention gives exactly 1).
NO_PREFERENCE_LIFT = 1.0
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


def summary_sentences(
        all_results: Mapping,
        metrics: Optional[Mapping] = None,
        background: Optional[Mapping] = None,
        importance: Optional[Mapping] = None,
) -> List[str]:
    """The sentences at the top of the report (and in the card), classification first.

    Args:
        all_results: parsed ``all_results.json``.
        metrics / background / importance: parsed ``attention_metrics.json``, ``background.json``,
            ``importance.json``, or None when that step was not run.
    """
    sentences = classification_sentences(all_results)
    if metrics is not None:
        sentences += attention_sentences(metrics)
    if background is not None:
        sentences += background_sentences(background)
    if importance is not None:
        sentences += importance_sentences(importance)
    return sentences

