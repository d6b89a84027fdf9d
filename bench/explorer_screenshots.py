"""Screenshots of the report's attention explorer, in Debian's headless Chromium (issue 11 acceptance).

Opens ``RUN/report.html`` (its summary must hold full maps: ``extract --full_maps 8``) from the file and
saves three pictures of the explorer section: the CLS token at layer 2 (head mean), one head of the last
layer (CLS token), and a clicked patch (the patch most covered by the flower, else the middle one) at the
last layer, head mean. Prints the readout of each, so that the pictures can be checked against it.

    python bench/explorer_screenshots.py outputs/synthetic_demo --out shots [--image 0] [--head 1]

Needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver) and selenium;
downloads nothing.
"""
import argparse
import json
import os
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
CLICK = """
const canvas = document.getElementById('explorer-canvas'), box = canvas.getBoundingClientRect();
const [rows, cols] = arguments[1], row = Math.floor(arguments[0] / cols), col = arguments[0] % cols;
canvas.dispatchEvent(new MouseEvent('click', {bubbles: true, clientX: box.left + (col + 0.5) * box.width / cols,
                                              clientY: box.top + (row + 0.5) * box.height / rows}));
"""


def draws(driver) -> int:
    return int(driver.find_element('id', 'explorer').get_attribute('data-draws') or 0)


def then_wait(driver, action) -> None:
    before = draws(driver)
    action()
    WebDriverWait(driver, 30).until(lambda d: draws(d) > before)


def choose(driver, select_id: str, value: str) -> None:
    select = driver.find_element('id', select_id)
    if select.get_attribute('value') != value:
        then_wait(driver, lambda: Select(select).select_by_value(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('run', type=Path, help='a run directory whose report.html has the explorer')
    parser.add_argument('--out', type=Path, required=True, help='folder for the PNG files')
    parser.add_argument('--image', type=int, default=0, help='which explorer image (0-based)')
    parser.add_argument('--head', type=int, default=1, help='the head of the last layer to show (1-based)')
    args = parser.parse_args()
    report = (args.run / 'report.html').resolve()
    if not report.is_file():
        raise SystemExit(f'error: no {report}; run python -m analysis report {args.run}')
    args.out.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1300,1600'):
        options.add_argument(argument)
    os.environ['SE_OFFLINE'] = 'true'
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(report.as_uri())
        WebDriverWait(driver, 60).until(lambda d: draws(d) > 0)
        data = json.loads(driver.find_element('id', 'explorer-data').get_attribute('textContent'))
        image = data['images'][args.image]
        last = str(data['layers'] - 1)
        section = driver.find_element('id', 'explorer')
        driver.execute_script('arguments[0].scrollIntoView()', section)

        def shot(name: str) -> None:
            path = args.out / f'{name}.png'
            section.screenshot(str(path))
            print(f'{path}: {driver.find_element("id", "explorer-readout").text!r}')

        choose(driver, 'explorer-image', str(args.image))
        choose(driver, 'explorer-head', 'mean')
        choose(driver, 'explorer-layer', '1')
        shot('cls_layer2')
        choose(driver, 'explorer-layer', last)
        choose(driver, 'explorer-head', str(args.head - 1))
        shot(f'cls_layer{data["layers"]}_head{args.head}')
        choose(driver, 'explorer-head', 'mean')
        fg, num_patches = image.get('fg'), data['grid'][0] * data['grid'][1]
        patch = max(range(num_patches), key=fg.__getitem__) if fg else num_patches // 2
        then_wait(driver, lambda: driver.execute_script(CLICK, patch, data['grid']))
        shot(f'patch{patch}_layer{data["layers"]}')
    finally:
        driver.quit()


if __name__ == '__main__':
    main()
