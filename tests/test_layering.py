"""The import graph of the project: no cycles, and every import points down the layers of the README.

The graph is read from the source (an AST walk), so imports placed inside functions count too:
they cannot hide a cycle. A fresh interpreter then imports every module, one after the other.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom-up, as in the README's layout section. A module may import modules of its own layer or of
# the layers below it, never above.
LAYERS = [
    ('data', ['data_scripts', 'data_scripts.files', 'data_scripts.hub', 'data_scripts.errors',
              'data_scripts.hygiene', 'data_scripts.synthetic_flowers', 'data_scripts.synthetic_shapes',
              'data_scripts.oxford102', 'data_scripts.args',
              'data_scripts.loading', 'data_scripts.push']),
    ('model core', ['analysis', 'analysis.tokens', 'analysis.run_files', 'analysis.resources', 'analysis.metrics',
                    'analysis.modeling', 'analysis.transforms']),
    ('maps', ['analysis.rollout', 'analysis.attention_metrics', 'analysis.summary', 'analysis.extract',
              'analysis.attention_change']),
    ('studies', ['analysis.background', 'analysis.importance', 'analysis.faithfulness']),
    ('rendering and publishing', ['analysis.plots', 'analysis.findings', 'analysis.figures', 'analysis.explorer',
                                  'analysis.report', 'analysis.card', 'analysis.hub']),
    ('training job', ['analysis.training']),
    ('commands', ['analysis.study', 'analysis.compress', 'analysis.cli', 'analysis.__main__', 'train_hf']),
]
LAYER_OF = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
PACKAGES = ('analysis', 'data_scripts', 'train_hf')


def project_modules():
    """``{module name: path}`` of every project module."""
    modules = {'train_hf': ROOT / 'train_hf.py'}
    for package in ('analysis', 'data_scripts'):
        for path in sorted((ROOT / package).glob('*.py')):
            name = package if path.stem == '__init__' else f'{package}.{path.stem}'
            modules[name] = path
    return modules


def imports_of(name: str, path: Path):
    """Project modules that ``name`` imports anywhere in its file (functions included)."""
    package = name if path.stem == '__init__' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(parts + ([base] if base else []))
            found.add(base)
            found.update(f'{base}.{alias.name}' for alias in node.names)  # `from pkg import module`
    modules = project_modules()
    return {m for m in found if m in modules and m != name}


def find_cycle(graph):
    """One cycle of the graph as a list of nodes, or None."""
    state = {}

    def visit(node, stack):
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [nxt])
                if cycle:
                    return cycle
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


@pytest.fixture(scope='module')
def graph():
    return {name: imports_of(name, path) for name, path in project_modules().items()}


def test_every_module_has_a_layer(graph):
    assert sorted(set(graph) - set(LAYER_OF)) == [], 'place new modules in LAYERS (and the README layout)'
    assert sorted(set(LAYER_OF) - set(graph)) == [], 'LAYERS names modules that do not exist'


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, f'import cycle: {" -> ".join(find_cycle(graph))}'


def test_imports_point_down_the_layers(graph):
    upward = [f'{a} ({LAYERS[LAYER_OF[a]][0]}) imports {b} ({LAYERS[LAYER_OF[b]][0]})'
              for a, targets in graph.items() for b in targets if LAYER_OF[b] > LAYER_OF[a]]
    assert upward == []
    assert not [a for a, t in graph.items() if a.startswith('data_scripts') and any(b.startswith('analysis') for b in t)]


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_a_function_level_import_counts(tmp_path):
    path = tmp_path / 'm.py'
    path.write_text('def f():\n    from analysis import training\n    from . import report\n')
    assert imports_of('analysis.m', path) == {'analysis', 'analysis.training', 'analysis.report'}


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in project_modules() if n != 'analysis.__main__']  # __main__ runs the CLI
    code = 'import importlib\nfor name in %r:\n    importlib.import_module(name)\nprint("ok")' % names
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]
