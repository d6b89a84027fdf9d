"""The training job's arguments: the three dataclasses `HfArgumentParser` fills, and config files.

A config file is a JSON object of flags (``{"flag": value}``); ``base:<config>`` names a packaged
``configs/base_<config>.json`` (or a path), the config of a base model the job builds and caches
(`analysis.train.base`).
"""
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import timm
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import ParallelMode

from analysis.core.launch import check_launch
from analysis.core.resources import config_file, config_names
from analysis.modeling.vit import looks_like_local_path
from analysis.studies.faithfulness import JOB_MAX_IMAGES as FAITHFULNESS_JOB_IMAGES
from analysis.studies.sinks import JOB_CAUSAL_IMAGES as SINKS_JOB_IMAGES
from data_scripts import DataArguments
from data_scripts.errors import MissingFileError, NotAFolderError, UserError

logger = logging.getLogger(__name__)

BASE_PREFIX = 'base:'  # base:<packaged config name, or a config .json>: a model trained from that config, cached
DEMO_BASE = 'base:shapes'  # configs/base_shapes.json: the demo's pretrained backbone (synthetic shapes)
CACHE_ENV = 'FLOWER_VIT_LENS_CACHE'
DATASET_FLAGS = ('--dataset_name', '--dataset', '--train_dir', '--data_dir')  # flags that name a dataset


def json_dict(flag: str, value) -> Dict:
    """A flag's JSON dict (a string, a dict or None: empty), or a ValueError naming the flag."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else (value or {})
    except json.JSONDecodeError as e:
        raise UserError(f'{flag} must be a JSON dict, got {value!r}: {e}') from e
    if not isinstance(parsed, dict):
        raise UserError(f'{flag} must be a JSON dict, got {value!r}')
    return parsed


@dataclass
class ModelArguments:
    """Which model to fine-tune. Defaults are the embedded demo's: fine-tune the synthetic-shapes base."""
    model_name_or_path: str = field(
        default=DEMO_BASE,
        metadata={'help': 'Where training starts: a timm model name (e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k), '
                          'the output directory of an earlier run or a Hub repo id (a model trained on other classes '
                          'gets a new head), or base:<config> (a model trained from a packaged config, e.g. '
                          f'{DEMO_BASE}, built on first use and cached in ~/.cache/flower_vit_lens or ${CACHE_ENV}).'})
    pretrained: bool = field(
        default=True,
        metadata={'help': 'Start from the weights of --model_name_or_path (timm\'s pretrained weights for a timm '
                          'name); false: the same architecture with random weights (training from scratch).'})
    model_args: Optional[str] = field(
        default=None,
        metadata={'help': 'JSON dict of timm.create_model arguments (depth, img_size, drop_path_rate, ...); for a '
                          'checkpoint they override its own and must not change the shape of its tensors (img_size '
                          'may: the position embedding is resampled). Default: for base:<config>, the '
                          'fine_tune_model_args of that config; none otherwise.'})
    fine_tune_model_args: Optional[str] = field(
        default=None,
        metadata={'help': 'In a base config: the --model_args of a model fine-tuned from this base that gives none, '
                          'e.g. {"img_size": 64} when the base is trained at a lower resolution than it is '
                          'fine-tuned at (configs/base_shapes.json: 32 px, fine-tuned at 64 px).'})
    min_crop_scale: float = field(
        default=0.6,
        metadata={'help': 'Lower bound of the random-resized-crop area in training (timm uses 0.08; small '
                          'crops cut the petals the demo\'s small model must see, so the demo keeps 0.6).'})
    analysis_batches: Optional[int] = field(
        default=None,
        metadata={'help': 'Attention extraction after training: at most this many test batches (default: all).'})
    color_jitter: float = field(
        default=0.0,
        metadata={'help': 'Strength of the training colour jitter (brightness, contrast, saturation); timm uses '
                          '0.4, the demo 0: its synthetic species differ in colour, which the jitter blurs.'})
    faithfulness_images: int = field(
        default=FAITHFULNESS_JOB_IMAGES,
        metadata={'help': 'After training, score the faithfulness of the attention maps (deletion / insertion) on '
                          'this many test images (0: skip; python -m analysis faithfulness scores more).'})
    sinks_causal_images: int = field(
        default=SINKS_JOB_IMAGES,
        metadata={'help': 'After training, the causal check of the attention sinks (flagged tokens replaced by the '
                          'mean of the others, against random background tokens) on this many test images (0: skip; '
                          'the per-layer table of sinks.json is read from the attention summary and always written).'})
    base_seed: Optional[int] = field(
        default=None,
        metadata={'help': 'With base:<config>: build the base with this training seed instead of its config\'s own, '
                          'a second base (cached apart) to measure how much a finding depends on the base.'})

    def __post_init__(self):
        name = self.model_name_or_path
        base = base_config(name)[1] if name.startswith(BASE_PREFIX) else None  # raises if there is no such config
        given = self.model_args
        if given is None and base is not None:  # the base says how it is fine-tuned
            given = base.get('fine_tune_model_args')
        self.model_args = json.dumps(json_dict('--model_args', given))
        json_dict('--fine_tune_model_args', self.fine_tune_model_args)
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise UserError(f'--min_crop_scale must be in (0, 1], got {self.min_crop_scale}')
        if self.color_jitter < 0:
            raise UserError(f'--color_jitter must be >= 0 (0: no jitter), got {self.color_jitter}')
        if self.faithfulness_images < 0:
            raise UserError(f'--faithfulness_images must be >= 0 (0 skips the scores), got {self.faithfulness_images}')
        if self.sinks_causal_images < 0:
            raise UserError(f'--sinks_causal_images must be >= 0 (0 skips the causal check), got {self.sinks_causal_images}')
        if self.analysis_batches is not None and self.analysis_batches < 1:
            raise UserError(f'--analysis_batches must be >= 1 (or left out for all), got {self.analysis_batches}')
        if self.base_seed is not None and base is None:
            raise UserError(f'--base_seed {self.base_seed} needs --model_name_or_path base:<config>, got {name}')
        if base is None and looks_like_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
            raise MissingFileError(
                f'--model_name_or_path {name} is not a folder: give the output directory of an earlier run, '
                'a Hub repo id (user/name), a timm model name or base:<config>.')
        if base is None and '/' not in name and not os.path.isdir(name) and not timm.is_model(name):
            raise UserError(f'--model_name_or_path {name} is not a timm model name, a folder, a Hub repo id '
                             '(user/name) or base:<config>; see timm.list_models("vit_*").')

    @property
    def timm_kwargs(self) -> Dict:
        return json.loads(self.model_args)


@dataclass
class FlowerTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with defaults that run the embedded demo in a few CPU minutes."""
    output_dir: Optional[str] = field(default='outputs/synthetic_demo', metadata={'help': 'Where to write everything.'})
    learning_rate: float = field(default=1e-3, metadata={'help': 'Peak AdamW learning rate.'})
    weight_decay: float = field(default=0.05, metadata={'help': 'AdamW weight decay.'})
    warmup_steps: float = field(default=0.05, metadata={'help': 'Warmup steps, or a ratio of all steps if < 1.'})
    lr_scheduler_type: str = field(default='cosine', metadata={'help': 'Learning-rate schedule.'})
    num_train_epochs: float = field(default=4.0, metadata={'help': 'Training epochs.'})
    per_device_train_batch_size: int = field(default=64, metadata={'help': 'Batch size per device for training.'})
    per_device_eval_batch_size: int = field(default=128, metadata={'help': 'Batch size per device for evaluation.'})
    eval_strategy: str = field(default='epoch', metadata={'help': 'When to evaluate on the validation split.'})
    save_strategy: str = field(default='epoch', metadata={'help': 'When to save a checkpoint.'})
    save_total_limit: Optional[int] = field(default=2, metadata={'help': 'Checkpoints to keep.'})
    logging_steps: float = field(default=10, metadata={'help': 'Log every N steps.'})
    remove_unused_columns: bool = field(default=False, metadata={'help': 'Keep the image column for transforms.'})

    def __post_init__(self):
        # Checked before anything is generated or loaded (transformers would only fail, or train
        # nothing, much later).
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f'--max_steps must be > 0, or -1 to train for --num_train_epochs; got {self.max_steps}')
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise UserError(f'--num_train_epochs must be > 0 (or give --max_steps); got {self.num_train_epochs}')
        if not self.learning_rate > 0:
            raise UserError(f'--learning_rate must be > 0, got {self.learning_rate}')
        for flag in ('per_device_train_batch_size', 'per_device_eval_batch_size'):
            if getattr(self, flag) < 1:
                raise UserError(f'--{flag} must be >= 1, got {getattr(self, flag)}')
        if self.output_dir and os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise NotAFolderError(f'--output_dir {self.output_dir} is a file; give a folder (new or earlier run).')
        if self.resume_from_checkpoint is not None and not os.path.isdir(self.resume_from_checkpoint):
            raise MissingFileError(f'--resume_from_checkpoint {self.resume_from_checkpoint} is not a folder; give '
                                    'a checkpoint-* folder, or leave it out to resume from the last complete one.')
        if self.push_to_hub and not self.hub_model_id:
            raise UserError('--push_to_hub needs --hub_model_id user/name')
        if self.dataloader_persistent_workers and self.dataloader_num_workers > 0:
            raise UserError('--dataloader_persistent_workers keeps each worker\'s augmentation at its first epoch; '
                             'leave it off (workers are restarted every epoch).')
        super().__post_init__()
        check_launch(self.parallel_mode == ParallelMode.DISTRIBUTED)  # before any data or base is built


def parse_args(argv: Optional[List[str]] = None) -> Tuple[ModelArguments, DataArguments, FlowerTrainingArguments]:
    """Flags into the three argument dataclasses; a leading ``.json`` file gives defaults that flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, FlowerTrainingArguments))
    if argv and argv[0].endswith('.json'):
        parser.set_defaults(**read_config(argv.pop(0)))
    return parser.parse_args_into_dataclasses(args=argv)


def parse_config(config: Dict, **overrides) -> Tuple[ModelArguments, DataArguments, FlowerTrainingArguments]:
    """The three argument dataclasses from a config dict (``{flag: value}``), with ``overrides`` on top."""
    parser = HfArgumentParser((ModelArguments, DataArguments, FlowerTrainingArguments))
    return parser.parse_dict({**config, **overrides})


def read_config(path: str) -> Dict:
    """A JSON config file of flags (``{"flag": value}``); unknown keys are an error.

    A path that does not exist here but names one of the packaged configs (``configs/<name>.json``)
    reads the packaged one, so the README's commands work from any folder after ``pip install``.
    """
    if os.path.isfile(path):
        text = Path(path).read_text()
    else:
        packaged = os.path.basename(path)
        if os.path.dirname(path) not in ('', 'configs') or packaged not in config_names():
            raise MissingFileError(f'config file {path} does not exist (packaged configs: {config_names()})')
        logger.info(f'{path} is not here; using the packaged configs/{packaged}')
        text = config_file(packaged).read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f'config file {path} is not valid JSON: {e}') from e
    if not isinstance(config, dict):
        raise UserError(f'config file {path} must hold a JSON object of flags, got {type(config).__name__}')
    unknown = sorted(set(config) - flag_names())
    if unknown:
        raise UserError(f'unknown keys in the config file {path}: {unknown}; see python -m train_hf --help')
    return config


def base_config(name: str) -> Tuple[str, Dict]:
    """The training config behind ``base:<config>``: a packaged ``configs/base_<config>.json`` or a ``.json`` path.

    Returns:
        ``(short name, config dict)``.
    """
    ref = name[len(BASE_PREFIX):]
    if ref.endswith('.json'):
        path, short = ref, Path(ref).stem
    else:
        path, short = f'configs/base_{ref}.json', ref
        if Path(path).name not in config_names():
            bases = [n[len('base_'):-len('.json')] for n in config_names() if n.startswith('base_')]
            raise MissingFileError(f'{name}: no packaged config {Path(path).name}; packaged bases: '
                                    f'{", ".join(BASE_PREFIX + b for b in bases)}, or give base:<path to a config .json>')
    return short, read_config(path)


def flag_names() -> Set[str]:
    """Every flag the job takes (the dataclasses' fields), the keys a config file may hold."""
    return {f.name for dc in (ModelArguments, DataArguments, FlowerTrainingArguments) for f in fields(dc) if f.init}
