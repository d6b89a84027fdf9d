"""Tests of analysis.render.explorer (the report's attention explorer: packing, errors, budget) and its section of the page.

The explorer in a real browser: tests/test_explorer_browser.py.
"""
import base64
import json
import math
import random
import re
import zlib

import pytest
import torch
from test_report import make_run

from analysis.maps.attention_metrics import attention_entropy
from analysis.maps.extract import FullMapSlots
from analysis.maps.rollout import attention_rollout
from analysis.maps.summary import SUMMARY_FORMAT, SUMMARY_VERSION
from analysis.modeling.tokens import TokenLayout
from analysis.render import explorer, report
from analysis.render.figures import render_figures
from conftest import save_summary

# 6 images, 2 layers, 2 heads; a 3 x 2 grid of 4 px patches (not square, so rows and columns cannot swap).
M, L, H = 6, 2, 2
LAYOUT = TokenLayout(num_prefix_tokens=1, grid_size=(3, 2), patch_size=(4, 4))
P, N = LAYOUT.num_patches, LAYOUT.num_tokens
FULL = [1, 4, 5]  # the images with full maps
CLASS_NAMES = ['daisy', '<img src=x onerror=alert(1)>', 'tulip']


def peaked_maps(*shape, generator):
    """Softmax rows from logits of spread 4: peaked, with many small values (as trained maps have)."""
    return torch.softmax(4 * torch.randn(*shape, generator=generator), dim=-1)


def write_full_summary(path, with_crops=True, with_indices=True):
    g = torch.Generator().manual_seed(0)
    full = peaked_maps(len(FULL), L, H, N, N, generator=g).half()  # [K, L, H, N, N]
    cls_attention = peaked_maps(M, L, H, P, generator=g)
    cls_attention[FULL] = LAYOUT.cls_to_patches(full.float())  # the summary's CLS rows are those of the maps
    rollout = torch.rand(M, P, generator=g)
    rollout[FULL] = LAYOUT.cls_to_patches(attention_rollout(list(full.float().unbind(1)), layout=LAYOUT))
    tensors = {
        'labels': torch.tensor([0, 1, 2, 0, 1, 2]), 'predictions': torch.tensor([0, 1, 1, 0, 2, 2]),
        'cls_attention': cls_attention.half(), 'rollout': rollout.half(),
        'fg_fraction': torch.rand(M, P, generator=g).half(), 'full_attention': full,
        'example_indices': torch.tensor([0, 4]),
        'example_images': torch.randint(0, 255, (2, 12, 8, 3), dtype=torch.uint8, generator=g),
    }
    if with_indices:
        tensors['full_indices'] = torch.tensor(FULL)
    if with_crops:
        tensors['full_images'] = torch.randint(0, 255, (len(FULL), 12, 8, 3), dtype=torch.uint8, generator=g)
    meta = {'format': SUMMARY_FORMAT, 'version': SUMMARY_VERSION, 'model_id': 'm', 'class_names': CLASS_NAMES,
            'num_layers': L, 'num_heads': H, 'layout': LAYOUT.to_dict(), 'image_size': [12, 8], 'has_masks': True,
            'dataset': 'd', 'split': 'test', 'num_images': M}
    save_summary(path, tensors, meta)
    return tensors


def codes(blob: str, *shape, levels=255) -> torch.Tensor:
    """The stored codes, decoded here independently of explorer.decode."""
    raw = zlib.decompress(base64.b64decode(blob))
    if levels <= 15:
        raw = bytes(half for byte in raw for half in (byte >> 4, byte & 15))
    return torch.tensor(list(raw[:math.prod(shape)]), dtype=torch.uint8).reshape(*shape)


# ----------------------------------------------------------------------------- encoding

@pytest.mark.parametrize('levels', explorer.LEVELS)
def test_decoded_values_are_within_the_mu_law_bound(levels):
    g = torch.Generator().manual_seed(1)
    rows = torch.cat([peaked_maps(200, 64, generator=g), torch.rand(200, 64, generator=g)])  # [400, 64]
    x = rows / rows.amax(dim=-1, keepdim=True)
    decoded = explorer.decoded(explorer.quantise(rows, levels), levels)
    step = math.exp(math.log1p(explorer.MU) / (2 * levels)) - 1
    assert ((decoded - x.double()).abs() <= (x.double() + 1 / explorer.MU) * step + 1e-12).all()
    # the largest value of each row decodes to exactly 1 (the colours are scaled to it)
    torch.testing.assert_close(decoded.amax(dim=-1), torch.ones(400, dtype=torch.float64), rtol=0, atol=1e-12)


def test_mu_law_keeps_the_entropy_of_peaked_maps_where_linear_codes_lose_it():
    rows = peaked_maps(500, 64, generator=torch.Generator().manual_seed(2))
    truth = attention_entropy(rows)
    ours = attention_entropy(explorer.decoded_shares(explorer.quantise(rows, 255), 255))
    linear = torch.round(255 * rows / rows.amax(dim=-1, keepdim=True))
    assert (ours - truth).abs().max() < 0.005
    assert (attention_entropy(linear) - truth).abs().max() > 0.02  # why the codes are not linear


@pytest.mark.parametrize('levels', explorer.LEVELS)
def test_encode_stores_the_codes_and_packs_4_bit_ones_two_to_a_byte(levels):
    q = torch.randint(0, levels + 1, (7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    blob = explorer.encode(q, levels)
    assert torch.equal(codes(blob, 7, 5, levels=levels), q)
    assert torch.equal(explorer.decode(blob, levels, 35), q.flatten())
    raw = zlib.decompress(base64.b64decode(blob))
    assert len(raw) == (18 if levels <= 15 else 35)  # 35 codes: 17 full bytes and a half one
    if levels <= 15:
        assert raw[0] == q.flatten()[0] * 16 + q.flatten()[1]


def test_a_row_of_zeros_decodes_to_zero_shares():
    q = explorer.quantise(torch.zeros(2, 5), 255)
    assert torch.equal(explorer.decoded_shares(q, 255), torch.zeros(2, 5, dtype=torch.float64))


# ----------------------------------------------------------------------------- which images

def chosen_by_rule(correct, capacity):
    """The documented choice, written the slow way: the first half correct, the first half wrong, then fill."""
    right = [i for i, c in enumerate(correct) if c]
    wrong = [i for i, c in enumerate(correct) if not c]
    n_wrong = min(capacity // 2, len(wrong))
    n_right = min(capacity - n_wrong, len(right))
    n_wrong = min(capacity - n_right, len(wrong))
    return sorted(right[:n_right] + wrong[:n_wrong])


def test_full_map_slots_take_correct_and_wrong_predictions_as_documented():
    rng = random.Random(0)
    for trial in range(300):
        correct = [rng.random() < rng.choice([0.05, 0.5, 0.95]) for _ in range(rng.randint(0, 30))]
        capacity = rng.randint(0, 9)
        slots = FullMapSlots(capacity)
        for i, c in enumerate(correct):
            slots.slot_for(i, c)
        assert [slots.taken[s][0] for s in slots.order()] == chosen_by_rule(correct, capacity), (correct, capacity)
    slots = FullMapSlots(4)  # first images all correct: wrong ones still get their half
    for i, c in enumerate([True] * 6 + [False] * 3):
        slots.slot_for(i, c)
    assert sorted(i for i, _ in slots.taken) == [0, 1, 6, 7]


# ----------------------------------------------------------------------------- packing

def test_explorer_data_packs_each_image_with_its_own_rows(tmp_path):
    path = tmp_path / 'attentions.safetensors'
    tensors = write_full_summary(path)
    packed = explorer.explorer_data(path)
    data = packed['data']
    assert [image['index'] for image in data['images']] == FULL
    assert packed['images'][0] == '#1: <img src=x onerror=alert(1)>, predicted <img src=x onerror=alert(1)> \u2713'
    assert packed['images'][1].endswith('predicted tulip \u2717')
    assert data['grid'] == [3, 2] and data['levels'] == {'cls': 255, 'rollout': 255, 'mean': 255, 'heads': 255}
    full = tensors['full_attention'].float()
    for k, index in enumerate(FULL):
        image = data['images'][k]
        assert image['fg'] == tensors['fg_fraction'][index].float().tolist()
        assert torch.equal(codes(image['cls'], L, H, P), explorer.quantise(tensors['cls_attention'][index], 255))
        rows = explorer.query_rows(full[k], LAYOUT)  # [L, H, Q, P]
        assert torch.equal(codes(image['mean'], L, 1 + P, P), explorer.quantise(rows.mean(dim=1), 255))
        assert torch.equal(codes(image['heads'], L, H, P, P), explorer.quantise(rows[:, :, 1:], 255))
        roll = explorer.query_rows(attention_rollout(list(full[k:k + 1].unbind(1)), layout=LAYOUT)[0], LAYOUT)
        assert torch.equal(codes(image['rollout'], 1 + P, P), explorer.quantise(roll, 255))
        assert image['src'].startswith('data:image/jpeg;base64,')


def test_stated_errors_bound_the_numbers_against_the_summary_rows(tmp_path):
    path = tmp_path / 'attentions.safetensors'
    tensors = write_full_summary(path)
    packed = explorer.explorer_data(path)
    errors = {tier['name']: tier['errors'] for tier in packed['tiers']}
    assert errors['cls']['entropy'] > 0 and errors['cls']['fg_ratio'] > 0  # the codes are not exact
    for k, index in enumerate(FULL):
        q = codes(packed['data']['images'][k]['cls'], L, H, P)
        ours = explorer.row_numbers(explorer.decoded_shares(q, 255), tensors['fg_fraction'][index].float())
        theirs = explorer.row_numbers(tensors['cls_attention'][index], tensors['fg_fraction'][index].float())
        for name in ('entropy', 'fg_ratio', 'share'):
            assert (ours[name].double() - theirs[name].double()).abs().max() <= errors['cls'][name]
        # rollout, CLS query: measured against the summary's own rollout row
        q = codes(packed['data']['images'][k]['rollout'], 1 + P, P)[0]
        gap = attention_entropy(explorer.decoded_shares(q, 255)) - attention_entropy(tensors['rollout'][index])
        assert abs(float(gap)) <= errors['rollout']['entropy']


def test_a_small_budget_stores_fewer_bits_then_leaves_single_heads_out(tmp_path):
    path = tmp_path / 'attentions.safetensors'
    write_full_summary(path)
    full = explorer.explorer_data(path)
    heads = next(t for t in full['tiers'] if t['name'] == 'heads')
    assert heads['bits'] == 8
    smaller = explorer.explorer_data(path, max_bytes=full['bytes'] - heads['bytes'] // 3)
    tiers = {t['name']: t for t in smaller['tiers']}
    assert tiers['mean']['bits'] == 8 and 4 <= tiers['heads']['bits'] < 8
    assert smaller['bytes'] <= smaller['max_bytes']
    assert tiers['heads']['errors']['entropy'] > heads['errors']['entropy']  # fewer bits, larger stated error
    tiny = explorer.explorer_data(path, max_bytes=full['bytes'] - heads['bytes'])
    tiers = {t['name']: t for t in tiny['tiers']}
    assert tiers['heads']['bits'] is None and 'heads' not in tiny['data']['levels']
    assert 'heads' not in tiny['data']['images'][0] and tiny['bytes'] <= tiny['max_bytes']


def test_older_summaries_without_indices_or_crops_use_the_first_images_and_example_crops(tmp_path):
    path = tmp_path / 'attentions.safetensors'
    write_full_summary(path, with_crops=False, with_indices=False)
    images = explorer.explorer_data(path)['data']['images']
    assert [image['index'] for image in images] == [0, 1, 2]
    assert [image['src'] is not None for image in images] == [True, False, False]  # image 0 is an example


# ----------------------------------------------------------------------------- the page

def explorer_json(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def test_report_has_the_explorer_with_its_stable_hooks_and_escapes_class_names(tmp_path):
    run = make_run(tmp_path)
    write_full_summary(run / 'attentions.safetensors')
    page = report.write_report(run, render_figures(run)).read_text()
    for hook in ('<section id="explorer">', '<select id="explorer-image">', '<select id="explorer-layer">',
                 '<select id="explorer-head">', '<canvas id="explorer-canvas"', 'id="explorer-readout"'):
        assert hook in page
    assert '<img src=x' not in page and 'onerror=alert(1)&gt;, predicted' in page  # option text, escaped
    data = explorer_json(page)
    assert data['images'][0]['title'].startswith('#1: <img src=x')  # the JSON holds it as \u003c, parsed back
    assert '"#1: \\u003cimg' in page
    assert explorer.template_text(explorer.SCRIPT) in page  # inlined as it is, not HTML-escaped
    assert '<div id="explorer-ui" hidden>' in page and '<noscript>' in page  # without JavaScript: a note
    assert 'src="http' not in page and '<link' not in page  # still one self-contained file
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 6  # the static figures are unchanged


def test_report_without_full_maps_says_how_to_get_the_explorer(tmp_path):
    run = make_run(tmp_path)
    page = report.write_report(run, render_figures(run)).read_text()
    assert '<section id="explorer">' in page and 'explorer-data' not in page and 'DecompressionStream' not in page
    assert f'run python -m analysis extract --model {run} --full_maps 8' in page
