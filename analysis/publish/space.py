"""A Hugging Face Space that runs this project's app (`analysis.app`) on a published model.

The Space folder holds:

    app.py             a few lines: the app of the model repo (`analysis.app.Lens`, `build_app`)
    requirements.txt   the distributions the app runs on, pinned to the versions of the training run
                       (its run_config.json) or, where the run did not record one, of this environment
    README.md          the Space metadata (sdk: gradio, models: [the model repo]) and what the page shows
    analysis/, data_scripts/   this package, as installed here (the Space needs no index to have it)

`write_space` writes it (a dry run stops there); `push_space` uploads it. Like the model push, the token is
never logged, printed or written.
"""
import logging
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

from huggingface_hub import HfApi

import analysis
import data_scripts
from analysis.core.resources import runtime_versions
from analysis.core.run_files import CARD_FILE
from data_scripts.errors import UserError
from data_scripts.hub import check_hub_access, resolve_token, validate_hub_repo_id

logger = logging.getLogger(__name__)

PACKAGES = (analysis, data_scripts)  # copied into the Space folder
APP_FILE = 'app.py'
REQUIREMENTS_FILE = 'requirements.txt'
README_FILE = CARD_FILE  # a Hub repo's card, a Space's too
SPACE_APP = '''"""What {model_id} looks at: the flower-vit-lens app (python -m analysis app) as a Space."""
from analysis.app import Lens, build_app

demo = build_app(Lens({model_id!r}))

if __name__ == '__main__':
    demo.launch()
'''
SPACE_README = '''---
title: {title}
emoji: 🌼
colorFrom: yellow
colorTo: purple
sdk: gradio
sdk_version: {gradio}
app_file: app.py
pinned: false
license: apache-2.0
models:
  - {model_id}
---

# What does [{model_id}](https://huggingface.co/{model_id}) look at?

Drop in a photo of a flower (or take one with the webcam): the page shows the top-5 prediction, the CLS
attention of every layer of the Vision Transformer, attention rollout, gradient-weighted rollout for the class
you choose, and any layer and head in large, with the numbers of each layer (entropy, high-norm tokens).

Made with flower-vit-lens (`python -m analysis push RUN --repo_id {model_id} --space {space_id}`); the same page
runs locally with `python -m analysis app --model {model_id}`.
'''


def space_requirements(run_environment: Optional[Mapping] = None) -> Dict[str, str]:
    """The pins of ``requirements.txt``, ``{distribution: version}``: every `RUNTIME_PACKAGES` distribution, the
    run's own versions first.

    Args:
        run_environment: ``run_config.json``'s ``environment`` (``packages``, and torch / timm / transformers).

    Raises:
        UserError: a distribution the app needs is installed neither here nor recorded by the run.
    """
    run_environment = run_environment or {}
    recorded = {**{k: run_environment.get(k) for k in ('torch', 'timm', 'transformers')},
                **(run_environment.get('packages') or {})}
    pins = {}
    for name, version in runtime_versions().items():
        version = recorded.get(name) or version
        if version is None:
            raise UserError(f'{name} is not installed, and the run did not record its version: pip install -e ".[app]"')
        pins[name] = str(version).split('+')[0]  # a local build tag (+cu130) is not on the index
    return pins


def space_files(model_id: str, space_id: str, run_environment: Optional[Mapping] = None) -> Dict[str, str]:
    """The text files of the Space: ``{name: text}``."""
    pins = space_requirements(run_environment)
    return {
        APP_FILE: SPACE_APP.format(model_id=model_id),
        REQUIREMENTS_FILE: ''.join(f'{name}=={version}\n' for name, version in pins.items()),
        README_FILE: SPACE_README.format(title=space_id.split('/')[-1][:30], gradio=pins['gradio'], model_id=model_id,
                                         space_id=space_id),
    }


def write_space(folder: Union[str, Path], model_id: str, space_id: str, run_environment: Optional[Mapping] = None
                ) -> Path:
    """Writes the Space into ``folder`` (new or empty): its text files and a copy of this package.

    Returns:
        ``folder``.
    """
    validate_hub_repo_id(model_id)
    validate_hub_repo_id(space_id)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f'{folder} exists and is not empty: pass a new folder for the Space.')
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in space_files(model_id, space_id, run_environment).items():
        (folder / name).write_text(text, encoding='utf-8')
    for package in PACKAGES:
        source = Path(package.__file__).parent
        # links (configs/, the card template) are copied as the files they point to
        shutil.copytree(source, folder / source.name, symlinks=False,
                        ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    logger.info('Space for %s written to %s', model_id, folder)
    return folder


def push_space(space_id: str, model_id: str, folder: Union[str, Path], *, token: Optional[str] = None,
               private: bool = False) -> str:
    """Uploads a written Space folder (`write_space`) to ``space_id`` (created as a Gradio Space if missing).

    Returns:
        The Space's URL.
    """
    token = resolve_token(token)
    check_hub_access(space_id, token)
    api = HfApi(token=token)
    url = api.create_repo(space_id, private=private, exist_ok=True, repo_type='space', space_sdk='gradio')
    api.upload_folder(repo_id=space_id, folder_path=str(folder), repo_type='space',
                      commit_message=f'The flower-vit-lens app on {model_id}')
    logger.info('Uploaded the Space %s (the app on %s)', url, model_id)
    return str(url)
