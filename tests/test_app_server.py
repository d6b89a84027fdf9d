"""The app served for real: `python -m analysis app` in a subprocess on 127.0.0.1, driven by Chromium and by 32
concurrent gradio_client clients."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from test_explorer_browser import browser  # noqa: F401 (the headless Chromium fixture)

CLIENTS, IMAGES_PER_CLIENT = 32, 4
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _status(pid: int, key: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM)."""
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))


@pytest.fixture(scope='module')
def server(tiny_run, tmp_path_factory):
    """The app of the tiny run on a free loopback port, stopped after the module's tests."""
    run, _ = tiny_run
    port = _free_port()
    log = tmp_path_factory.mktemp('app') / 'server.log'
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED='False')
    with open(log, 'w') as out:
        process = subprocess.Popen([sys.executable, '-m', 'analysis', 'app', '--model', str(run), '--port', str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f'http://127.0.0.1:{port}/'
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f'the app exited: {log.read_text()[-3000:]}'
            try:
                if urllib.request.urlopen(url, timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f'the app did not start in {START_TIMEOUT_S} s: {log.read_text()[-3000:]}'
            time.sleep(1)
        yield {'url': url, 'pid': process.pid, 'run': run, 'log': log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope='module')
def flowers(server, tmp_path_factory):
    """Eight flower images of the run's own dataset (its test split), as PNG files."""
    from analysis.app import run_examples
    folder = tmp_path_factory.mktemp('flowers')
    return [path for path, _ in run_examples(str(server['run']), folder, 8)]


def _pipeline_top(run, path):
    from transformers import pipeline
    classifier = pipeline('image-classification', model=str(run))
    return [(r['label'], r['score']) for r in classifier(str(path), top_k=5)]


def _predict(client, path):
    from gradio_client import handle_file
    label = client.predict(handle_file(str(path)), 'the predicted class', 1, 'mean', api_name='/analyse')[0]
    return [(c['label'], round(c['confidence'], 5)) for c in label['confidences']]


@pytest.mark.e2e
def test_32_clients_at_once_get_the_single_request_answers(server, flowers):
    from gradio_client import Client
    client = Client(server['url'], verbose=False, download_files=False)
    single = {path: _predict(client, path) for path in flowers}
    peak_after_first = _status(server['pid'], 'VmHWM')
    assert len({tuple(p) for p in single.values()}) > 1, 'the images should not all get the same answer'

    def one_client(k):
        c = Client(server['url'], verbose=False, download_files=False)
        paths = [flowers[(k + i) % len(flowers)] for i in range(IMAGES_PER_CLIENT)]
        return [(path, _predict(c, path)) for path in paths]

    began = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one_client, k) for k in range(CLIENTS)]
        answers = [f.result(timeout=600) for f in futures]  # any failure raises here
    seconds = time.perf_counter() - began
    wrong = [(path, got) for client_answers in answers for path, got in client_answers if got != single[path]]
    assert wrong == []
    assert sum(len(a) for a in answers) == CLIENTS * IMAGES_PER_CLIENT
    peak_after_load = _status(server['pid'], 'VmHWM')
    print(f'{CLIENTS * IMAGES_PER_CLIENT} requests from {CLIENTS} clients in {seconds:.1f} s '
          f'({CLIENTS * IMAGES_PER_CLIENT / seconds:.1f} requests/s); peak RSS {peak_after_first / 1024:.0f} MiB after the '
          f'first request, {peak_after_load / 1024:.0f} MiB after the load')
    assert peak_after_load <= 1.10 * peak_after_first


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _upload(driver, path):
    driver.find_element('css selector', '#photo input[type=file]').send_keys(str(path))


def _prediction(driver):
    """The top-5 the page shows: ``[(class, percent)]`` ('' while there is none)."""
    lines = driver.find_element('id', 'prediction').text.splitlines()[2:]  # the block's label, the top class
    return [(name, int(percent.rstrip('%'))) for name, percent in zip(lines[::2], lines[1::2])]


def _single_src(driver):
    images = driver.find_elements('css selector', '#single img')
    return images[0].get_attribute('src') if images else None


def _choose(driver, element_id, label):
    driver.find_element('css selector', f'#{element_id} input').click()
    option = _wait(driver, lambda d: next((o for o in d.find_elements('css selector', 'ul[role=listbox] li')
                                           if o.text == label), None), 10)
    option.click()


def _toasts(driver):
    return ' '.join(t.text for t in driver.find_elements('css selector', '[data-testid="toast-body"], .toast-body'))


def _remove_photo(driver):
    driver.find_element('css selector', '#photo button[aria-label="Remove Image"]').click()
    _wait(driver, lambda d: d.find_elements('css selector', '#photo input[type=file]'), 10)


def _shown_matches_pipeline(driver, run, path):
    expected = _pipeline_top(run, path)
    shown = _wait(driver, lambda d: _prediction(d) or None)
    assert [name for name, _ in shown] == [name for name, _ in expected]
    for (_, percent), (_, score) in zip(shown, expected):
        assert abs(percent - 100 * score) <= 0.5 + 1e-6


@pytest.mark.browser
@pytest.mark.e2e
def test_the_page_in_chromium(server, flowers, browser, tmp_path):
    """Upload, compare with pipeline; layer and head change the large map; a bad upload says why, the next one works."""
    driver = browser
    driver.get(server['url'])
    _wait(driver, lambda d: d.find_elements('css selector', '#photo input[type=file]'))
    _upload(driver, flowers[0])
    _shown_matches_pipeline(driver, server['run'], flowers[0])
    first = _wait(driver, _single_src)
    _choose(driver, 'layer', '1')
    after_layer = _wait(driver, lambda d: (_single_src(d) != first) and _single_src(d))
    _choose(driver, 'head', '2')
    _wait(driver, lambda d: _single_src(d) not in (first, after_layer))

    _remove_photo(driver)
    broken = tmp_path / 'broken.png'
    broken.write_text('not an image')
    _upload(driver, broken)
    _wait(driver, lambda d: 'broken.png is not a readable image' in _toasts(d))
    _remove_photo(driver)
    _upload(driver, flowers[1])
    _shown_matches_pipeline(driver, server['run'], flowers[1])
    raised = set(re.findall(r'^([A-Za-z_][\w.]*(?:Error|Exception)): ', server['log'].read_text(), flags=re.M))
    # the bad upload: PIL's error, as the UserError that says so, shown by the page as a gradio Error; nothing else
    assert raised == {'PIL.UnidentifiedImageError', 'data_scripts.errors.UserError', 'gradio.exceptions.Error'}, raised
    os.kill(server['pid'], 0)  # still serving


def _pixels(src):
    return np.asarray(Image.open(urllib.request.urlopen(src)))


@pytest.mark.browser
@pytest.mark.e2e
def test_two_pages_keep_their_own_maps(server, flowers, browser):
    """Page A analyses one image, page B another; A's layer change shows A's image, not the last one analysed."""
    driver = browser
    driver.get(server['url'])
    _wait(driver, lambda d: d.find_elements('css selector', '#photo input[type=file]'))
    page_a = driver.current_window_handle
    _upload(driver, flowers[2])
    last = _wait(driver, _single_src)  # layer 12
    _choose(driver, 'layer', '1')
    a_layer_1 = _wait(driver, lambda d: _single_src(d) != last and _single_src(d))
    driver.switch_to.new_window('tab')
    driver.get(server['url'])
    _wait(driver, lambda d: d.find_elements('css selector', '#photo input[type=file]'))
    _upload(driver, flowers[3])
    _wait(driver, _single_src)
    driver.close()
    driver.switch_to.window(page_a)
    _choose(driver, 'layer', '2')
    a_layer_2 = _wait(driver, lambda d: _single_src(d) != a_layer_1 and _single_src(d))
    _choose(driver, 'layer', '1')
    again = _wait(driver, lambda d: _single_src(d) != a_layer_2 and _single_src(d))
    np.testing.assert_array_equal(_pixels(again), _pixels(a_layer_1))


@pytest.mark.e2e
def test_push_with_a_space_writes_a_space_that_starts_from_a_clean_checkout_of_itself(server, flowers, tmp_path):
    """The dry run of ``push RUN --space``: the card links the Space; the Space folder, copied alone (git clone) next
    to a local Hub cache that holds the model, starts the app on the model by its repo id, offline."""
    from analysis.cli import main
    run = server['run']
    assert main(['push', str(run), '--repo_id', 'alice/flowers', '--space', 'alice/flowers-lens',
                 '--dry_run', str(tmp_path / 'dry')]) == 0
    model, space = tmp_path / 'dry' / 'model', tmp_path / 'dry' / 'space'
    assert '(https://huggingface.co/spaces/alice/flowers-lens)' in (model / 'README.md').read_text()
    assert {'app.py', 'requirements.txt', 'README.md', 'analysis', 'data_scripts'} <= {p.name for p in space.iterdir()}
    readme = (space / 'README.md').read_text()
    assert 'sdk: gradio' in readme and 'models:\n  - alice/flowers' in readme
    pins = dict(line.split('==') for line in (space / 'requirements.txt').read_text().split())
    import gradio
    import timm
    assert pins['timm'] == timm.__version__ and pins['gradio'] == gradio.__version__ and '+' not in pins['torch']

    checkout = tmp_path / 'checkout'  # a clean checkout of the Space: only what git tracks
    subprocess.run(['git', 'init', '-q', str(space)], check=True)
    subprocess.run(['git', '-C', str(space), 'add', '.'], check=True)
    subprocess.run(['git', '-C', str(space), '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'space'],
                   check=True)
    subprocess.run(['git', 'clone', '-q', str(space), str(checkout)], check=True)
    snapshot = tmp_path / 'hf' / 'hub' / 'models--alice--flowers' / 'snapshots' / ('0' * 40)
    shutil.copytree(model, snapshot)
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('0' * 40)
    port = _free_port()
    env = dict(os.environ, HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='1', GRADIO_ANALYTICS_ENABLED='False',
               GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME='127.0.0.1')
    env.pop('PYTHONPATH', None)
    log = tmp_path / 'space.log'
    with open(log, 'w') as out:
        process = subprocess.Popen([sys.executable, '-c', 'import runpy, analysis; print("package:", analysis.__file__, '
                                    'flush=True); runpy.run_path("app.py", run_name="__main__")'],
                                   cwd=checkout, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=5).status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        assert f'package: {checkout / "analysis" / "__init__.py"}' in log.read_text()  # the Space's own copy
        from gradio_client import Client
        client = Client(f'http://127.0.0.1:{port}/', verbose=False, download_files=False)
        assert _predict(client, flowers[0]) == _predict(Client(server['url'], verbose=False, download_files=False),
                                                        flowers[0])
    finally:
        process.terminate()
        process.wait(timeout=30)
