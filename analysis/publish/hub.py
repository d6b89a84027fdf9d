"""Publishing a training run to the Hugging Face Hub: file selection, card, upload.

The token and the fast preflight live in `data_scripts.hub` (datasets are published too).
``push_output_dir`` re-renders the model card (so it shows the current numbers) and then
uploads exactly the files of ``files_to_upload`` -- never checkpoints, optimizer state or logs. With
``dry_run_dir`` it copies those files into a folder instead, so the result can be inspected
(and loaded with timm / transformers) without a network.

The token is never logged, printed or written anywhere.
"""
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Union

from huggingface_hub import HfApi, get_token

from analysis.core.run_files import (
    BACKGROUND_FILE,
    CARD_FILE,
    CHANGE_FILE,
    COMPRESS_FILE,
    CONFIG_FILE,
    DATA_REPORT_FILE,
    FAITHFULNESS_FILE,
    FIGURES_DIR,
    IMPORTANCE_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    RUN_CONFIG_FILE,
    SINKS_FILE,
    START_METRICS_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    read_json,
)
from analysis.publish.space import push_space, write_space
from analysis.render.card import render_model_card
from data_scripts.errors import MissingFileError, UserError
from data_scripts.hub import HubError, check_hub_access, resolve_token, validate_hub_repo_id

logger = logging.getLogger(__name__)

# What a published model repository holds, relative to the run's output directory. Everything
# else (checkpoint-*/, runs/, *.pt / *.pth / *.bin optimizer, scheduler and RNG state,
# training_args.bin, logs) stays local. attentions.safetensors is included: it is a reduced
# summary (float16 CLS maps, a few example images), a few MB at most, and it lets others redo the
# attention plots without the data.
UPLOAD_FILES = [
    CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, RESULTS_FILE, RUN_CONFIG_FILE, DATA_REPORT_FILE, METRICS_FILE, SUMMARY_FILE,
    START_METRICS_FILE, CHANGE_FILE, BACKGROUND_FILE, IMPORTANCE_FILE, FAITHFULNESS_FILE, SINKS_FILE, COMPRESS_FILE,
    REPORT_FILE,
]
UPLOAD_GLOBS = [f'{FIGURES_DIR}/*.png']
UPLOAD_PATTERNS = UPLOAD_FILES + UPLOAD_GLOBS
REQUIRED_FILES = [CONFIG_FILE, WEIGHTS_FILE, RESULTS_FILE, RUN_CONFIG_FILE]

def files_to_upload(output_dir: Union[str, Path]) -> List[str]:
    """The files of a run that go to the Hub: those of ``UPLOAD_PATTERNS`` that exist.

    Args:
        output_dir: the run's output directory.

    Returns:
        Sorted paths relative to ``output_dir``, with "/" separators.
    """
    output_dir = Path(output_dir)
    found = [name for name in UPLOAD_FILES if (output_dir / name).is_file()]
    for pattern in UPLOAD_GLOBS:
        found += [path.relative_to(output_dir).as_posix() for path in output_dir.glob(pattern) if path.is_file()]
    return sorted(found)


def _as_exact_pattern(path: str) -> str:
    """An fnmatch pattern matching exactly ``path`` (upload_folder's allow_patterns use fnmatch)."""
    return re.sub(r'([*?\[])', r'[\1]', path)


def _check_no_token_in_files(output_dir: Path, files: List[str], token: Optional[str]) -> None:
    """Refuses to publish a file that contains the Hub token (e.g. a config that captured it)."""
    if not token:
        return
    needle = token.encode('utf-8')
    for name in files:
        if (output_dir / name).read_bytes().find(needle) >= 0:
            raise HubError(f'{output_dir / name} contains your Hugging Face token; remove it from that file '
                           'before publishing (nothing was uploaded).')


def push_output_dir(output_dir: Union[str, Path], repo_id: str, *, private: bool = False,
                    token: Optional[str] = None, dry_run_dir: Optional[Union[str, Path]] = None,
                    license: str = 'apache-2.0',
                    commit_message: str = 'Upload fine-tuned ViT, model card and attention analysis',
                    space_id: Optional[str] = None) -> Union[str, Path]:
    """Publishes a training run: re-renders the model card, then uploads the files of ``files_to_upload``; with
    ``space_id``, also a Space that runs the app on the model (`analysis.publish.space`), linked from the card.

    Args:
        output_dir: the run's output directory (config.json, model.safetensors, all_results.json,
            run_config.json at least).
        repo_id: the model repository, "user/name"; created if missing. An existing repository keeps
            its visibility (``private`` only applies when it is created).
        private: create the repository as private.
        token: the Hub token; None looks it up (HF_TOKEN, `hf auth login`). Not needed for a dry run.
        dry_run_dir: instead of uploading, copy exactly the files that would be uploaded into this
            folder (which must not exist or be empty).
        license: the license identifier for the model card.
        commit_message: the commit message on the Hub.
        space_id: the Space, "user/name", created (as a Gradio Space) if missing. With ``dry_run_dir``, the model's
            files go to ``dry_run_dir/model`` and the Space's to ``dry_run_dir/space``.

    Returns:
        The repository URL (and the Space's, on the next line), or the dry-run folder.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise MissingFileError(f'{output_dir} is not a directory: pass the --output_dir of a training run.')
    missing = [name for name in REQUIRED_FILES if not (output_dir / name).is_file()]
    if missing:
        raise MissingFileError(f'{output_dir} lacks {", ".join(missing)}: train first (train_hf.py '
                                '--output_dir DIR) or pass the output directory of a finished run.')
    validate_hub_repo_id(repo_id)
    if space_id is not None:
        validate_hub_repo_id(space_id)
        if space_id == repo_id:
            raise UserError(f'--space {space_id} is the model repo itself: name the Space differently, e.g. {repo_id}-lens')
    if dry_run_dir is None:
        token = resolve_token(token)
        check_hub_access(repo_id, token)
    else:
        dry_run_dir = Path(dry_run_dir)
        if dry_run_dir.exists() and (not dry_run_dir.is_dir() or any(dry_run_dir.iterdir())):
            raise UserError(f'--dry_run folder {dry_run_dir} exists and is not empty: pass a new folder.')
        # Only used to make sure no file leaks a stored token; a dry run needs none.
        token = token or get_token()

    render_model_card(output_dir, repo_id=repo_id, license=license, space_id=space_id)
    files = files_to_upload(output_dir)
    _check_no_token_in_files(output_dir, files, token)
    environment = read_json(output_dir / RUN_CONFIG_FILE).get('environment') if space_id else None

    if dry_run_dir is not None:
        model_dir = dry_run_dir / 'model' if space_id else dry_run_dir
        for name in files:
            target = model_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(output_dir / name, target)
        logger.info('Dry run: %d files for %s copied to %s: %s', len(files), repo_id, model_dir, ', '.join(files))
        if space_id:
            write_space(dry_run_dir / 'space', repo_id, space_id, environment)
        return dry_run_dir

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
    api.upload_folder(repo_id=repo_id, folder_path=output_dir, repo_type='model',
                      allow_patterns=[_as_exact_pattern(name) for name in files],
                      commit_message=commit_message)
    logger.info('Uploaded %d files to %s: %s', len(files), repo_url, ', '.join(files))
    if space_id is None:
        return str(repo_url)
    with tempfile.TemporaryDirectory() as folder:
        space = write_space(Path(folder) / 'space', repo_id, space_id, environment)
        return f'{repo_url}\n{push_space(space_id, repo_id, space, token=token, private=private)}'

