"""The training job as functions: data, model, Trainer, evaluation, end-of-run analysis; `run` in order.

`train_hf.py` is its command line; the background study and the base-model cache run it too.
Its arguments are `analysis.train.args`; base models (``base:<config>``) `analysis.train.base`.
"""
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import datasets
import numpy as np
import timm
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from analysis.core.metrics import classification_metrics
from analysis.core.resources import runtime_versions
from analysis.core.run_files import (
    CHANGE_FILE,
    DATA_REPORT_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    RUN_CONFIG_FILE,
    START_METRICS_FILE,
    START_SUMMARY_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    read_json,
    read_optional_json,
)
from analysis.maps.attention_change import attention_change
from analysis.maps.extract import extract_and_score
from analysis.modeling.transforms import (
    SeededAugmentation,
    batch_transform,
    collate,
    eval_transform,
    model_data_config,
    train_transform,
)
from analysis.modeling.vit import TimmViTForImageClassification, checkpoint_dir, init_from_checkpoint
from analysis.publish.hub import push_output_dir
from analysis.render.card import render_model_card
from analysis.render.explorer import FULL_MAPS
from analysis.render.figures import render_figures
from analysis.render.report import write_report
from analysis.studies.faithfulness import faithfulness_to_dir
from analysis.studies.sinks import sinks_to_dir
from analysis.train.args import BASE_PREFIX, FlowerTrainingArguments, ModelArguments, base_config, parse_config
from analysis.train.base import ensure_base
from data_scripts import DataArguments, check_images, load_flower_dataset
from data_scripts.errors import UserError
from data_scripts.files import write_json
from data_scripts.hub import check_hub_access, resolve_token
from data_scripts.hygiene import unusable_message

logger = logging.getLogger(__name__)

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
            if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
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
    report_path = os.path.join(training_args.output_dir, DATA_REPORT_FILE)
    if training_args.should_save:
        write_json(report_path, report)
    if data_args.strict_images and report['skipped']:
        raise UserError(unusable_message(report, report_path))
    return dataset


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
        return str(ensure_base(name, run, seed=model_args.base_seed)), overrides
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
        folder = checkpoint_dir(start_name)
        model, start = init_from_checkpoint(folder, class_names, pretrained=model_args.pretrained, model_args=overrides)
        start['checkpoint_results'] = checkpoint_results(folder)
    start['model_name_or_path'] = model_args.model_name_or_path
    loaded, initialised = start['loaded'], start['initialised']
    logger.info(f'Model from {model_args.model_name_or_path}: {len(loaded)} tensors loaded'
                + (f' ({", ".join(loaded[:3])}, ...)' if loaded else '')
                + f'; {len(initialised)} newly initialised'
                + (f': {", ".join(initialised)}' if len(initialised) <= 4 else ' (random weights)'))
    return model, start


def checkpoint_results(folder: Path) -> Optional[Dict]:
    """How good the starting checkpoint was on its own task: its run's test accuracy and macro F1, when it has them."""
    results = read_optional_json(Path(folder) / RESULTS_FILE)
    if results is None:
        return None
    return {k: results.get(f'test_{k}') for k in ('accuracy', 'macro_f1', 'split')} | {
        'num_classes': len(results.get('test_class_names') or [])}


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


def save_run_config(model_args, data_args, training_args, start: Dict, train_runtime: Optional[float] = None) -> None:
    """The resolved configuration, next to the weights (nanoGPT habit).

    Written before the first training step (``train_runtime_s`` null), so that the checkpoints of a
    run that is stopped have the record of how they were made, and again at the end with the runtime.
    """
    if not training_args.should_save:
        return
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
            'packages': runtime_versions(),
        },
        'train_runtime_s': train_runtime,
    }
    write_json(os.path.join(training_args.output_dir, RUN_CONFIG_FILE), config)


def prepare_push(training_args: TrainingArguments) -> Tuple[Optional[str], Optional[str]]:
    """With --push_to_hub: the repo id and token, after checking both against the Hub before any long work.

    Trainer's own pushing is switched off; the finished output directory is pushed at the end
    (analysis.publish.hub: weights, card, figures, report, metrics; never checkpoints). The token is
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
    """What training changed, the faithfulness scores, the attention sinks, the report and the card (the summary is
    written)."""
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
    if (output_dir / SUMMARY_FILE).is_file():
        sinks_to_dir(model, output_dir, dataset[scored_split(dataset)], causal_images=model_args.sinks_causal_images,
                     batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed)
    figures = render_figures(output_dir)
    write_report(output_dir, figures)
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
    save_run_config(model_args, data_args, training_args, start)  # before the first step: checkpoints have a record
    extract_attention(model, dataset, model_args, data_args, training_args, stage='start')
    trainer = build_trainer(model, dataset, model_args, training_args)
    train_runtime = train(trainer, training_args)
    validate(trainer)
    # One pass over the test split: the attention summary, and the predictions that score it.
    test_metrics = extract_attention(trainer.model, dataset, model_args, data_args, training_args, stage='end')
    save_test_metrics(trainer, test_metrics)

    save_run_config(model_args, data_args, training_args, start, train_runtime)
    if trainer.is_world_process_zero():
        analyse(model, dataset, model_args, data_args, training_args)
        if repo_id:
            push_output_dir(training_args.output_dir, repo_id, private=bool(training_args.hub_private_repo),
                            token=token)
    return test_metrics
