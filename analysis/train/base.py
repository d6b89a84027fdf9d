"""Base models: ``base:<config>`` is trained by the job itself from its config on first use, then cached.

The cache folder is keyed by what changes the weights: the resolved arguments of the config (flags
the config leaves out take today's defaults, so a changed default is a new key) and the number of
processes that train it (the global batch). One build at a time per key, across processes and
jobs: a file lock beside the folder makes a second job wait for the first one's build and then
reuse it, as ``datasets`` locks its cache.
"""
import hashlib
import json
import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, Optional

from accelerate import PartialState
from filelock import FileLock, Timeout

from analysis.core.run_files import CONFIG_FILE, WEIGHTS_FILE
from analysis.train.args import CACHE_ENV, base_config, parse_config

logger = logging.getLogger(__name__)

BASE_CACHE_VERSION = 2  # part of the cache key: bump when building a base changes
# Flags that change where and how a run reports, not its weights: left out of the cache key.
NOT_IN_KEY = ('output_dir', 'logging_dir', 'run_name', 'report_to', 'disable_tqdm', 'logging_steps',
              'logging_strategy', 'logging_first_step', 'dataloader_num_workers', 'preprocessing_num_workers')


def cache_root() -> Path:
    """Where built bases are kept: $FLOWER_VIT_LENS_CACHE, else ~/.cache/flower_vit_lens."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'flower_vit_lens')


def base_run_config(name: str, seed: Optional[int] = None) -> Dict:
    """The config a build of ``base:<config>`` runs, with another training ``seed`` than its own if given."""
    config = dict(base_config(name)[1])
    if seed is not None:
        config['seed'] = seed
    return config


def resolved_base_args(name: str, seed: Optional[int] = None) -> Dict:
    """The arguments a build of ``base:<config>`` runs with, as a JSON-able dict (what the key hashes)."""
    model_args, data_args, training_args = parse_config(base_run_config(name, seed), output_dir='base')
    resolved = {'model': vars(model_args), 'data': vars(data_args), 'training': training_args.to_dict()}
    for group in resolved.values():
        for key in NOT_IN_KEY:
            group.pop(key, None)
    return json.loads(json.dumps(resolved, sort_keys=True, default=str))


def base_cache_dir(name: str, num_processes: int = 1, seed: Optional[int] = None) -> Path:
    """The cache folder of ``base:<config>`` built by ``num_processes`` processes (with training ``seed``)."""
    short = base_config(name)[0]
    blob = json.dumps({'args': resolved_base_args(name, seed), 'num_processes': num_processes,
                       'cache_version': BASE_CACHE_VERSION}, sort_keys=True)
    return cache_root() / 'bases' / f'{short}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}'


def is_built(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def ensure_base(name: str, build: Callable, seed: Optional[int] = None) -> Path:
    """The checkpoint folder of ``base:<config>``, built on first use with ``build`` (the training job's `run`).

    The base is trained into ``<key>.partial`` and renamed to ``<key>`` when it is complete, so a
    killed build never leaves a half-written cache entry; the next build resumes from the partial
    run's last checkpoint. The main process of each job holds ``<key>.lock`` from the check to the
    rename: a second job that needs the same base waits there, then finds it built. Every process of
    a distributed job takes part in its build.

    Args:
        build: called as ``build(model_args, data_args, training_args)`` of the base's config.
        seed: the base's training seed, if not its config's own (``--base_seed``).
    """
    state = PartialState()
    final = base_cache_dir(name, state.num_processes, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final.with_name(final.name + '.lock'))) if state.is_main_process else nullcontext()
    if state.is_main_process:
        try:
            lock.acquire(timeout=1)
        except Timeout:
            logger.warning(f'{name}: another run is building this base ({final}); waiting for it')
            lock.acquire()
    try:
        state.wait_for_everyone()  # the other processes start once their main process holds the lock
        if is_built(final):
            logger.info(f'{name}: using the cached base model {final}')
        else:
            partial = final.with_name(final.name + '.partial')
            logger.warning(f'{name}: building the base model (first use); it will be cached in {final}')
            build(*parse_config(base_run_config(name, seed), output_dir=str(partial), run_name=name))
            if state.is_main_process:
                if final.exists():  # a build left by an older, unlocked version of this cache
                    shutil.rmtree(final)
                os.rename(partial, final)
        state.wait_for_everyone()
    finally:
        if state.is_main_process:
            lock.release()
    return final
