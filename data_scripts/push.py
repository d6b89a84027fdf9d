"""Publish a prepared flower dataset (images, labels with class names, masks) to the Hub as parquet.

    python -m data_scripts.push --dataset synthetic --repo_id user/synthetic-flowers [--private]
    python -m data_scripts.push --dataset oxford102 --data_dir DIR --repo_id user/oxford-flowers
    python -m data_scripts.push --dataset synthetic --dry_run DIR   # write the parquet files locally

The dataset is loaded exactly as training loads it (``DataArguments`` + ``load_flower_dataset``),
so every data flag applies, and published with ``DatasetDict.push_to_hub``; afterwards
``train_hf.py --dataset_name user/name`` trains from it. A dry run writes the same parquet files in
the Hub layout (``DIR/data/{split}-00000-of-00001.parquet``, images embedded as bytes, class names
in the features metadata), which ``datasets.load_dataset(DIR)`` loads back.

The Hub token comes from HF_TOKEN or ``hf auth login`` and is checked before the dataset is built;
it is never a command-line flag (it would end up in the shell history).
"""
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import datasets
from datasets.table import embed_table_storage
from huggingface_hub import constants
from transformers import HfArgumentParser

from data_scripts import DataArguments, check_images, load_flower_dataset
from data_scripts.errors import UserError, run_main
from data_scripts.files import atomic_path
from data_scripts.hub import check_hub_access, resolve_token, validate_hub_repo_id

logger = logging.getLogger(__name__)


@dataclass
class PushArguments:
    """Where the dataset goes."""
    repo_id: Optional[str] = field(default=None, metadata={
        'help': 'Hub dataset repository to create or update, "user/name". Required unless --dry_run.'})
    private: bool = field(default=False, metadata={
        'help': 'Create the dataset repository as private (an existing one keeps its visibility).'})
    dry_run: Optional[str] = field(default=None, metadata={
        'help': 'Write the parquet files in Hub layout into this new or empty folder instead of pushing.'})

    def __post_init__(self):
        if self.dry_run is None and not self.repo_id:
            raise UserError('--repo_id is required (e.g. --repo_id user/synthetic-flowers), '
                             'or pass --dry_run DIR to write the files locally.')
        if self.repo_id:
            validate_hub_repo_id(self.repo_id)
        if self.dry_run is not None:
            folder = Path(self.dry_run)
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise UserError(f'--dry_run folder {folder} exists and is not empty: pass a new folder.')


def write_hub_layout(dataset: datasets.DatasetDict, folder: Union[str, Path]) -> List[Path]:
    """Writes a DatasetDict as one parquet file per split in the Hub layout.

    Images and masks are embedded as bytes (as ``push_to_hub`` does), so the files do not refer to
    local paths; the features (ClassLabel names, Image columns) travel in the parquet metadata.

    Args:
        dataset: the splits to write.
        folder: the dataset folder; files go to ``folder/data/{split}-00000-of-00001.parquet``.

    Returns:
        The written parquet files.
    """
    data_dir = Path(folder) / 'data'
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, ds in dataset.items():
        # Image columns that point to files on disk get their bytes read into the table.
        embedded = ds.with_format('arrow').map(embed_table_storage, batched=True, keep_in_memory=True)
        path = data_dir / f'{split}-00000-of-00001.parquet'
        with atomic_path(path) as tmp:
            embedded.with_format(None).to_parquet(str(tmp))
        written.append(path)
        logger.info('Wrote %s (%d examples)', path, len(ds))
    return written


def push_dataset(data_args: DataArguments, push_args: PushArguments,
                 token: Optional[str] = None) -> Union[str, Path]:
    """Loads the dataset described by ``data_args`` and publishes it (or writes it, for a dry run).

    Args:
        data_args: which dataset, as for training.
        push_args: where it goes.
        token: the Hub token; None looks it up (HF_TOKEN, `hf auth login`).

    Returns:
        The dataset URL on the Hub, or the dry-run folder.
    """
    if push_args.dry_run is None:
        # Fail in seconds, before building the dataset, when the Hub cannot be used.
        token = resolve_token(token)
        check_hub_access(push_args.repo_id, token)
    dataset = load_flower_dataset(data_args)
    # A published dataset must load for everyone: refuse unreadable images instead of hiding them.
    dataset, _ = check_images(dataset, strict=True)
    columns = dataset[next(iter(dataset))].column_names
    logger.info('Dataset %s: splits %s, columns %s%s', data_args.dataset_name,
                {split: len(ds) for split, ds in dataset.items()}, columns,
                '' if 'mask' in columns else ' (no flower masks)')
    if push_args.dry_run is not None:
        write_hub_layout(dataset, push_args.dry_run)
        return Path(push_args.dry_run)
    dataset.push_to_hub(push_args.repo_id, private=push_args.private, token=token)
    url = f'{constants.ENDPOINT}/datasets/{push_args.repo_id}'
    logger.info('Pushed the dataset to %s', url)
    return url


def main(argv: Optional[List[str]] = None) -> Union[str, Path]:
    """Parses the flags (``DataArguments`` + ``PushArguments``) and publishes the dataset."""
    parser = HfArgumentParser((DataArguments, PushArguments))
    data_args, push_args = parser.parse_args_into_dataclasses(args=argv)
    return push_dataset(data_args, push_args)


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    sys.exit(run_main(lambda argv: logger.info('Done: %s', main(argv))))
