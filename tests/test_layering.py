"""The import graph of the project: the layers declared in setup.cfg hold, and nothing forms a cycle.

The layers are written once, as import-linter's ``layers`` contract in setup.cfg; `lint-imports`
checks it (grimp reads every import statement, those inside functions included). These tests run
it, show that it catches a planted upward import, and check what a contract cannot: every module
lives in a declared layer, the README names every sub-package, and nothing imports in a cycle.
"""
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('analysis', 'data_scripts')
LINT_IMPORTS = [sys.executable, '-c', 'import sys; from importlinter.cli import lint_imports_command; '
                'sys.exit(lint_imports_command())', '--config', 'setup.cfg', '--no-cache']


def contract_layers():
    """The layers of setup.cfg's contract, top to bottom."""
    config = configparser.ConfigParser()
    config.read(ROOT / 'setup.cfg')
    return config['importlinter:contract:layers']['layers'].split()


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT_IMPORTS, cwd=root, capture_output=True, text=True, timeout=120,
                          env={'PATH': '', 'PYTHONPATH': str(root)})


@pytest.fixture(scope='module')
def graph():
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def test_the_layers_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0 and '1 kept, 0 broken' in result.stdout, result.stdout[-3000:] + result.stderr


def test_the_contract_catches_an_upward_import_inside_a_function(tmp_path):
    for name in (*PACKAGES, 'setup.cfg'):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    rollout = tmp_path / 'analysis' / 'maps' / 'rollout.py'
    rollout.write_text(rollout.read_text() + '\n\ndef planted():\n    from analysis.render import plots\n')
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and 'analysis.maps.rollout -> analysis.render.plots' in result.stdout, result.stdout


def test_every_module_lives_in_a_declared_layer(graph):
    layers = contract_layers()
    top_level = {'analysis', 'analysis.__main__'}  # the package itself and `python -m analysis`
    homeless = sorted(m for m in graph.modules
                      if m not in top_level and not any(m == layer or m.startswith(layer + '.') for layer in layers))
    assert homeless == [], 'place new modules in a sub-package of a layer (setup.cfg [importlinter:contract:layers])'


def test_the_readme_lists_every_sub_package_in_the_contracts_order():
    readme = (ROOT / 'README.md').read_text()
    listed = re.findall(r'^  ([a-z_]+)/ ', readme.split('## Layout')[1], flags=re.M)
    sub_packages = {p.parent.name for p in (ROOT / 'analysis').glob('*/__init__.py')}
    in_contract = [layer.split('.')[1] for layer in contract_layers() if layer.split('.')[-1] in sub_packages]
    assert listed == in_contract and set(listed) == sub_packages


def find_cycle(imports):
    """One cycle of ``{module: modules it imports}`` as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = 'open'
        for nxt in sorted(imports[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [nxt])
                if cycle:
                    return cycle
        state[node] = 'done'
        return None

    for node in sorted(imports):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_no_import_cycle(graph):
    # A package's __init__ re-exporting its modules is not a cycle of code; leave those edges out.
    imports = {m: {t for t in graph.find_modules_directly_imported_by(m) if not m.startswith(t + '.')}
               for m in graph.modules}
    cycle = find_cycle(imports)
    assert cycle is None, f'import cycle: {" -> ".join(cycle)}'


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


@pytest.mark.packaging
def test_every_module_imports_in_a_fresh_interpreter(graph):
    names = sorted(m for m in graph.modules if m != 'analysis.__main__') + ['train_hf']  # __main__ runs the CLI
    code = 'import importlib\nfor name in %r:\n    importlib.import_module(name)\nprint("ok")' % names
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]
