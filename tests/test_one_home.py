"""One home per name: the output directory's file names live in `analysis.core.run_files` only, and no two
modules of the package define the same public top-level name."""
import ast
import re
from collections import defaultdict
from pathlib import Path

from analysis.core import run_files

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / 'analysis').rglob('*.py'), *(ROOT / 'data_scripts').rglob('*.py'), ROOT / 'train_hf.py'])
OUTPUT_NAMES = {value for name, value in vars(run_files).items()
                if name.endswith(('_FILE', '_DIR')) and isinstance(value, str)}


def quoted_output_names(path: Path):
    """``(line, string)`` of every string constant that is an output name, or a path inside ``figures/``."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in OUTPUT_NAMES or re.search(r'(^|[\s(/])figures/', node.value):
                found.append((node.lineno, node.value))
    return found


def test_output_file_names_are_quoted_only_in_run_files():
    assert {'config.json', 'model.safetensors', 'run_config.json', 'figures', 'seeds.json'} <= OUTPUT_NAMES
    outside = {f'{path.relative_to(ROOT)}:{line}': value for path in SOURCES if path.name != 'run_files.py'
               for line, value in quoted_output_names(path)}
    assert outside == {}, 'use the names of analysis.core.run_files'


def test_the_check_finds_a_planted_quoted_name(tmp_path):
    planted = tmp_path / 'm.py'
    planted.write_text("def f(d):\n    return d / 'all_results.json', f'![x](figures/{d})', 'all_results.json is missing'\n")
    assert sorted(quoted_output_names(planted)) == [(2, '![x](figures/'), (2, 'all_results.json')]


def test_no_two_modules_define_the_same_name():
    homes = defaultdict(list)
    for path in sorted((ROOT / 'analysis').rglob('*.py')):
        for node in ast.parse(path.read_text()).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
                t.id for t in getattr(node, 'targets', []) if isinstance(t, ast.Name) and t.id.isupper()]
            for name in names:
                homes[name].append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in homes.items() if len(paths) > 1 and not name.startswith('_')}
    assert shared == {}
