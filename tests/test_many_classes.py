"""Readable at many classes (Oxford-102): the most confused pairs, every class map (in pages), worst classes first;
fewer classes keep their outputs."""
import json
import re

import numpy as np
import torch
from safetensors.torch import save_file

from analysis.core.metrics import classification_metrics
from analysis.maps import summary
from analysis.modeling.tokens import TokenLayout
from analysis.render import card, figures, findings, report
from analysis.render.figures import render_figures
from tests.test_card import make_run_dir

C = 25  # classes: 2 pages of class maps (20 + 4: class 24 has no image)
LAYOUT = TokenLayout(num_prefix_tokens=1, grid_size=(2, 2), patch_size=(8, 8))
NAMES = [f'flower {c:02d}' for c in range(C)]


def many_class_results():
    """Class c has 4 test images (class 24 none); every class but a few is right 3 times out of 4."""
    labels, predictions = [], []
    for c in range(C - 1):
        labels += [c] * 4
        predictions += [c, c, c, (c + 1) % (C - 1)]
    predictions[4 * 7 + 2] = 9  # class 7 is taken for class 8 and for class 9
    predictions[4 * 3:4 * 3 + 3] = [5, 5, 5]  # class 3 is taken for class 5 three times (and once for 4): F1 0
    return classification_metrics(np.array(labels), np.array(predictions), NAMES), torch.tensor(labels), \
        torch.tensor(predictions)


def write_many_class_run(root):
    run = make_run_dir(root, figures=())
    scores, labels, predictions = many_class_results()
    (run / 'all_results.json').write_text(json.dumps({f'test_{k}': v for k, v in scores.items()} | {'test_split': 'test'}))
    (run / 'attention_metrics.json').unlink()
    g = torch.Generator().manual_seed(0)
    M = len(labels)
    tensors = {'labels': labels, 'predictions': predictions,
               'cls_attention': torch.softmax(torch.randn(M, 2, 2, LAYOUT.num_patches, generator=g), -1).half(),
               'rollout': torch.softmax(torch.randn(M, LAYOUT.num_patches, generator=g), -1).half()}
    meta = {'format': summary.SUMMARY_FORMAT, 'version': 1, 'model_id': 'tiny', 'class_names': NAMES, 'num_layers': 2,
            'num_heads': 2, 'layout': LAYOUT.to_dict(), 'image_size': [16, 16], 'has_masks': False, 'dataset': 'fake',
            'split': 'test', 'num_images': M}
    save_file(tensors, str(run / 'attentions.safetensors'), metadata={'analysis': json.dumps(meta)})
    return run


def test_confused_pairs_rank_by_images_then_share_of_the_true_class():
    results = {'test_class_names': ['a', 'b', 'c', 'd'], 'test_split': 'test',
               'test_confusion_matrix': [[5, 2, 0, 0],   # a -> b: 2 of 7
                                         [0, 2, 2, 0],   # b -> c: 2 of 4 (larger share: first among the 2s)
                                         [3, 0, 9, 1],   # c -> a: 3 of 13 (most images: first)
                                         [0, 0, 0, 4]]}
    assert findings.confused_pairs(results) == [('c', 'a', 3, 13), ('b', 'c', 2, 4), ('a', 'b', 2, 7), ('c', 'd', 1, 13)]
    assert findings.confused_pairs(results, top=2) == [('c', 'a', 3, 13), ('b', 'c', 2, 4)]
    header, rows = findings.confused_pairs_table(results, top=2)
    assert rows[1] == ['b', 'c', '2', '50.0% of 4']
    assert findings.confused_pairs_sentence(results, top=2) == ('The 2 most frequent confusions (true class taken for '
                                                                'another) account for 5 of the 8 misclassified test images.')
    perfect = dict(results, test_confusion_matrix=[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert findings.confused_pairs_table(perfect) is None and findings.confused_pairs_sentence(perfect) is None


def test_per_class_order_is_label_order_for_few_classes_and_worst_first_for_many():
    few = {'test_class_names': ['a', 'b', 'c'], 'test_f1_per_class': {'a': 0.9, 'b': 0.2, 'c': 0.5}}
    assert findings.per_class_order(few) == ['a', 'b', 'c'] and findings.per_class_order_note(few) is None
    scores, _, _ = many_class_results()
    many = {f'test_{k}': v for k, v in scores.items()}
    order = findings.per_class_order(many)
    f1 = [many['test_f1_per_class'][n] for n in order]
    assert sorted(order) == NAMES and f1 == sorted(f1)
    # F1 0 (ties in label order; class 24 has no images), then 5 (taken 3 times wrongly), then 7 (half right)
    assert order[:4] == ['flower 03', 'flower 24', 'flower 05', 'flower 07']
    assert findings.per_class_order_note(many) == '25 classes, sorted by F1, worst first.'


def test_class_map_pages_show_every_class_with_images():
    counts = torch.tensor([3] * 44 + [0])
    pages = figures.class_map_pages(counts)
    assert [name for name, _ in pages] == ['class_maps', 'class_maps_2', 'class_maps_3']
    assert [c for _, shown in pages for c in shown] == list(range(44))
    assert [len(shown) for _, shown in pages] == [15, 15, 14]  # at most MAX_CLASS_MAP_ROWS (20), balanced
    assert [len(shown) for _, shown in figures.class_map_pages(torch.ones(102))] == [17] * 6
    assert figures.class_map_pages(torch.tensor([2, 0, 1])) == [('class_maps', [0, 2])]  # one figure, as before


def test_report_and_card_at_many_classes(tmp_path):
    run = write_many_class_run(tmp_path / 'run')
    page = report.write_report(run, render_figures(run)).read_text()
    names = sorted(p.name for p in (run / 'figures').iterdir())
    assert names == ['class_maps.png', 'class_maps_2.png', 'confusion_matrix.png', 'f1_bars.png']
    for k, classes in ((1, '1-12'), (2, '13-24')):
        assert f'page {k} of 2: classes {classes} of the 24 with images' in page
    assert page.count('1 class without images in the summary') == 2 * 2  # image alt text and caption
    assert 'Every class with images is shown, in 2 pages of at most 20 classes' in page
    assert '<h3>Most confused class pairs</h3>' in page
    table = page.split('<h3>Most confused class pairs</h3>')[1].split('</table>')[0]
    assert re.findall(r'<tr><td>(.*?)</td><td>(.*?)</td><td>(\d+)</td>', table)[0] == ('flower 03', 'flower 05', '3')
    assert '25 classes, sorted by F1, worst first.' in page
    per_class = page.split('25 classes, sorted by F1, worst first.')[1].split('</table>')[0]
    assert re.findall(r'<tr><td>(.*?)</td>', per_class)[:4] == ['flower 03', 'flower 24', 'flower 05', 'flower 07']

    text = str(card.build_card(run))
    assert '### Most confused class pairs' in text and '| flower 03 | flower 05 | 3 | 75.0% of 4 |' in text
    assert '![Mean CLS attention per class, page 2](figures/class_maps_2.png)' in text
    rows = re.findall(r'^\| (flower \d\d) \| [\d.]+ \|', text, flags=re.M)
    assert rows[:4] == ['flower 03', 'flower 24', 'flower 05', 'flower 07']


def test_report_at_few_classes_keeps_one_class_map_figure_and_label_order(tmp_path):
    from tests.test_report import CLASS_NAMES, make_run
    run = make_run(tmp_path)
    page = report.write_report(run, render_figures(run)).read_text()
    assert not list((run / 'figures').glob('class_maps_*.png'))
    assert 'all 3 classes with images.' in page and 'page 1 of' not in page and 'Every class with images' not in page
    per_class = page.split('<th>support</th>')[1].split('</table>')[0]
    assert [html for html in re.findall(r'<tr><td>(.*?)</td>', per_class)] == \
        ['daisy', '&lt;script&gt;alert(1)&lt;/script&gt;', 'tulip']  # label order, as before
    assert 'sorted by F1' not in page
    assert 'Most confused class pairs' in page  # one misclassified image: 'tulip' taken for the second class
    assert CLASS_NAMES[2] in page.split('<h3>Most confused class pairs</h3>')[1].split('</table>')[0]
