"""The report's attention explorer in a real browser: Debian's Chromium driven by selenium, from the file.

The report is that of a tiny real run (`tiny_run`), extracted again with ``--full_maps 8`` and with one
class renamed to markup; two more reports of the same summary store every tier at 4 bits (two codes
to a byte) and leave out the single heads of patch queries (the size budget), as a ViT-B/16 report
does. The numbers the page shows are compared with those of `analysis.maps.attention_metrics` on the
summary's own rows, within the quantisation error that the page states. No browser is downloaded:
the tests use ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (``apt-get install chromium
chromium-driver``; .ci/run installs them), given to selenium by path so that selenium-manager never runs.
Without them the tests fail, saying what to install; they skip, saying why, only where the person running
them opts out with ``FLOWER_VIT_LENS_SKIP_BROWSER_TESTS=1`` (never set in CI).
"""
import importlib.util
import itertools
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from analysis.cli import main as cli
from analysis.maps.attention_metrics import attention_entropy, fg_ratio
from analysis.maps.rollout import attention_rollout
from analysis.maps.summary import load_summary
from analysis.modeling.tokens import TokenLayout
from analysis.render import explorer
from analysis.render.figures import render_figures
from analysis.render.report import write_report
from conftest import save_summary

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
OPT_OUT = 'FLOWER_VIT_LENS_SKIP_BROWSER_TESTS'  # =1: skip where no browser can be installed
EVIL_CLASS = '<img src=x onerror=alert(1)>'
OUTLINE_RGB = [0, 229, 255]  # explorer.js outlines the clicked patch in #00e5ff
FLAGGED_RGB = [255, 43, 214]  # and the high-norm tokens of the layer, dashed, in #ff2bd6


def _missing_browser() -> str:
    if importlib.util.find_spec('selenium') is None:
        return 'selenium is not installed (pip install -e ".[dev]")'
    for path, package in ((CHROMIUM, 'chromium'), (CHROMEDRIVER, 'chromium-driver')):
        if not os.access(path, os.X_OK):
            return f'no {path} (apt-get install {package}; .ci/run installs it)'
    return ''


def peak_patch(k: int, layer: int, query: int, num_patches: int) -> int:
    """The patch that every head of row (image k, layer, query) of the planted maps attends to most."""
    return (3 * k + 5 * layer + 11 * query) % num_patches


def plant_peaked_maps(tensors, layout: TokenLayout) -> None:
    """Replaces the full maps of the explorer's images by peaked ones, and their CLS rows and rollout to match.

    Each row puts most of its mass on `peak_patch`, which differs between images, layers and queries;
    head h peaks more or less sharply (its entropy differs) and adds a small peak of its own. A barely
    trained model's maps are near uniform: a row read with the wrong stride differs from the right one
    by less than the stated quantisation error, and no number check could tell them apart.
    """
    K, L, H, N, _ = tensors['full_attention'].shape  # [K, L, H, N, N]
    P, prefix = layout.num_patches, layout.num_prefix_tokens
    logits = torch.randn(K, L, H, N, N, generator=torch.Generator().manual_seed(0)) * 0.3
    for k, layer, head, query in itertools.product(range(K), range(L), range(H), range(N)):
        peak = peak_patch(k, layer, query, P)
        logits[k, layer, head, query, prefix + peak] += 5.0 + head
        logits[k, layer, head, query, prefix + (peak + 1 + head) % P] += 2.5
    tensors['full_attention'] = logits.softmax(dim=-1).to(tensors['full_attention'].dtype)
    full = tensors['full_attention'].float()
    for k, index in enumerate(tensors['full_indices'].tolist()):
        tensors['cls_attention'][index] = layout.cls_to_patches(full[k]).to(tensors['cls_attention'].dtype)
        tensors['rollout'][index] = layout.cls_to_patches(
            attention_rollout(list(full[k][None].unbind(1)), layout=layout))[0].to(tensors['rollout'].dtype)


def flagged_patch(k: int, layer: int, num_patches: int) -> int:
    """The one high-norm patch token planted in image k at layer (`plant_high_norm_tokens`)."""
    return (2 * k + 7 * layer + 1) % num_patches


def plant_high_norm_tokens(tensors, layout: TokenLayout) -> None:
    """Every token of the explorer's images has norm 1, except `flagged_patch`, with norm 50 (the only outlier)."""
    for k, index in enumerate(tensors['full_indices'].tolist()):
        norms = torch.ones_like(tensors['token_norms'][index])  # [L, N]
        for layer in range(norms.shape[0]):
            norms[layer, layout.num_prefix_tokens + flagged_patch(k, layer, layout.num_patches)] = 50.0
        tensors['token_norms'][index] = norms


@pytest.fixture(scope='module')
def page(tiny_run, tmp_path_factory):
    """The tiny run's report with 8 full-map images, and its summary and packed explorer data."""
    run, _ = tiny_run
    out = tmp_path_factory.mktemp('explorer') / 'run'
    out.mkdir()
    for name in ('all_results.json', 'config.json', 'model.safetensors', 'run_config.json'):
        shutil.copy(run / name, out / name)
    assert cli(['extract', '--model', str(out), '--full_maps', '8', '--batch_size', '8']) == 0
    path = out / 'attentions.safetensors'
    tensors, meta = load_summary(path)
    indices = tensors['full_indices'].tolist()
    meta['class_names'][int(tensors['labels'][indices[0]])] = EVIL_CLASS  # the first image shows it
    plant_peaked_maps(tensors, TokenLayout.from_dict(meta['layout']))
    plant_high_norm_tokens(tensors, TokenLayout.from_dict(meta['layout']))
    save_summary(path, tensors, meta)
    report = write_report(out, render_figures(out))
    packed = explorer.explorer_data(path)
    heads = next(t for t in packed['tiers'] if t['name'] == 'heads')
    variants = {}
    for name, setting in (('4 bits', ('LEVELS', (15,))), ('no heads', ('MAX_BYTES', packed['bytes'] - heads['bytes']))):
        folder = out.parent / name.replace(' ', '_')
        folder.mkdir()
        for file in ('all_results.json', 'attention_metrics.json', 'attentions.safetensors'):
            shutil.copy(out / file, folder / file)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(explorer, *setting)
            variants[name] = {'report': write_report(folder, render_figures(folder)), 'tensors': tensors, 'meta': meta,
                              'packed': explorer.explorer_data(path)}
    assert set(variants['4 bits']['packed']['data']['levels'].values()) == {15}
    assert 'heads' not in variants['no heads']['packed']['data']['levels']
    return {'report': report, 'tensors': tensors, 'meta': meta, 'packed': packed, 'variants': variants}


def _require_browser() -> None:
    """Fails where there is no browser, or skips where the person running the tests opted out."""
    reason = _missing_browser()
    if reason and os.environ.get(OPT_OUT) == '1':
        pytest.skip(f'no browser for the explorer tests ({OPT_OUT}=1): {reason}')
    if reason:
        pytest.fail(f'the explorer tests need a browser: {reason}; or set {OPT_OUT}=1 to skip them')


def test_a_missing_browser_fails_the_tests_unless_they_are_explicitly_skipped(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], 'CHROMEDRIVER', '/nonexistent/chromedriver')
    monkeypatch.delenv(OPT_OUT, raising=False)
    with pytest.raises(pytest.fail.Exception, match='chromium-driver'):
        _require_browser()
    monkeypatch.setenv(OPT_OUT, 'yes')  # only =1 opts out
    with pytest.raises(pytest.fail.Exception):
        _require_browser()
    monkeypatch.setenv(OPT_OUT, '1')
    with pytest.raises(pytest.skip.Exception, match='/nonexistent/chromedriver'):
        _require_browser()


@pytest.fixture(scope='module')
def browser():
    """Headless Chromium by selenium (before the page fixture: without a browser, nothing is built)."""
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                     '--window-size=1280,1400'):
        options.add_argument(argument)
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})

    def no_manager(*args, **kwargs):
        raise AssertionError('selenium-manager was asked for a browser or driver; give both paths')

    with pytest.MonkeyPatch.context() as env:
        env.setenv('SE_OFFLINE', 'true')  # selenium must not try to download a browser or a driver
        env.setattr(SeleniumManager, 'binary_paths', no_manager)  # it is not even asked
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, report: Path) -> None:
    """Shows ``report`` (unless it is shown already), once the explorer has drawn."""
    if driver.current_url != report.as_uri():
        driver.get(report.as_uri())
        _wait_for_draw(driver, 0)


def _draws(driver) -> int:
    return int(driver.find_element('id', 'explorer').get_attribute('data-draws') or 0)


def _wait_for_draw(driver, before: int) -> None:
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 20).until(lambda d: _draws(d) > before)


def _choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select
    select = driver.find_element('id', select_id)
    if select.get_attribute('value') == value:
        return  # no change event, no drawing
    before = _draws(driver)
    Select(select).select_by_value(value)
    _wait_for_draw(driver, before)


def _canvas(driver) -> str:
    return driver.execute_script("return document.getElementById('explorer-canvas').toDataURL()")


def _pixel(driver, x: int, y: int):
    return driver.execute_script(
        "return Array.from(document.getElementById('explorer-canvas').getContext('2d')"
        ".getImageData(arguments[0], arguments[1], 1, 1).data)", x, y)


def _geometry(driver, meta):
    layout = TokenLayout.from_dict(meta['layout'])
    width = driver.execute_script("return document.getElementById('explorer-canvas').width")
    scale = width // layout.image_size[1]
    return layout, layout.patch_size[0] * scale, layout.patch_size[1] * scale


def _click_patch(driver, meta, patch: int) -> None:
    """Clicks the middle of ``patch`` (row-major) on the canvas, wherever CSS put it."""
    from selenium.webdriver.common.action_chains import ActionChains
    layout, _, _ = _geometry(driver, meta)
    canvas = driver.find_element('id', 'explorer-canvas')
    box = canvas.rect  # CSS pixels
    row, col = divmod(patch, layout.grid_size[1])
    x = (col + 0.5) * box['width'] / layout.grid_size[1] - box['width'] / 2  # offsets from the centre
    y = (row + 0.5) * box['height'] / layout.grid_size[0] - box['height'] / 2
    before = _draws(driver)
    ActionChains(driver).move_to_element_with_offset(canvas, round(x), round(y)).click().perform()
    _wait_for_draw(driver, before)


def _readout(driver) -> dict:
    """The numbers the readout shows: ``{metric: (data-value, text)}`` and the query."""
    readout = driver.find_element('id', 'explorer-readout')
    shown = {span.get_attribute('data-metric'): (span.get_attribute('data-value'), span.text)
             for span in readout.find_elements('css selector', '[data-metric]')}
    shown['query'] = readout.find_element('css selector', '[data-query]').get_attribute('data-query')
    return shown


def _console_errors(driver) -> list:
    return [entry for entry in driver.get_log('browser') if entry['level'] == 'SEVERE']


def _python_row(page, k: int, layer, head, query: int) -> torch.Tensor:
    """The summary's own attention row for explorer image ``k``: what the page's numbers must match."""
    tensors, layout = page['tensors'], TokenLayout.from_dict(page['meta']['layout'])
    index = int(tensors['full_indices'][k])
    full = tensors['full_attention'][k].float()  # [L, H, N, N]
    if query == 0:  # the CLS rows are in the summary itself
        if layer == 'rollout':
            return tensors['rollout'][index].float()
        rows = tensors['cls_attention'][index, layer].float()  # [H, P]
        return rows.mean(dim=0) if head == 'mean' else rows[head]
    if layer == 'rollout':
        return layout.patches_to_patches(attention_rollout(list(full[None].unbind(1)), layout=layout))[0, query - 1]
    rows = layout.patches_to_patches(full[layer])[:, query - 1]  # [H, P]
    return rows.mean(dim=0) if head == 'mean' else rows[head]


def _tier(layer, head, query: int) -> str:
    if layer == 'rollout':
        return 'rollout'
    return 'mean' if head == 'mean' else ('cls' if query == 0 else 'heads')


def _check_numbers(driver, page, k: int, layer, head, query: int) -> None:
    shown = _readout(driver)
    assert shown['query'] == ('cls' if query == 0 else str(query - 1))
    row = _python_row(page, k, layer, head, query)
    fg = page['tensors']['fg_fraction'][int(page['tensors']['full_indices'][k])].float()
    expected = {'entropy': float(attention_entropy(row)), 'fg_ratio': float(fg_ratio(row[None], fg[None])[0])}
    errors = next(t['errors'] for t in page['packed']['tiers'] if t['name'] == _tier(layer, head, query))
    for name, value in expected.items():
        exact, text = float(shown[name][0]), float(shown[name][1])
        assert abs(exact - value) <= errors[name] + 1e-6, (name, exact, value, errors[name])
        assert abs(text - value) <= errors[name] + 5e-4 + 1e-9, (name, text, value)  # shown with 3 decimals
    top = int(shown['top'][0])
    if layer == 'rollout':  # a product of layers that peak in different places: near ties may swap
        share = row / row.sum()
        assert share[top] >= share.max() - 2 * errors['share'], (top, int(share.argmax()))
    else:  # the planted maps are peaked: exactly the planted patch
        assert top == int(row.argmax()) == peak_patch(k, layer, query, len(row)), (top, int(row.argmax()))


def test_layer_head_and_image_change_the_canvas_and_the_numbers(browser, page):
    _open(browser, page['report'])
    _choose(browser, 'explorer-image', '0')
    _choose(browser, 'explorer-layer', '0')
    _choose(browser, 'explorer-head', 'mean')
    seen = [_canvas(browser)]
    state = {'explorer-image': 0, 'explorer-layer': 0, 'explorer-head': 'mean'}
    for select_id, value in (('explorer-layer', '1'), ('explorer-head', '2'), ('explorer-image', '1'),
                             ('explorer-layer', 'rollout')):
        _choose(browser, select_id, value)
        seen.append(_canvas(browser))
        assert seen[-1] != seen[-2], f'{select_id} = {value} left the canvas as it was'
        state[select_id] = value if value in ('mean', 'rollout') else int(value)
        _check_numbers(browser, page, state['explorer-image'], state['explorer-layer'], state['explorer-head'], 0)
    assert _console_errors(browser) == []


def test_clicking_a_patch_shows_its_row_outlined_and_a_second_click_goes_back_to_cls(browser, page):
    _open(browser, page['report'])
    _choose(browser, 'explorer-image', '0')
    _choose(browser, 'explorer-layer', '1')
    _choose(browser, 'explorer-head', 'mean')
    assert _readout(browser)['query'] == 'cls'
    cls_canvas = _canvas(browser)
    layout, cell_h, cell_w = _geometry(browser, page['meta'])
    patch = layout.num_patches - 2  # last row, second to last column
    _click_patch(browser, page['meta'], patch)
    assert _readout(browser)['query'] == str(patch)
    assert 'patch row 4, column 3' in browser.find_element('id', 'explorer-readout').text
    assert _canvas(browser) != cls_canvas
    row, col = divmod(patch, layout.grid_size[1])
    assert _pixel(browser, col * cell_w + 1, row * cell_h + cell_h // 2)[:3] == OUTLINE_RGB  # its left edge
    assert _pixel(browser, col * cell_w + cell_w // 2, row * cell_h + cell_h // 2)[:3] != OUTLINE_RGB
    _check_numbers(browser, page, 0, 1, 'mean', 1 + patch)
    _click_patch(browser, page['meta'], patch)
    assert _readout(browser)['query'] == 'cls'
    assert _console_errors(browser) == []


@pytest.mark.parametrize('k, layer', [(0, 0), (2, 1)])
def test_the_high_norm_tokens_of_the_shown_layer_are_outlined_and_listed(browser, page, k, layer):
    _open(browser, page['report'])
    _show(browser, page['meta'], k, layer, 'mean', None)
    layout, cell_h, cell_w = _geometry(browser, page['meta'])
    flagged = flagged_patch(k, layer, layout.num_patches)
    shown = _readout(browser)['flagged']
    assert shown[0] == '1'
    row, col = divmod(flagged, layout.grid_size[1])
    assert shown[1].startswith(f'row {row + 1}, column {col + 1}; share ')
    assert _pixel(browser, col * cell_w + 2, row * cell_h + 1)[:3] == FLAGGED_RGB  # the dashed outline's first dash
    other = flagged_patch(k, 1 - layer, layout.num_patches)  # flagged at the other layer only
    row, col = divmod(other, layout.grid_size[1])
    assert _pixel(browser, col * cell_w + 2, row * cell_h + 1)[:3] != FLAGGED_RGB
    _choose(browser, 'explorer-layer', 'rollout')
    assert 'flagged' not in _readout(browser)
    assert _console_errors(browser) == []


def _show(browser, meta, k: int, layer, head, patch) -> None:
    """Image ``k``, ``layer``, ``head`` and the CLS query, or a click on ``patch``."""
    _choose(browser, 'explorer-image', str(k))
    _choose(browser, 'explorer-layer', str(layer))
    if layer != 'rollout':
        _choose(browser, 'explorer-head', str(head))
    if _readout(browser)['query'] != 'cls':
        before = _draws(browser)
        browser.find_element('id', 'explorer-cls').click()
        _wait_for_draw(browser, before)
    if patch is not None:
        _click_patch(browser, meta, patch)


@pytest.mark.parametrize('k, layer, head, patch', [
    (0, 0, 'mean', None), (0, 1, 0, None), (1, 1, 2, None), (2, 'rollout', 'mean', None),
    (3, 0, 1, 5), (1, 'rollout', 'mean', 9), (4, 1, 'mean', 0),
])
def test_numbers_equal_the_summary_within_the_stated_error(browser, page, k, layer, head, patch):
    _open(browser, page['report'])
    _show(browser, page['meta'], k, layer, head, patch)
    _check_numbers(browser, page, k, layer, head, 0 if patch is None else 1 + patch)
    assert _console_errors(browser) == []


@pytest.mark.parametrize('k, layer, head, patch', [(0, 1, 2, None), (1, 0, 1, 3), (2, 'rollout', 'mean', 6),
                                                   (3, 1, 'mean', 10)])
def test_4_bit_codes_give_the_summary_numbers_within_their_larger_error(browser, page, k, layer, head, patch):
    variant = page['variants']['4 bits']
    _open(browser, variant['report'])
    _show(browser, page['meta'], k, layer, head, patch)
    _check_numbers(browser, variant, k, layer, head, 0 if patch is None else 1 + patch)
    assert _console_errors(browser) == []


def test_without_single_head_rows_a_patch_query_shows_the_head_mean_and_says_so(browser, page):
    variant = page['variants']['no heads']
    _open(browser, variant['report'])
    _show(browser, page['meta'], 0, 1, 2, None)
    _check_numbers(browser, variant, 0, 1, 2, 0)  # the CLS rows of single heads are there
    _click_patch(browser, page['meta'], 5)
    head = browser.find_element('id', 'explorer-head')
    disabled = [o.get_attribute('value') for o in head.find_elements('tag name', 'option') if not o.is_enabled()]
    assert head.get_attribute('value') == 'mean' and disabled == ['0', '1', '2']
    assert 'Single heads are stored for the CLS query only' in browser.find_element('id', 'explorer-readout').text
    _check_numbers(browser, variant, 0, 1, 'mean', 6)
    before = _draws(browser)
    browser.find_element('id', 'explorer-cls').click()
    _wait_for_draw(browser, before)
    assert all(o.is_enabled() for o in head.find_elements('tag name', 'option'))
    assert _console_errors(browser) == []


def test_arrow_keys_move_through_layers_and_heads(browser, page):
    _open(browser, page['report'])
    from selenium.webdriver.common.keys import Keys
    _choose(browser, 'explorer-layer', '0')
    _choose(browser, 'explorer-head', 'mean')
    canvas = browser.find_element('id', 'explorer-canvas')
    for key, select_id, value in ((Keys.ARROW_DOWN, 'explorer-layer', '1'), (Keys.ARROW_RIGHT, 'explorer-head', '0'),
                                  (Keys.ARROW_RIGHT, 'explorer-head', '1'), (Keys.ARROW_UP, 'explorer-layer', '0')):
        before = _draws(browser)
        canvas.send_keys(key)
        _wait_for_draw(browser, before)
        assert browser.find_element('id', select_id).get_attribute('value') == value
    assert _console_errors(browser) == []


def test_every_image_layer_and_head_draws_its_own_map(browser, page):
    _open(browser, page['report'])
    meta = page['meta']
    P = TokenLayout.from_dict(meta['layout']).num_patches
    for k in range(len(page['packed']['images'])):
        _choose(browser, 'explorer-image', str(k))
        for layer in [str(layer) for layer in range(meta['num_layers'])] + ['rollout']:
            _choose(browser, 'explorer-layer', layer)
            if layer != 'rollout':
                for head in ['mean'] + [str(h) for h in range(meta['num_heads'])]:
                    _choose(browser, 'explorer-head', head)
                    assert int(_readout(browser)['top'][0]) == peak_patch(k, int(layer), 0, P), (k, layer, head)
    assert _console_errors(browser) == []


def test_markup_in_class_names_is_shown_as_text(browser, page):
    _open(browser, page['report'])
    from selenium.common.exceptions import NoAlertPresentException
    _choose(browser, 'explorer-image', '0')
    option = browser.find_element('css selector', '#explorer-image option[value="0"]')
    assert EVIL_CLASS in option.text
    assert EVIL_CLASS in browser.find_element('id', 'explorer-readout').text
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert EVIL_CLASS not in Path(page['report']).read_text()  # escaped everywhere in the file
    assert _console_errors(browser) == []


def test_the_extraction_kept_correct_and_wrong_predictions_with_their_crops(page):
    tensors = page['tensors']
    indices = tensors['full_indices']
    correct = tensors['labels'][indices] == tensors['predictions'][indices]
    assert len(indices) == 8 and indices.tolist() == sorted(indices.tolist())
    all_right = int((tensors['labels'] == tensors['predictions']).sum())
    all_wrong = len(tensors['labels']) - all_right
    n_wrong = min(4, all_wrong)  # half and half, the other kind filling in where one runs short
    n_right = min(8 - n_wrong, all_right)
    assert (int(correct.sum()), int((~correct).sum())) == (n_right, min(8 - n_right, all_wrong))
    examples = dict(zip(tensors['example_indices'].tolist(), tensors['example_images']))
    shared = [k for k, i in enumerate(indices.tolist()) if i in examples]
    assert shared, 'no image is both an example and a full-map image'
    for k in shared:
        assert torch.equal(tensors['full_images'][k], examples[int(indices[k])])
