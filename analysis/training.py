"""The training job as functions: arguments, data, model, Trainer, evaluation, end-of-run analysis.

`train_hf.py` is its command line; the background study and the base-model cache run it too.
"""
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import datasets
import numpy as np
import timm
import torch
import transformers
from accelerate import PartialState
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from data_scripts import DataArguments, check_images, load_flower_dataset
from data_scripts.files import write_json
from data_scripts.hub import check_hub_access, resolve_token
from data_scripts.hygiene import unusable_message

from .attention_change import attention_change
from .card import render_model_card
from .explorer import FULL_MAPS
from .extract import extract_and_score
from .faithfulness import JOB_MAX_IMAGES as FAITHFULNESS_JOB_IMAGES
from .faithfulness import faithfulness_to_dir
from .hub import push_output_dir
from .metrics import classification_metrics
from .modeling import TimmViTForImageClassification, checkpoint_dir, init_from_checkpoint, looks_like_local_path
from .report import write_report
from .resources import config_file, config_names
from .run_files import (CHANGE_FILE, CONFIG_FILE, METRICS_FILE, START_METRICS_FILE, START_SUMMARY_FILE, SUMMARY_FILE,
                        WEIGHTS_FILE, read_json)
from .transforms import SeededAugmentation, batch_transform, collate, eval_transform, model_data_config, train_transform

logger = logging.getLogger(__name__)

BASE_PREFIX = 'base:'  # base:<packaged config name, or a config .json>: a model trained from that config, cached
DEMO_BASE = 'base:shapes'  # configs/base_shapes.json: the demo's pretrained backbone (synthetic shapes)
CACHE_ENV = 'FLOWER_VIT_LENS_CACHE'
BASE_CACHE_VERSION = 1  # part of the cache key: bump when building a base changes


def json_dict(flag: str, value) -> Dict:
    """A flag's JSON dict (a string, a dict or None: empty), or a ValueError naming the flag."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else (value or {})
    except json.JSONDecodeError as e:
        raise ValueError(f'{flag} must be a JSON dict, got {value!r}: {e}') from e
    if not isinstance(parsed, dict):
        raise ValueError(f'{flag} must be a JSON dict, got {value!r}')
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

    def __post_init__(self):
        name = self.model_name_or_path
        base = base_config(name)[1] if name.startswith(BASE_PREFIX) else None  # raises if there is no such config
        given = self.model_args
        if given is None and base is not None:  # the base says how it is fine-tuned
            given = base.get('fine_tune_model_args')
        self.model_args = json.dumps(json_dict('--model_args', given))
        json_dict('--fine_tune_model_args', self.fine_tune_model_args)
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f'--min_crop_scale must be in (0, 1], got {self.min_crop_scale}')
        if self.color_jitter < 0:
            raise ValueError(f'--color_jitter must be >= 0 (0: no jitter), got {self.color_jitter}')
        if self.faithfulness_images < 0:
            raise ValueError(f'--faithfulness_images must be >= 0 (0 skips the scores), got {self.faithfulness_images}')
        if self.analysis_batches is not None and self.analysis_batches < 1:
            raise ValueError(f'--analysis_batches must be >= 1 (or left out for all), got {self.analysis_batches}')
        if base is None and looks_like_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
            raise FileNotFoundError(
                f'--model_name_or_path {name} is not a folder: give the output directory of an earlier run, '
                'a Hub repo id (user/name), a timm model name or base:<config>.')
        if base is None and '/' not in name and not os.path.isdir(name) and not timm.is_model(name):
            raise ValueError(f'--model_name_or_path {name} is not a timm model name, a folder, a Hub repo id '
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
            raise ValueError(f'--max_steps must be > 0, or -1 to train for --num_train_epochs; got {self.max_steps}')
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise ValueError(f'--num_train_epochs must be > 0 (or give --max_steps); got {self.num_train_epochs}')
        if not self.learning_rate > 0:
            raise ValueError(f'--learning_rate must be > 0, got {self.learning_rate}')
        for flag in ('per_device_train_batch_size', 'per_device_eval_batch_size'):
            if getattr(self, flag) < 1:
                raise ValueError(f'--{flag} must be >= 1, got {getattr(self, flag)}')
        if self.output_dir and os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise NotADirectoryError(f'--output_dir {self.output_dir} is a file; give a folder (new or earlier run).')
        if self.resume_from_checkpoint is not None and not os.path.isdir(self.resume_from_checkpoint):
            raise FileNotFoundError(f'--resume_from_checkpoint {self.resume_from_checkpoint} is not a folder; give '
                                    'a checkpoint-* folder, or leave it out to resume from the last complete one.')
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError('--push_to_hub needs --hub_model_id user/name')
        if self.dataloader_persistent_workers and self.dataloader_num_workers > 0:
            raise ValueError('--dataloader_persistent_workers keeps each worker\'s augmentation at its first epoch; '
                             'leave it off (workers are restarted every epoch).')
        super().__post_init__()


def parse_args(argv: Optional[List[str]] = None) -> Tuple[ModelArguments, DataArguments, FlowerTrainingArguments]:
    """Flags into the three argument dataclasses; a leading ``.json`` file gives defaults that flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, FlowerTrainingArguments))
    if argv and argv[0].endswith('.json'):
        parser.set_defaults(**read_config(argv.pop(0), {action.dest for action in parser._actions}))
    return parser.parse_args_into_dataclasses(args=argv)


def parse_config(config: Dict, **overrides) -> Tuple[ModelArguments, DataArguments, FlowerTrainingArguments]:
    """The three argument dataclasses from a config dict (``{flag: value}``), with ``overrides`` on top."""
    parser = HfArgumentParser((ModelArguments, DataArguments, FlowerTrainingArguments))
    return parser.parse_dict({**config, **overrides})


def read_config(path: str, known: set) -> Dict:
    """A JSON config file of flags (``{"flag": value}``); unknown keys are an error.

    A path that does not exist here but names one of the packaged configs (``configs/<name>.json``)
    reads the packaged one, so the README's commands work from any folder after ``pip install``.
    """
    if os.path.isfile(path):
        text = Path(path).read_text()
    else:
        packaged = os.path.basename(path)
        if os.path.dirname(path) not in ('', 'configs') or packaged not in config_names():
            raise FileNotFoundError(f'config file {path} does not exist (packaged configs: {config_names()})')
        logger.info(f'{path} is not here; using the packaged configs/{packaged}')
        text = config_file(packaged).read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'config file {path} is not valid JSON: {e}') from e
    if not isinstance(config, dict):
        raise ValueError(f'config file {path} must hold a JSON object of flags, got {type(config).__name__}')
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f'unknown keys in the config file {path}: {unknown}; see python -m train_hf --help')
    return config


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format='%(asctime)s - %(levelname)s - %(name)s - %(message)s', datefmt='%m/%d/%Y %H:%M:%S',
        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:  # the main process says what it does (transformers example habit)
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for lib_logger in (logger, logging.getLogger('analysis'), logging.getLogger('data_scripts')):
        lib_logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        f'Process rank: {training_args.process_index}, device: {training_args.device}, '
        f'n_gpu: {training_args.n_gpu}, distributed: {training_args.parallel_mode.value}')


class AugmentationEpoch(TrainerCallback):
    """Tells the seeded augmentation which epoch starts (also the resumed one, mid-epoch)."""

    def __init__(self, augmentation: SeededAugmentation):
        self.augmentation = augmentation

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional when resuming mid-epoch and may fall a hair short of an integer
        self.augmentation.epoch = int(state.epoch + 1e-6) if state.epoch else 0


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-*`` in output_dir that was written to the end.

    Trainer writes trainer_state.json last, so a run killed while saving leaves a checkpoint
    without it (or with a cut-off one); such a folder is skipped, with a warning, not deleted.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(d.split('-')[-1]) for d in os.listdir(output_dir)
                    if d.startswith(PREFIX_CHECKPOINT_DIR + '-') and d.split('-')[-1].isdigit()), reverse=True)
    for step in steps:
        path = os.path.join(output_dir, f'{PREFIX_CHECKPOINT_DIR}-{step}')
        try:
            with open(os.path.join(path, 'trainer_state.json')) as f:
                json.load(f)
            if os.path.isfile(os.path.join(path, 'model.safetensors')):
                return path
        except (OSError, json.JSONDecodeError):
            pass
        logger.warning(f'{path} is incomplete (the run was stopped while saving it); skipping it.')
    return None


def resolve_resume(training_args: TrainingArguments) -> Optional[str]:
    """What to resume from: --resume_from_checkpoint, else the last complete checkpoint in output_dir."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    checkpoint = last_complete_checkpoint(training_args.output_dir)
    if checkpoint is not None:
        logger.info(f'Checkpoint found, resuming training from {checkpoint}. '
                    'To start over, use another --output_dir or delete this one.')
    return checkpoint


def load_data(data_args: DataArguments, training_args: TrainingArguments) -> datasets.DatasetDict:
    """Loads the dataset and drops unreadable images before anything trains (see data_report.json)."""
    with training_args.main_process_first(desc='loading the dataset'):  # the others then read its cache
        dataset = load_flower_dataset(data_args)
    dataset, report = check_images(dataset)  # every process at once
    report_path = os.path.join(training_args.output_dir, 'data_report.json')
    if training_args.should_save:
        write_json(report_path, report)
    if data_args.strict_images and report['skipped']:
        raise ValueError(unusable_message(report, report_path))
    return dataset


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
            raise FileNotFoundError(f'{name}: no packaged config {Path(path).name}; packaged bases: '
                                    f'{", ".join(BASE_PREFIX + b for b in bases)}, or give base:<path to a config .json>')
    parser = HfArgumentParser((ModelArguments, DataArguments, FlowerTrainingArguments))
    return short, read_config(path, {action.dest for action in parser._actions})


def cache_root() -> Path:
    """Where built bases are kept: $FLOWER_VIT_LENS_CACHE, else ~/.cache/flower_vit_lens."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'flower_vit_lens')


def base_cache_dir(name: str) -> Path:
    """The cache folder of ``base:<config>``, keyed by the config's content (as datasets keys a generated set)."""
    short, config = base_config(name)
    blob = json.dumps({'config': config, 'cache_version': BASE_CACHE_VERSION}, sort_keys=True)
    return cache_root() / 'bases' / f'{short}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}'


def ensure_base(name: str) -> Path:
    """The checkpoint folder of ``base:<config>``, trained from its config on first use and cached.

    The base is trained by this same job (`run`: its own data_report, report and model card) into
    ``<key>.partial`` and renamed to ``<key>`` when it is complete, so a killed build never leaves a
    half-written cache entry; the next build resumes from the partial run's last checkpoint. Every
    process of a distributed run takes part in the build; the main process renames.
    """
    final = base_cache_dir(name)
    if (final / CONFIG_FILE).is_file() and (final / WEIGHTS_FILE).is_file():
        logger.info(f'{name}: using the cached base model {final}')
        return final
    partial = final.with_name(final.name + '.partial')
    logger.warning(f'{name}: building the base model (first use); it will be cached in {final}')
    _, config = base_config(name)
    run(*parse_config(config, output_dir=str(partial), run_name=name))
    state = PartialState()
    if state.is_main_process:
        try:
            os.rename(partial, final)
        except OSError:  # a concurrent build finished first: keep its result
            if not (final / WEIGHTS_FILE).is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    state.wait_for_everyone()
    return final


def resolve_start(model_args: ModelArguments) -> Tuple[str, Dict]:
    """Where training starts, as a timm name or a checkpoint folder, and the timm arguments to build it with.

    ``base:<config>`` is resolved to its cached checkpoint (built on first use), or, without
    ``--pretrained``, to the base's architecture alone (nothing is built).
    """
    name, overrides = model_args.model_name_or_path, model_args.timm_kwargs
    if name.startswith(BASE_PREFIX) and not model_args.pretrained:
        base_model_args = parse_config(base_config(name)[1], output_dir='unused')[0]
        return base_model_args.model_name_or_path, {**base_model_args.timm_kwargs, **overrides}
    if name.startswith(BASE_PREFIX):
        return str(ensure_base(name)), overrides
    return name, overrides


def build_model(model_args: ModelArguments, class_names: List[str], start_name: str,
                overrides: Dict) -> Tuple[TimmViTForImageClassification, Dict]:
    """The model to train, and where its weights come from (``run_config.json`` records it as ``start``).

    A timm name builds timm's model (with timm's pretrained weights when ``--pretrained``); a checkpoint
    (an output directory, a Hub repo id, a built base) gives its backbone, with a new head unless it was
    trained for exactly these classes (`modeling.init_from_checkpoint`).
    """
    if timm.is_model(start_name):
        model = TimmViTForImageClassification.from_timm(start_name, pretrained=model_args.pretrained,
                                                        label_names=class_names, model_args=overrides)
        head = {f'{model.timm_model.pretrained_cfg.get("classifier", "head")}.{p}' for p in ('weight', 'bias')}
        tensors = sorted(model.timm_model.state_dict())
        start = {'timm_model': start_name, 'pretrained': model_args.pretrained,
                 'loaded': [k for k in tensors if k not in head] if model_args.pretrained else [],
                 'initialised': sorted(head) if model_args.pretrained else tensors}
    else:
        model, start = init_from_checkpoint(checkpoint_dir(start_name), class_names,
                                            pretrained=model_args.pretrained, model_args=overrides)
    start['model_name_or_path'] = model_args.model_name_or_path
    loaded, initialised = start['loaded'], start['initialised']
    logger.info(f'Model from {model_args.model_name_or_path}: {len(loaded)} tensors loaded'
                + (f' ({", ".join(loaded[:3])}, ...)' if loaded else '')
                + f'; {len(initialised)} newly initialised'
                + (f': {", ".join(initialised)}' if len(initialised) <= 4 else ' (random weights)'))
    return model, start


def attach_transforms(dataset: datasets.DatasetDict, data_config: Dict, min_crop_scale: float,
                      seed: int, color_jitter: float = 0.4) -> SeededAugmentation:
    """timm's training augmentation on the train split (seeded per sample), its eval transform elsewhere."""
    augmentation = SeededAugmentation(train_transform(data_config, min_crop_scale, color_jitter), seed)
    dataset['train'] = dataset['train'].add_column('sample_index', list(range(len(dataset['train']))))
    dataset['train'].set_transform(batch_transform(augmentation), columns=['image', 'label', 'sample_index'])
    for split in dataset:
        if split != 'train':
            dataset[split].set_transform(batch_transform(eval_transform(data_config)), columns=['image', 'label'])
    return augmentation


def scored_split(dataset: datasets.DatasetDict) -> str:
    """The split the final numbers come from: test, or validation when test is missing or unlabeled."""
    if 'test' not in dataset:
        return 'validation'
    if min(dataset['test'].with_format(None)['label']) < 0:
        logger.warning('the test split is unlabeled (label -1); scoring and analysing the validation split instead.')
        return 'validation'
    return 'test'


def evaluate_test(trainer: Trainer, dataset: datasets.DatasetDict, class_names: List[str]) -> Dict:
    """Predicts the test split (validation when there is none) and scores it with scikit-learn."""
    split = scored_split(dataset)
    output = trainer.predict(dataset[split], metric_key_prefix=split)
    predictions = np.argmax(output.predictions, axis=-1)
    metrics = {f'test_{k}': v for k, v in classification_metrics(output.label_ids, predictions, class_names).items()}
    metrics['test_split'] = split
    metrics['test_runtime'] = output.metrics.get(f'{split}_runtime')
    return metrics


def save_run_config(model_args, data_args, training_args, train_runtime: float, start: Dict) -> None:
    """The resolved configuration, next to the weights (nanoGPT habit)."""
    device = str(training_args.device)
    if torch.cuda.is_available():
        device = f'{device}:{torch.cuda.get_device_name()}'
    config = {
        'model': asdict(model_args) | {'model_args': model_args.timm_kwargs},
        'start': start,
        'data': asdict(data_args),
        'training': training_args.to_dict(),
        'environment': {
            'device': device, 'num_processes': training_args.world_size, 'platform': platform.platform(),
            'torch': torch.__version__, 'timm': timm.__version__, 'transformers': transformers.__version__,
        },
        'train_runtime_s': train_runtime,
    }
    write_json(os.path.join(training_args.output_dir, 'run_config.json'), config)


def prepare_push(training_args: TrainingArguments) -> Tuple[Optional[str], Optional[str]]:
    """With --push_to_hub: the repo id and token, after checking both against the Hub before any long work.

    Trainer's own pushing is switched off; the finished output directory is pushed at the end
    (analysis.hub: weights, card, figures, report, metrics; never checkpoints). The token is
    taken out of the arguments, so that Trainer's training_args.bin never holds it.
    """
    if not training_args.push_to_hub:
        return None, None
    token = resolve_token(training_args.hub_token)
    check_hub_access(training_args.hub_model_id, token)
    training_args.push_to_hub = False
    training_args.hub_token = None
    return training_args.hub_model_id, token


def build_trainer(model: TimmViTForImageClassification, dataset: datasets.DatasetDict, model_args: ModelArguments,
                  training_args: TrainingArguments, trainer_class: type = Trainer, **trainer_kwargs) -> Trainer:
    """Trainer with timm's transforms attached to the splits and scikit-learn metrics per evaluation.

    Args:
        trainer_class: `Trainer` or a subclass (e.g. one with a distillation loss), given ``trainer_kwargs``.
    """
    class_names = model.class_names
    augmentation = attach_transforms(dataset, model_data_config(model.timm_model), model_args.min_crop_scale,
                                     training_args.seed, model_args.color_jitter)
    return trainer_class(
        **trainer_kwargs,
        model=model,
        args=training_args,
        train_dataset=dataset['train'],
        eval_dataset=dataset['validation'],
        data_collator=collate,
        compute_metrics=lambda p: classification_metrics(p.label_ids, np.argmax(p.predictions, -1), class_names,
                                                         scalars_only=True),
        callbacks=[AugmentationEpoch(augmentation)],
    )


def train(trainer: Trainer, training_args: TrainingArguments) -> float:
    """Trains (resuming from the last complete checkpoint if there is one), saves weights and state.

    Returns:
        the training wall time in seconds.
    """
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    trainer.save_model()
    trainer.log_metrics('train', result.metrics)
    trainer.save_metrics('train', result.metrics)
    trainer.save_state()
    return time.time() - start


def validate(trainer: Trainer) -> Dict:
    """Validation metrics (eval_results.json)."""
    eval_metrics = trainer.evaluate()
    trainer.log_metrics('eval', eval_metrics)
    trainer.save_metrics('eval', eval_metrics)
    return eval_metrics


def save_test_metrics(trainer: Trainer, test_metrics: Dict) -> None:
    """The test split's full scikit-learn report into test_results.json and all_results.json."""
    trainer.log_metrics('test', {k: v for k, v in test_metrics.items() if isinstance(v, (int, float))})
    trainer.save_metrics('test', test_metrics)


def extract_attention(model: TimmViTForImageClassification, dataset: datasets.DatasetDict, model_args: ModelArguments,
                      data_args: DataArguments, training_args: TrainingArguments, *, stage: str) -> Dict:
    """The attention summary and metrics of the scored split, at the ``start`` of training or at the ``end``.

    One eager pass, sharded across the processes of a distributed run (the main process writes the
    files); its logits are the predictions, so at the end it also gives the test scores.

    Returns:
        the scored split's metrics, as `evaluate_test` gives them (those of the start are discarded).
    """
    summary_file, metrics_file = {'start': (START_SUMMARY_FILE, START_METRICS_FILE),
                                  'end': (SUMMARY_FILE, METRICS_FILE)}[stage]
    split = scored_split(dataset)
    extraction, test_metrics = extract_and_score(
        model, dataset[split], training_args.output_dir, split=split, summary_file=summary_file,
        metrics_file=metrics_file, sharded=True, batch_size=training_args.per_device_eval_batch_size,
        max_batches=model_args.analysis_batches, model_id=model_args.model_name_or_path if stage == 'start'
        else trained_model_name(training_args),
        dataset_name=data_args.dataset_name, progress=not training_args.disable_tqdm,
        num_workers=training_args.dataloader_num_workers,
        full_maps=FULL_MAPS if stage == 'end' else 0)  # the report's explorer shows these images' full maps
    logger.info(f'attention of the {stage} weights on {split} images -> {extraction.path}')
    return test_metrics


def trained_model_name(training_args: TrainingArguments) -> str:
    """What the trained model is called in its summary and report: --run_name, else --hub_model_id, else the
    output folder's name (a base is run as ``base:<config>``)."""
    return training_args.run_name or training_args.hub_model_id or Path(training_args.output_dir).name


def analyse(model, dataset, model_args, data_args, training_args) -> None:
    """What training changed, the faithfulness scores, the report and the card (the summary is written)."""
    output_dir = Path(training_args.output_dir)
    if (output_dir / START_SUMMARY_FILE).is_file():
        change = attention_change(output_dir / START_SUMMARY_FILE, output_dir / SUMMARY_FILE,
                                  read_json(output_dir / START_METRICS_FILE), read_json(output_dir / METRICS_FILE))
        write_json(output_dir / CHANGE_FILE, change)
    if model_args.faithfulness_images:
        faithfulness_to_dir(model, dataset[scored_split(dataset)], output_dir, max_images=model_args.faithfulness_images,
                            batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed,
                            split=scored_split(dataset), model_id=model_args.model_name_or_path,
                            progress=not training_args.disable_tqdm)
    write_report(output_dir)
    render_model_card(output_dir, repo_id=training_args.hub_model_id)


def run(model_args: ModelArguments, data_args: DataArguments, training_args: FlowerTrainingArguments) -> Dict:
    """The whole job, in order: Hub pre-check, data, starting weights (and their attention), Trainer, train,
    validate, one pass over the test split (attention and scores), analyse, report and card, push.

    Returns:
        the test metrics (as in all_results.json).
    """
    setup_logging(training_args)
    repo_id, token = prepare_push(training_args)

    dataset = load_data(data_args, training_args)
    start_name, overrides = resolve_start(model_args)  # may build (and cache) a base model first
    set_seed(training_args.seed)  # before the model: its new head (or all of it) is initialised at random
    model, start = build_model(model_args, dataset['train'].features['label'].names, start_name, overrides)
    extract_attention(model, dataset, model_args, data_args, training_args, stage='start')
    trainer = build_trainer(model, dataset, model_args, training_args)
    train_runtime = train(trainer, training_args)
    validate(trainer)
    # One pass over the test split: the attention summary, and the predictions that score it.
    test_metrics = extract_attention(trainer.model, dataset, model_args, data_args, training_args, stage='end')
    save_test_metrics(trainer, test_metrics)

    if trainer.is_world_process_zero():
        save_run_config(model_args, data_args, training_args, train_runtime, start)
        analyse(model, dataset, model_args, data_args, training_args)
        if repo_id:
            push_output_dir(training_args.output_dir, repo_id, private=bool(training_args.hub_private_repo),
                            token=token)
    return test_metrics
