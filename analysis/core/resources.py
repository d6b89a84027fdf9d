"""Files the package ships (package data): the card and report templates and the configs.

They are read with `importlib.resources`, so they are found in a wheel install as in the source
tree. ``analysis/render/templates/model_card.md`` and ``analysis/configs`` link to the top-level
``model_card.md`` and ``configs/``, where people look for them.
"""
from importlib import metadata, resources
from importlib.resources.abc import Traversable
from typing import Dict, List, Optional

import jinja2

from data_scripts.errors import MissingFileError

PACKAGE = 'analysis'  # configs/
TEMPLATES_PACKAGE = 'analysis.render'  # templates/: the report's and the card's


def template_text(name: str) -> str:
    """The text of ``templates/<name>``."""
    return resources.files(TEMPLATES_PACKAGE).joinpath('templates', name).read_text(encoding='utf-8')


def html_templates() -> jinja2.Environment:
    """Jinja environment over ``templates/`` that escapes every value put into HTML."""
    return jinja2.Environment(loader=jinja2.PackageLoader(TEMPLATES_PACKAGE, 'templates'), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def config_file(name: str) -> Traversable:
    """The packaged ``configs/<name>`` (``name`` with or without ``.json``).

    Raises:
        FileNotFoundError: no such packaged config (the message lists those that exist).
    """
    name = name if name.endswith('.json') else f'{name}.json'
    path = resources.files(PACKAGE).joinpath('configs', name)
    if not path.is_file():
        raise MissingFileError(f'no packaged config {name}; the package has {config_names()}')
    return path


def config_names() -> List[str]:
    """Names of the packaged configs."""
    return sorted(p.name for p in resources.files(PACKAGE).joinpath('configs').iterdir() if p.name.endswith('.json'))


# The distributions the package and its app run on (setup.cfg's install_requires without tensorboard, which only
# training logs use, plus the app's Gradio): their versions go into run_config.json, and a Space pins them.
RUNTIME_PACKAGES = ('torch', 'torchvision', 'timm', 'transformers', 'datasets', 'accelerate', 'huggingface_hub',
                    'safetensors', 'scikit-learn', 'scipy', 'matplotlib', 'pillow', 'numpy', 'tqdm', 'jinja2',
                    'filelock', 'gradio')


def runtime_versions() -> Dict[str, Optional[str]]:
    """``{distribution: installed version}`` of `RUNTIME_PACKAGES` (None where one is not installed)."""
    found = {}
    for name in RUNTIME_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
